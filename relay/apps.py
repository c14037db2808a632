from django.apps import AppConfig


class RelayConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "relay"
    verbose_name = "Transcription relay"

    def ready(self) -> None:
        # The admin lives in relay.ops; admin.autodiscover() only looks for relay.admin.
        from relay.live import layer_health
        from relay.ops import admin, admin_rooms, admin_tokens  # noqa: F401

        layer_health.install()
