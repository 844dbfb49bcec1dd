from django.contrib import admin, messages

from apps.nodes.models import Node, NodeMetric, NodeStatus
from apps.nodes.selectors import node_list_with_status
from apps.nodes.services import node_cordon, node_drain, node_uncordon


class NodeStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return NodeStatus.choices

    def queryset(self, request, queryset):
        return queryset.filter(current_status=self.value()) if self.value() else queryset


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "hostname", "queue", "gpu_index", "node_status", "health", "cordoned", "cordoned_gpus",
                    "last_heartbeat")
    list_filter = (NodeStatusFilter, "cordoned")
    search_fields = ("name", "hostname")
    readonly_fields = ("started_at", "last_heartbeat", "created_at", "loaded_models", "runners", "hardware", "health_error",
                       "health_checked_at", "health_detail")
    actions = ["cordon", "uncordon", "drain"]

    def get_queryset(self, request):
        return node_list_with_status()

    @admin.display(description="status", ordering="current_status")
    def node_status(self, node: Node) -> str:
        return node.current_status

    @admin.display(description="self-test")
    def health(self, node: Node) -> str:
        """The start-up test decode: its error, 'passed', 'not tested', or '-' when no worker reported one."""
        if node.health_error:  # the whole text is on the node's page
            return node.health_error if len(node.health_error) <= 100 else node.health_error[:99] + "…"
        if not node.health_detail:
            return "-"
        return "passed" if node.health_detail.get("tested") else "not tested"

    @admin.action(description="Cordon: no new requests")
    def cordon(self, request, queryset):
        for node in queryset:
            node_cordon(node=node)
        self.message_user(request, f"Cordoned {len(queryset)} node(s).", messages.SUCCESS)

    @admin.action(description="Uncordon: take requests again")
    def uncordon(self, request, queryset):
        for node in queryset:
            node_uncordon(node=node)
        self.message_user(request, f"Uncordoned {len(queryset)} node(s).", messages.SUCCESS)

    @admin.action(description="Drain: cordon and unload models once their requests finish")
    def drain(self, request, queryset):
        for node in queryset:
            node_drain(node=node)
        self.message_user(request, f"Draining {len(queryset)} node(s).", messages.SUCCESS)


@admin.register(NodeMetric)
class NodeMetricAdmin(admin.ModelAdmin):
    list_display = ("node", "recorded_at", "cpu_pct", "ram_used_bytes", "requests_in_flight")
    list_filter = ("node",)
    date_hierarchy = "recorded_at"
    list_select_related = ("node",)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
