from django.apps import AppConfig


class RelayConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "relay"
    verbose_name = "Transcription relay"

    def ready(self) -> None:
        from relay import admin_tokens  # noqa: F401  (registers the token admin)
