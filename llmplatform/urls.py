from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import include, path, re_path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.gateway import health

handler404 = "llmplatform.api_errors.not_found"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", health.liveness, name="health"),
    path("health/ready", health.readiness, name="health-ready"),
    path("v1/", include("apps.gateway.urls")),
    path("api/", RedirectView.as_view(url="/api/v1/", permanent=False)),
    path("api/v1/", include("llmplatform.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api-auth/", include("rest_framework.urls")),
    # Admin and API-docs assets, found in the installed apps (no collectstatic needed). A proxy in
    # front may serve STATIC_ROOT (filled by collectstatic) instead.
    re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}),
]
