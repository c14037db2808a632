from django.apps import AppConfig


class RelayApiConfig(AppConfig):
    """The hosted app's HTTP side: REST API, webhooks and usage analytics (issue 17)."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "relay.api"
    label = "relay_api"
    verbose_name = "Relay API, webhooks and usage"

    def ready(self) -> None:
        from relay.api import admin, schema  # noqa: F401  (admin registrations, OpenAPI extensions)
