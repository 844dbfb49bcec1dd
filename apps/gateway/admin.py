from django.contrib import admin, messages

from apps.gateway.models import ApiKey, RequestLog
from apps.gateway.services import api_key_create, api_key_revoke


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "user", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix", "user__username")
    fields = ("name", "user", "expires_at", "prefix", "created_at", "revoked_at", "last_used_at")
    readonly_fields = ("prefix", "created_at", "revoked_at", "last_used_at")
    actions = ["revoke"]

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        key, raw_key = api_key_create(name=obj.name, user=obj.user)
        if obj.expires_at:
            key.expires_at = obj.expires_at
            key.save(update_fields=["expires_at"])
        obj.pk = key.pk
        obj.refresh_from_db()
        messages.warning(request, f"New API key (shown once, copy it now): {raw_key}")

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for key in queryset:
            api_key_revoke(key=key)


@admin.register(RequestLog)
class RequestLogAdmin(admin.ModelAdmin):
    list_display = ("created_at", "path", "model", "node", "status", "status_code", "prompt_tokens",
                    "completion_tokens", "latency_ms", "ttft_ms", "api_key")
    list_filter = ("status", "path", "model", "node", "stream")
    search_fields = ("id", "model", "node", "api_key__name", "user__username")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in RequestLog._meta.fields]

    def has_add_permission(self, request):
        return False
