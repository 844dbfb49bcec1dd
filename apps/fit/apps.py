from django.apps import AppConfig


class FitConfig(AppConfig):
    name = "apps.fit"
    label = "fit"
    verbose_name = "Fit analysis"
    default_auto_field = "django.db.models.BigAutoField"
