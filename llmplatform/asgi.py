"""ASGI entry point.

The OpenAI endpoints (``/v1/``) and health checks go to a Django handler without the
middleware stack: they authenticate by API key, set no cookies and need no CSRF, sessions or
messages, and each of those middlewares would cost two thread hops on every request (a few
milliseconds of time to first token). Everything else (admin, management API) gets the full
stack.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmplatform.settings")
django_asgi_app = get_asgi_application()

from llmplatform.logredact import redact_logs  # noqa: E402

redact_logs()  # after Django's and uvicorn's logging are configured

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402

from apps.jobs.routing import websocket_urlpatterns  # noqa: E402
from llmplatform.uploads import upload_size_guard  # noqa: E402

LEAN_PATH_PREFIXES = ("/v1/", "/health")


class LeanASGIHandler(ASGIHandler):
    """Django's ASGI handler with no middleware at all."""

    def load_middleware(self, is_async=False):
        configured = settings.MIDDLEWARE
        settings.MIDDLEWARE = []
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = configured


lean_asgi_app = LeanASGIHandler()


async def http_application(scope, receive, send):
    if scope["path"].startswith(LEAN_PATH_PREFIXES):
        return await lean_asgi_app(scope, receive, send)
    return await django_asgi_app(scope, receive, send)


application = ProtocolTypeRouter({
    "http": upload_size_guard(http_application),
    "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
})
