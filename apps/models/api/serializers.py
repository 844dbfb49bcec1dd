from rest_framework import serializers

from apps.models.models import RegisteredModel


class RegisteredModelSerializer(serializers.ModelSerializer):
    class Meta:
        model = RegisteredModel
        fields = ["id", "source", "file_name", "size_bytes", "owned_by", "is_active", "created_at", "updated_at"]
        read_only_fields = fields
