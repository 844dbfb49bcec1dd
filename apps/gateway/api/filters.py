import django_filters

from apps.gateway.models import RequestLog


class RequestLogFilter(django_filters.FilterSet):
    since = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    api_key = django_filters.CharFilter(field_name="api_key__prefix")
    user = django_filters.CharFilter(field_name="user__username")

    class Meta:
        model = RequestLog
        fields = ["model", "node", "status", "status_code", "path", "stream", "api_key", "user", "since", "until"]
