"""The ASGI guard in front of every HTTP request: credentials, body size and body pace, checked before
Django reads a body.

Django's ASGI handler reads a whole request body (spooling it to a temporary file) before any middleware
or view runs, so neither can refuse a body in time. This guard sees each request first. By route:

==============================  ==============================  ===================================  =========
route                           credentials, for a body         body cap                             errors
==============================  ==============================  ===================================  =========
``/v1/...``                     API key                         ``LLMP_MAX_REQUEST_BYTES``           OpenAI's
``POST /api/v1/models``,        API key or session cookie       ``LLMP_UPLOAD_MAX_BYTES`` + 64 KiB   ``{"error"}``
multipart (an upload)
other ``/api/v1/...``           API key or session cookie       ``LLMP_API_MAX_REQUEST_BYTES``       ``{"error"}``
``/admin/``, ``/api-auth/``     none (their own login forms)    ``LLMP_API_MAX_REQUEST_BYTES``       ``{"error"}``
anything else (``/health``,     none                            64 KiB                               ``{"error"}``
``/static/``, ``/api/docs/``)
==============================  ==============================  ===================================  =========

* A body over the cap is a 413, at once when its Content-Length says so, else as soon as the bytes
  received pass the cap. Each ``receive()`` of a body waits at most ``LLMP_BODY_RECEIVE_TIMEOUT``
  seconds; a body that stalls longer is a 408. Both close the connection.
* A bearer key on ``/v1`` and ``/api/v1`` is checked here, once, and the check is left in the scope
  (``llmplatform.authentication.SCOPE_KEY_CHECK``) for the views. A request with a body and no good
  credentials never has its body read: on ``/api/v1`` the guard answers the 401; on ``/v1`` the view
  gets the request with an empty body and answers (and records) the 401 itself, and the connection
  closes after it.
* ``LLMP_AUTH_FAILURE_LIMIT`` refused keys from one client address within ``LLMP_AUTH_FAILURE_WINDOW``
  seconds block the address on ``/v1`` and ``/api/v1`` (429, with Retry-After) until the window ends.
  Failures are counted in Redis, so every gateway process sees them; each process keeps the addresses
  it found blocked, so a request with a good key costs no Redis command.

The checks query the database on the request's own sync thread (the ``ThreadSensitiveContext`` Django's
handler then reuses), so the connection they open is the one the view uses. ``llmplatform.asgi`` keeps
Django from closing it when the request starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import cache

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import connections
from django.http.cookie import parse_cookie
from redis.exceptions import RedisError

from llmplatform.aioredis import redis_client
from llmplatform.authentication import SCOPE_KEY_CHECK, api_key_checker, session_user
from llmplatform.epochs import epochs_request

logger = logging.getLogger(__name__)

UPLOAD_PATHS = frozenset({"/api/v1/models", "/api/v1/models/"})
# Room for the multipart boundaries and part headers around an uploaded file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Body cap of the routes that take no credentials and no forms: health checks, static files, API docs.
PUBLIC_MAX_BODY_BYTES = 64 * 1024

OPENAI, MANAGEMENT = "openai", "management"  # the two error shapes
NO_CREDENTIALS = "Authentication credentials were not provided."
_DISCONNECT = {"type": "http.disconnect"}


@dataclass(frozen=True)
class Route:
    shape: str  # OPENAI or MANAGEMENT: how the guard's own answers look
    needs_credentials: bool
    max_body: int
    too_large: str  # the 413's message


@cache
def _routes() -> dict[str, Route]:
    """The routes, built once per process from the settings."""
    api_limit, upload_limit = settings.LLMP_API_MAX_REQUEST_BYTES, settings.LLMP_UPLOAD_MAX_BYTES
    api_too_large = f"Request body too large: the limit is {api_limit} bytes (LLMP_API_MAX_REQUEST_BYTES)"
    return {
        "v1": Route(OPENAI, True, settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
                    f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes "
                    "(LLMP_MAX_REQUEST_BYTES)."),
        "upload": Route(MANAGEMENT, True, upload_limit + MULTIPART_OVERHEAD_BYTES,
                        f"File too large: the limit is {upload_limit} bytes (LLMP_UPLOAD_MAX_BYTES)"),
        "api": Route(MANAGEMENT, True, api_limit, api_too_large),
        "forms": Route(MANAGEMENT, False, api_limit, api_too_large),
        "public": Route(MANAGEMENT, False, PUBLIC_MAX_BODY_BYTES,
                        f"Request body too large: the limit here is {PUBLIC_MAX_BODY_BYTES} bytes"),
    }


def route_of(scope: dict, content_type: bytes) -> Route:
    """What the guard requires of a request, from its path (and, for uploads, its method and body type)."""
    path, routes = scope["path"], _routes()
    if path.startswith("/v1/"):
        return routes["v1"]
    if path.startswith("/api/v1/"):
        if scope["method"] == "POST" and path in UPLOAD_PATHS and content_type.startswith(b"multipart/"):
            return routes["upload"]
        return routes["api"]
    if path.startswith(("/admin/", "/api-auth/")):
        return routes["forms"]
    return routes["public"]


def request_guard(app):
    """Wrap an ASGI application's HTTP requests in the guard; other connection types pass through."""

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        async with ThreadSensitiveContext():
            with epochs_request():
                await _Exchange(scope, receive, send).serve(app)

    return guarded


