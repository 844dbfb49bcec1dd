from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "apps.gateway"
    label = "gateway"
    verbose_name = "Gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from apps.gateway import schema  # noqa: F401  (registers the OpenAPI auth scheme)
        from apps.gateway.lookups import lookups_connect

        lookups_connect()
