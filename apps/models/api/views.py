from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from apps.models.api.serializers import RegisteredModelSerializer
from apps.models.selectors import model_list
from apps.models.services import model_load_failure_clear
from llmplatform.permissions import access


class ClearLoadFailuresSerializer(serializers.Serializer):
    node = serializers.CharField(max_length=128, required=False,
                                 help_text="Only this node's mark (its name); default: every node's")


class RegisteredModelViewSet(viewsets.ReadOnlyModelViewSet):
    """Models registered on the platform (the ids clients use as ``model``)."""

    serializer_class = RegisteredModelSerializer
    permission_classes = access("registry")
    filterset_fields = ["source", "is_active"]
    lookup_value_regex = r"[^/]+"  # model ids may hold dots

    def get_queryset(self):
        return model_list()

    @extend_schema(request=ClearLoadFailuresSerializer, responses={200: dict})
    @action(detail=True, methods=["post"], url_path="clear-load-failures")
    def clear_load_failures(self, request, pk=None):
        """Staff: the nodes where this model failed to load try it again on its next request (all of them,
        or the ``node`` named). A node also tries again by itself once the model's file changes."""
        body = ClearLoadFailuresSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        model = self.get_object()
        cleared = model_load_failure_clear(model_id=model.id, node_name=body.validated_data.get("node"))
        return Response({"model": model.id, "cleared": cleared}, status=status.HTTP_200_OK)
