from rest_framework import viewsets

from apps.nodes.api.serializers import NodeSerializer
from apps.nodes.models import Node


class NodeViewSet(viewsets.ReadOnlyModelViewSet):
    """Worker nodes of the fleet, with their hardware and the models they hold loaded."""

    queryset = Node.objects.all()
    serializer_class = NodeSerializer
    filterset_fields = ["name", "hostname", "gpu_index"]