class _Exchange:
    """One HTTP request on its way through the guard."""

    def __init__(self, scope: dict, receive, send) -> None:
        self.scope, self._receive, self._send = scope, receive, send
        self.declared: int | None = None
        chunked = False
        content_type = self.authorization = self.cookie = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                self.declared = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"authorization":
                self.authorization = value
            elif name == b"cookie":
                self.cookie = value
            elif name == b"content-type":
                content_type = value.lower()
        # HTTP/1.x frames a body by Content-Length or chunked encoding; an HTTP/2 request need do neither.
        self.has_body = bool(self.declared) or chunked or (self.declared is None and scope["http_version"] == "2")
        self.route = route_of(scope, content_type)
        self.address = (scope.get("client") or ("",))[0]
        self.received = 0
        self.body_delivered = False  # the app got a final body message, so Django serves the request to its end
        self.withheld = False  # the body stays unread: the app gets an empty one
        self.refusal: tuple[int, str, str] | None = None  # found while the app read the body
        self.touched_database = False

    async def serve(self, app) -> None:
        try:
            await self._serve(app)
        finally:
            if self.touched_database and not self.body_delivered:
                # Django closes the request's connections when it ends a request it served, not when it gives
                # up on a body (or never got the request): close the one the checks opened.
                await sync_to_async(connections.close_all)()

    async def _serve(self, app) -> None:
        route, scope = self.route, self.scope
        if route.needs_credentials:
            blocked_for = auth_blocked_for(self.address)
            if blocked_for:
                return await self.answer(429, "Too many failed authentications from this address; retry later.",
                                         "rate_limit_exceeded", [(b"retry-after", str(math.ceil(blocked_for)).encode())])
        if self.declared is not None and self.declared > route.max_body:
            return await self.answer(413, route.too_large, "request_too_large")
        if route.needs_credentials:
            try:
                scope = await self._check_credentials()
            except Exception:
                logger.exception("%s %s: checking the credentials failed", scope["method"], scope["path"])
                return await self.answer(500, "The server failed while checking the credentials.", "internal_error")
            if scope is None:
                return
        await app(scope, self.receive, self.send_closing if self.withheld else self._send)
        if self.refusal is not None:  # the app stopped at the disconnect it was told of, answering nothing
            await self.answer(*self.refusal)

    async def _check_credentials(self) -> dict | None:
        """The scope to hand on, with the key check in it; None when the guard answered the request."""
        scope = self.scope
        scheme, _, raw_key = self.authorization.decode("latin-1").partition(" ")
        raw_key = raw_key.strip() if scheme.lower() == "bearer" else ""
        if raw_key or self.route.shape == OPENAI:  # /v1 checks even no key, to say why it needs one
            self.touched_database = bool(raw_key)
            check = await api_key_checker()(raw_key=raw_key)
            scope = {**scope, SCOPE_KEY_CHECK: check}
            if check.key is None:
                if raw_key:
                    await auth_failure_count(self.address)
                if self.has_body and self.route.shape == OPENAI:
                    self.withheld = True  # the view refuses the key before it reads a body
                elif self.has_body:
                    await self.answer(401, check.problem, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
                    return None
        elif self.has_body and not await self._session_is_authenticated():
            await self.answer(401, NO_CREDENTIALS, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return None
        return scope

    async def _session_is_authenticated(self) -> bool:
        session_key = parse_cookie(self.cookie.decode("latin-1")).get(settings.SESSION_COOKIE_NAME)
        if not session_key:
            return False
        self.touched_database = True
        return await session_user(session_key=session_key) is not None

    async def receive(self) -> dict:
        if self.refusal is not None:
            return _DISCONNECT
        if self.withheld:
            if self.body_delivered:  # Django listens for a disconnect until its response is sent
                await asyncio.get_running_loop().create_future()
            self.body_delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.body_delivered:  # after the body: the app listens for a disconnect, however long it answers
            return await self._receive()
        try:
            async with asyncio.timeout(settings.LLMP_BODY_RECEIVE_TIMEOUT):
                message = await self._receive()
        except TimeoutError:
            self.refusal = (408, f"The request body stalled for {settings.LLMP_BODY_RECEIVE_TIMEOUT:g} s "
                                 "(LLMP_BODY_RECEIVE_TIMEOUT).", "request_timeout")
            return _DISCONNECT
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.route.max_body:
                self.refusal = (413, self.route.too_large, "request_too_large")
                return _DISCONNECT
            self.body_delivered = not message.get("more_body", False)
        return message

    async def send_closing(self, message: dict) -> None:
        """The app's response, closing the connection afterwards: the body it did not read stays unread."""
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        await self._send(message)

    async def answer(self, status: int, message: str, code: str, headers: tuple | list = ()) -> None:
        """The guard's own answer, in the route's error shape; the connection closes after it."""
        if self.route.shape == OPENAI:
            kind = {429: "requests", 500: "server_error"}.get(status, "invalid_request_error")
            error = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        else:
            error = {"error": message}
        body = json.dumps(error).encode()
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode()),
                                      (b"connection", b"close"), *headers]})
        await self._send({"type": "http.response.body", "body": body})


