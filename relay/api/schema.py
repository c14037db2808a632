"""OpenAPI: how the relay's token authentication appears in the schema (drf-spectacular)."""
from drf_spectacular.extensions import OpenApiAuthenticationExtension


class RelayTokenScheme(OpenApiAuthenticationExtension):
    target_class = "relay.api.authentication.RelayTokenAuthentication"
    name = "relayToken"

    def get_security_definition(self, auto_schema):  # noqa: ANN001, ANN201 (drf-spectacular's signature)
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A relay API token: `Authorization: Bearer <key>` (or `Token <key>`). Create one on the account page or POST /api/v1/tokens/.",
        }
