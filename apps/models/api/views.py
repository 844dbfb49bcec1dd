from rest_framework import viewsets

from apps.models.api.serializers import RegisteredModelSerializer
from apps.models.models import RegisteredModel


class RegisteredModelViewSet(viewsets.ReadOnlyModelViewSet):
    """Models registered on the platform (the ids clients use as ``model``)."""

    queryset = RegisteredModel.objects.all()
    serializer_class = RegisteredModelSerializer
    filterset_fields = ["source", "is_active"]
