from rest_framework import serializers

from apps.gateway.models import ApiKey, RequestLog
from apps.gateway.services import API_KEY_MAX_LIFETIME


class ApiKeySerializer(serializers.ModelSerializer):
    user = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    expires_in = serializers.IntegerField(write_only=True, required=False, min_value=1,
                                          max_value=int(API_KEY_MAX_LIFETIME.total_seconds()),
                                          help_text="Seconds until the key expires (at most 100 years); "
                                                    "omit for no expiry.")

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "user", "created_at", "expires_at", "expires_in", "revoked_at",
                  "last_used_at"]
        read_only_fields = ["id", "prefix", "user", "created_at", "expires_at", "revoked_at", "last_used_at"]


class NewApiKeySerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The key itself; shown only in this response.")

    class Meta(ApiKeySerializer.Meta):
        fields = ApiKeySerializer.Meta.fields + ["key"]


class RequestLogSerializer(serializers.ModelSerializer):
    api_key = serializers.SlugRelatedField(slug_field="prefix", read_only=True, allow_null=True)
    user = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = RequestLog
        fields = ["id", "created_at", "finished_at", "api_key", "user", "method", "path", "model", "node",
                  "stream", "status", "status_code", "error_code", "prompt_tokens", "completion_tokens",
                  "latency_ms", "ttft_ms", "request_body", "response_body"]
        read_only_fields = fields
