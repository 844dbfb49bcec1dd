from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from apps.nodes.api.filters import NodeFilter
from apps.nodes.api.serializers import NodeMaintenanceSerializer, NodeMetricsQuerySerializer, NodeSerializer
from apps.nodes.models import Node
from apps.nodes.selectors import node_get, node_list_with_status, node_metrics_history
from apps.nodes.services import node_cordon, node_delete, node_drain, node_uncordon
from llmplatform.api_errors import ApiErrorSerializer as ApiError
from llmplatform.permissions import access

_NODE_REF = OpenApiParameter("id", str, OpenApiParameter.PATH, description="The node's numeric id or its name.")


@extend_schema_view(**{name: extend_schema(parameters=[_NODE_REF]) for name in
                       ("retrieve", "destroy", "cordon", "uncordon", "drain", "metrics")})
class NodeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Worker nodes of the fleet: status, hardware, loaded models, metrics history and maintenance.

    A node is addressed by its numeric id or by its name. Maintenance (cordon, uncordon, drain,
    delete) is for staff.
    """

    serializer_class = NodeSerializer
    filterset_class = NodeFilter
    permission_classes = access("nodes")

    def get_queryset(self):
        return node_list_with_status()

    def get_object(self) -> Node:
        ref = self.kwargs[self.lookup_url_kwarg or self.lookup_field]
        node = node_get(ref=ref, queryset=self.get_queryset())
        if node is None:
            raise NotFound(f"no node with id or name {ref!r}")
        self.check_object_permissions(self.request, node)
        return node

    def _maintain(self, request, service, *, reply_status=status.HTTP_200_OK) -> Response:
        body = NodeMaintenanceSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        node = service(node=self.get_object(), gpus=body.validated_data.get("gpus"))  # NodeMaintenanceError: 400
        return Response(self.get_serializer(node).data, status=reply_status)

    @extend_schema(request=NodeMaintenanceSerializer)
    @action(detail=True, methods=["post"])
    def cordon(self, request, pk=None):
        """No new requests go to the node (or to the ``gpus`` given); requests in flight finish."""
        return self._maintain(request, node_cordon)

    @extend_schema(request=NodeMaintenanceSerializer)
    @action(detail=True, methods=["post"])
    def uncordon(self, request, pk=None):
        """The node (or the ``gpus`` given) takes new requests again."""
        return self._maintain(request, node_uncordon)

    @extend_schema(request=NodeMaintenanceSerializer, responses={202: NodeSerializer, 503: ApiError})
    @action(detail=True, methods=["post"])
    def drain(self, request, pk=None):
        """Cordon, then unload the node's models once their requests in flight finish (202: under way)."""
        return self._maintain(request, node_drain, reply_status=status.HTTP_202_ACCEPTED)

    def perform_destroy(self, instance: Node) -> None:
        node_delete(node=instance)

    @extend_schema(parameters=[NodeMetricsQuerySerializer], responses={200: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["get"])
    def metrics(self, request, pk=None):
        """Averages of the node's metrics per bucket of ``step`` seconds over the last ``minutes``."""
        query = NodeMetricsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        node = self.get_object()
        minutes, step = query.validated_data["minutes"], query.validated_data["step"]
        return Response({"node": node.name, "minutes": minutes, "step": step,
                         "buckets": node_metrics_history(node=node, minutes=minutes, step=step)})
