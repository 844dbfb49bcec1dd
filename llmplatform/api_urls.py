"""The management API (DRF, browsable) mounted under /api/v1/."""

from django.urls import include, path
from rest_framework.routers import DefaultRouter

from apps.gateway.api.local import GenerateView
from apps.gateway.api.views import ApiKeyViewSet, RequestLogViewSet
from apps.jobs.api.views import JobViewSet, job_events
from apps.models.api import lifecycle, local
from apps.models.api.external import ExternalModelViewSet
from apps.models.api.views import RegisteredModelViewSet
from apps.nodes.api.views import NodeViewSet

router = DefaultRouter()
router.register("nodes", NodeViewSet, basename="node")
router.register("registry", RegisteredModelViewSet, basename="registered-model")
router.register("external-models", ExternalModelViewSet, basename="external-model")
router.register("keys", ApiKeyViewSet, basename="api-key")
router.register("requests", RequestLogViewSet, basename="request-log")
router.register("jobs", JobViewSet, basename="job")

# The local LLM API (same paths as that design), model lifecycle jobs, node caches and blobs.
model_urlpatterns = [
    path("health", local.HealthView.as_view(), name="local-health"),
    path("models", local.ModelsView.as_view(), name="local-models"),
    path("models/sync", local.ModelsSyncView.as_view(), name="local-models-sync"),
    path("models/<str:name>", local.ModelDeleteView.as_view(), name="local-model-delete"),
    path("generate", GenerateView.as_view(), name="local-generate"),
    path("cache/clear", local.CacheClearView.as_view(), name="local-cache-clear"),
    path("cache/status", local.CacheStatusView.as_view(), name="local-cache-status"),
    path("hf/search", lifecycle.HubSearchView.as_view(), name="hf-search"),
    path("hf/files", lifecycle.HubFilesView.as_view(), name="hf-files"),
    path("hf/register", lifecycle.HubRegisterView.as_view(), name="hf-register"),
    path("convert", lifecycle.ConvertView.as_view(), name="convert"),
    path("quantize", lifecycle.QuantizeView.as_view(), name="quantize"),
    path("jobs/<uuid:job_id>/events", job_events, name="job-events"),
    path("blobs/<str:model_id>", lifecycle.model_blob, name="model-blob"),
    path("nodes/<str:node>/cache", lifecycle.NodeCacheView.as_view(), name="node-cache"),
    path("nodes/<str:node>/cache/unload", lifecycle.NodeCacheUnloadView.as_view(), name="node-cache-unload"),
    path("nodes/<str:node>/cache/<str:model>", lifecycle.NodeCacheDeleteView.as_view(), name="node-cache-delete"),
]

# Fit analysis (apps/fit) comes before the router so nodes/{node}/... paths reach it.
urlpatterns = model_urlpatterns + [path("", include("apps.fit.urls"))] + router.urls
