from django.contrib import admin

from apps.nodes.models import Node


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "hostname", "queue", "gpu_index", "status", "last_heartbeat")
    search_fields = ("name", "hostname")
    readonly_fields = ("started_at", "last_heartbeat", "created_at", "loaded_models", "hardware")
