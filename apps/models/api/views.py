from rest_framework import viewsets

from apps.models.api.serializers import RegisteredModelSerializer
from apps.models.selectors import model_list


class RegisteredModelViewSet(viewsets.ReadOnlyModelViewSet):
    """Models registered on the platform (the ids clients use as ``model``)."""

    serializer_class = RegisteredModelSerializer
    filterset_fields = ["source", "is_active"]

    def get_queryset(self):
        return model_list()
