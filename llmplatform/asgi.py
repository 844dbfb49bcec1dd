"""ASGI entry point.

The OpenAI endpoints (``/v1/``) and health checks go to a Django handler without the
middleware stack: they authenticate by API key, set no cookies and need no CSRF, sessions or
messages, and each of those middlewares would cost two thread hops on every request (a few
milliseconds of time to first token). Everything else (admin, management API) gets the full
stack. Every HTTP request passes the guard of ``llmplatform.request_guard`` first: credentials,
body size and body pace, checked before Django reads the body.
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
from django.core.signals import request_started  # noqa: E402
from django.db import close_old_connections, reset_queries  # noqa: E402

from apps.jobs.routing import websocket_urlpatterns  # noqa: E402
from llmplatform.request_guard import request_guard  # noqa: E402

# Under ASGI each request runs its sync code on a thread of its own (Django's ThreadSensitiveContext),
# so when a request starts there is no old connection to close, only the one the guard's key check
# just opened for the view to use: reopening it would cost a new connection per request (about 1 ms
# on SQLite). Connections still close when the request finishes.
request_started.disconnect(close_old_connections)
# Django's other request_started receiver empties the query logs (kept under DEBUG) of the connections of
# this thread of execution; a request's connections are new (its context's own) and have logged nothing.
# With a receiver left, every request would start with a hop to a thread and back (signals.asend runs
# sync receivers through sync_to_async), a few milliseconds of time to first token under load.
request_started.disconnect(reset_queries)

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
    "http": request_guard(http_application),
    "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
})
