from rest_framework import serializers

from apps.nodes.models import Node


class NodeSerializer(serializers.ModelSerializer):
    status = serializers.CharField(read_only=True)

    class Meta:
        model = Node
        fields = [
            "id", "name", "hostname", "queue", "gpu_index", "status", "hardware",
            "loaded_models", "started_at", "last_heartbeat", "created_at",
        ]
        read_only_fields = fields
