"""Management API for external models: /api/v1/external-models/.

The upstream API key is write-only: responses say only whether one is set and its last 4
characters.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiExample, extend_schema, extend_schema_view
from rest_framework import serializers, status, viewsets
from rest_framework.response import Response

from apps.models.models import RegisteredModel
from apps.models.secrets import secret_hint
from apps.models.selectors import model_list_external
from apps.models.services import ModelError, model_delete_external, model_register_external, model_update_external
from llmplatform.api_errors import ApiErrorSerializer as ApiError
from llmplatform.permissions import access


class ExternalModelSerializer(serializers.Serializer):
    id = serializers.CharField(read_only=True)
    name = serializers.CharField(write_only=True, help_text="The model id clients will put in 'model'.")
    endpoint = serializers.CharField(source="endpoint.base_url", max_length=500,
                                     help_text="The upstream's OpenAI base URL, e.g. https://api.example.com/v1")
    upstream_model = serializers.CharField(source="endpoint.upstream_model", required=False, max_length=255,
                                           help_text="The model name the upstream expects (default: name).")
    api_key = serializers.CharField(write_only=True, required=False, allow_blank=True, trim_whitespace=False,
                                    style={"input_type": "password"},
                                    help_text="The upstream's API key; stored encrypted, never shown again. "
                                              "On update: omit to keep it, \"\" to remove it.")
    api_key_set = serializers.SerializerMethodField()
    api_key_last4 = serializers.SerializerMethodField(
        help_text="Last 4 characters of the key ('' for short keys, null if it cannot be decrypted).")
    is_active = serializers.BooleanField(required=False)
    created_by = serializers.CharField(source="created_by.username", read_only=True, allow_null=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)

    def get_api_key_set(self, model: RegisteredModel) -> bool:
        return bool(model.endpoint.api_key_encrypted)

    def get_api_key_last4(self, model: RegisteredModel) -> str | None:
        return secret_hint(model.endpoint.api_key_encrypted)


_UPSTREAM = {"endpoint": "https://api.example.com/v1", "upstream_model": "gpt-4o-mini", "api_key": "sk-example"}


@extend_schema_view(
    create=extend_schema(responses={201: ExternalModelSerializer, 409: ApiError},
                         examples=[OpenApiExample("An upstream model", request_only=True,
                                                  value={"name": "example-upstream", **_UPSTREAM})]),
    update=extend_schema(examples=[OpenApiExample("A new upstream", request_only=True, value=_UPSTREAM)]),
    partial_update=extend_schema(examples=[OpenApiExample("Switched off", request_only=True,
                                                          value={"is_active": False})]),
)
class ExternalModelViewSet(viewsets.ModelViewSet):
    """Models served by another OpenAI-compatible server. Anyone signed in may list them; staff change them."""

    serializer_class = ExternalModelSerializer
    permission_classes = access("external-models")
    lookup_value_regex = r"[^/]+"

    def get_queryset(self):
        return model_list_external()

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        endpoint = data.get("endpoint", {})
        model = model_register_external(name=data["name"], base_url=endpoint["base_url"],
                                        upstream_model=endpoint.get("upstream_model"), api_key=data.get("api_key", ""),
                                        is_active=data.get("is_active", True), created_by=request.user)
        return Response(self.get_serializer(self.get_queryset().get(pk=model.pk)).data, status=status.HTTP_201_CREATED)

    def update(self, request, *args, **kwargs):
        model = self.get_object()
        serializer = self.get_serializer(model, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if "name" in data and data["name"] != model.id:
            raise ModelError("A model cannot be renamed; register a new one instead")
        endpoint = data.get("endpoint", {})
        model_update_external(model=model, base_url=endpoint.get("base_url"), upstream_model=endpoint.get("upstream_model"),
                              api_key=data.get("api_key"), is_active=data.get("is_active"))
        return Response(self.get_serializer(self.get_queryset().get(pk=model.pk)).data)

    def destroy(self, request, *args, **kwargs):
        model_delete_external(model=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