# Addresses this process found over the failure limit, and when (time.monotonic()) their block ends.
_blocked_until: dict[str, float] = {}


def auth_blocked_for(address: str) -> float:
    """Seconds until ``address`` may authenticate again; 0 when it may now. No Redis command."""
    until = _blocked_until.get(address)
    if until is None:
        return 0.0
    left = until - time.monotonic()
    if left <= 0:
        del _blocked_until[address]
        return 0.0
    return left


async def auth_failure_count(address: str) -> None:
    """Count a refused key from ``address`` in Redis (shared by every gateway process), and block the
    address here once the count reaches ``LLMP_AUTH_FAILURE_LIMIT``. Without Redis, count nothing."""
    limit, window = settings.LLMP_AUTH_FAILURE_LIMIT, settings.LLMP_AUTH_FAILURE_WINDOW
    if not limit or not address:
        return
    key = f"{settings.LLMP_REDIS_PREFIX}:auth-failures:{address}"
    try:
        async with redis_client().pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=window, nx=True)  # the window starts at the first failure
            pipe.incr(key)
            pipe.pttl(key)
            _, failures, left_ms = await pipe.execute()
    except (RedisError, OSError) as exc:
        logger.warning("Could not count a failed authentication from %s: Redis failed: %s", address, exc)
        return
    if failures >= limit:
        left = left_ms / 1000 if left_ms > 0 else window
        now = time.monotonic()
        for stale in [blocked for blocked, until in _blocked_until.items() if until <= now]:
            del _blocked_until[stale]
        _blocked_until[address] = now + left  # ends with the window's count in Redis
        logger.warning("%s failed authentications from %s within %s s: refused for %.1f s",
                       failures, address, window, left)
