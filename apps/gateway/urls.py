from django.urls import path, re_path

from apps.gateway import views

urlpatterns = [
    path("chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("completions", views.completions, name="v1-completions"),
    path("embeddings", views.embeddings, name="v1-embeddings"),
    path("models", views.models_list, name="v1-models"),
    path("models/<path:model_id>", views.model_detail, name="v1-model-detail"),
    re_path(r"^(?P<path>.*)$", views.unknown_path),
]
