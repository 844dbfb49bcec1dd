import django_filters

from apps.nodes.models import Node, NodeStatus


class NodeFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(field_name="current_status", choices=NodeStatus.choices)

    class Meta:
        model = Node
        fields = ["name", "hostname", "gpu_index", "cordoned", "status"]
