from datetime import UTC

import django_filters
from django import forms
from django_filters.fields import IsoDateTimeField

from apps.gateway.models import RequestLog


class UtcIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 time, as UTC: an offset PostgreSQL cannot hold (beyond ±15:59) or a time that leaves the
    years 1 to 9999 in UTC is a 400, not a database error."""

    def to_python(self, value):
        moment = super().to_python(value)
        if moment is None:
            return None
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("is out of range once converted to UTC.", code="invalid") from None


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


class RequestLogFilter(django_filters.FilterSet):
    since = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    api_key = django_filters.CharFilter(field_name="api_key__prefix")
    user = django_filters.CharFilter(field_name="user__username")

    class Meta:
        model = RequestLog
        fields = ["model", "node", "status", "status_code", "path", "stream", "api_key", "user", "since", "until"]
