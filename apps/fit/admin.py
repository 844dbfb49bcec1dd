from django.contrib import admin

from apps.fit.models import FitMeasurement


@admin.register(FitMeasurement)
class FitMeasurementAdmin(admin.ModelAdmin):
    list_display = ("model_id", "node", "memory_bytes", "tokens_per_second", "tps_samples", "measured_at")
    list_filter = ("node",)
    search_fields = ("model_id", "node__name")
    readonly_fields = ("measured_at",)
