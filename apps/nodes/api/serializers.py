from django.conf import settings
from rest_framework import serializers

from apps.nodes.models import Node, NodeStatus

# More buckets than this per history query is a mistake (a chart has fewer pixels), not a use.
METRICS_MAX_BUCKETS = 1440


class NodeSerializer(serializers.ModelSerializer):
    status = serializers.SerializerMethodField()
    gpus = serializers.ListField(source="gpu_indexes", child=serializers.IntegerField(), read_only=True,
                                 help_text="GPUs the node computes on.")
    placeable = serializers.SerializerMethodField(
        help_text="Takes new requests: online or degraded (not offline, not unhealthy) and not cordoned.")

    class Meta:
        model = Node
        fields = [
            "id", "name", "hostname", "queue", "gpu_index", "gpus", "status", "placeable", "cordoned", "cordoned_gpus",
            "health_error", "health_checked_at", "health_detail",
            "hardware", "loaded_models", "runners", "started_at", "last_heartbeat", "created_at",
        ]
        read_only_fields = fields

    def get_status(self, node: Node) -> str:
        return getattr(node, "current_status", None) or node.status

    def get_placeable(self, node: Node) -> bool:
        return self.get_status(node) in (NodeStatus.ONLINE, NodeStatus.DEGRADED) and not node.is_cordoned


class NodeMaintenanceSerializer(serializers.Serializer):
    gpus = serializers.ListField(child=serializers.IntegerField(min_value=0), required=False, allow_empty=False,
                                 help_text="Only these GPUs of the node; leave out for the whole node.")


class NodeMetricsQuerySerializer(serializers.Serializer):
    minutes = serializers.IntegerField(required=False, default=60, min_value=1)
    step = serializers.IntegerField(required=False, default=60, min_value=1, help_text="Bucket width in seconds.")

    def validate_minutes(self, minutes: int) -> int:
        kept = int(settings.LLMP_NODE_METRICS_RETENTION_HOURS * 60)
        if minutes > kept:
            raise serializers.ValidationError(f"at most {kept}: metrics are kept for "
                                              f"{settings.LLMP_NODE_METRICS_RETENTION_HOURS:g} hours")
        return minutes

    def validate(self, query: dict) -> dict:
        window = query["minutes"] * 60
        if query["step"] > window:
            raise serializers.ValidationError({"step": f"at most the window, {window} seconds"})
        if window / query["step"] > METRICS_MAX_BUCKETS:
            raise serializers.ValidationError(
                {"step": f"at least {-(-window // METRICS_MAX_BUCKETS)} seconds for {query['minutes']} minutes "
                         f"(at most {METRICS_MAX_BUCKETS} buckets)"})
        return query
