"""The management API (DRF, browsable) mounted under /api/v1/."""

from rest_framework.routers import DefaultRouter

from apps.gateway.api.views import ApiKeyViewSet, RequestLogViewSet
from apps.models.api.views import RegisteredModelViewSet
from apps.nodes.api.views import NodeViewSet

router = DefaultRouter()
router.register("nodes", NodeViewSet, basename="node")
router.register("registry", RegisteredModelViewSet, basename="registered-model")
router.register("keys", ApiKeyViewSet, basename="api-key")
router.register("requests", RequestLogViewSet, basename="request-log")

urlpatterns = router.urls
