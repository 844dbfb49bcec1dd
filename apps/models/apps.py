from django.apps import AppConfig


class ModelsConfig(AppConfig):
    """The model registry. Labelled ``llm_models`` so it never reads as Django's ``models``."""

    name = "apps.models"
    label = "llm_models"
    verbose_name = "LLM models"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from apps.models import jobs  # noqa: F401  (registers the download, convert and quantize handlers)
