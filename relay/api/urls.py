"""``/api/`` (schema, docs, ``v1``) and the usage page ``/account/usage/``."""
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from relay.api import pages, views

router = DefaultRouter()
router.include_format_suffixes = False  # session ids may contain dots: no ".json" suffix routes
router.register("sessions", views.SessionViewSet, basename="session")
router.register("tokens", views.TokenViewSet, basename="token")
router.register("webhooks", views.WebhookViewSet, basename="webhook")
router.register(r"webhooks/(?P<webhook_pk>[0-9]+)/deliveries", views.DeliveryViewSet, basename="delivery")
router.register("usage", views.UsageView, basename="usage")

app_name = "relay_api"
urlpatterns = [
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="relay_api:schema"), name="docs"),
    path("account/usage/", pages.usage_page, name="usage-page"),
]
