from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("relay.api.urls")),  # /api/ (REST API, schema, docs) and /account/usage/
    path("", include("relay.web.urls")),
]
