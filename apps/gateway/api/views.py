from datetime import timedelta

from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from apps.gateway.api.filters import RequestLogFilter
from apps.gateway.api.serializers import ApiKeySerializer, NewApiKeySerializer, RequestLogSerializer
from apps.gateway.models import ApiKey, RequestLog
from apps.gateway.services import api_key_create, api_key_revoke
from llmplatform.permissions import access


class ApiKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                    viewsets.GenericViewSet):
    """API keys: staff see every key, other users their own. The key text is shown once, on creation."""

    serializer_class = ApiKeySerializer
    filterset_fields = ["name", "prefix"]
    permission_classes = access("keys")

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return ApiKey.objects.none()
        keys = ApiKey.objects.select_related("user")
        return keys if self.request.user.is_staff else keys.filter(user=self.request.user)

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        expires_in = serializer.validated_data.get("expires_in")
        key, raw_key = api_key_create(name=serializer.validated_data["name"], user=request.user,
                                      expires_in=timedelta(seconds=expires_in) if expires_in else None)
        key.key = raw_key
        return Response(NewApiKeySerializer(key).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        return Response(ApiKeySerializer(api_key_revoke(key=self.get_object())).data)


class RequestLogViewSet(viewsets.ReadOnlyModelViewSet):
    """Request history of /v1: staff see every request, other users their own."""

    serializer_class = RequestLogSerializer
    filterset_class = RequestLogFilter
    permission_classes = access("requests")

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return RequestLog.objects.none()
        rows = RequestLog.objects.select_related("api_key", "user")
        return rows if self.request.user.is_staff else rows.filter(user=self.request.user)
