"""Fit API routes, mounted under /api/v1/ ahead of the router's node routes."""

from django.urls import path

from apps.fit.api import views

urlpatterns = [
    path("nodes/<str:node>/system", views.NodeSystemView.as_view(), name="fit-node-system"),
    path("nodes/<str:node>/models", views.NodeModelsView.as_view(), name="fit-node-models"),
    path("nodes/<str:node>/models/top", views.NodeTopModelsView.as_view(), name="fit-node-models-top"),
    path("nodes/<str:node>/models/<path:name>", views.NodeModelByNameView.as_view(), name="fit-node-model"),
    path("fit/matrix", views.FitMatrixView.as_view(), name="fit-matrix"),
]
