from django.contrib import admin

from apps.models.models import RegisteredModel


@admin.register(RegisteredModel)
class RegisteredModelAdmin(admin.ModelAdmin):
    list_display = ("id", "source", "file_name", "size_bytes", "is_active", "created_at")
    list_filter = ("source", "is_active")
    search_fields = ("id", "file_name")
