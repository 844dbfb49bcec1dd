"""An ASGI guard that holds model uploads to ``LLMP_UPLOAD_MAX_BYTES`` before Django reads them.

Django's ASGI handler reads a whole request body (spooled to a temporary file) before any view
runs, so a view cannot refuse an oversized upload in time. This guard answers 413 at once when
the declared Content-Length is too large, and stops reading a body (chunked, or lying about its
length) as soon as it passes the limit.
"""

from __future__ import annotations

import json

from django.conf import settings

UPLOAD_PATHS = frozenset({"/api/v1/models", "/api/v1/models/"})
# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def _too_large_body(limit: int) -> bytes:
    return json.dumps({"error": f"File too large: the limit is {limit} bytes (LLMP_UPLOAD_MAX_BYTES)"}).encode()


async def _send_413(send, limit: int) -> None:
    body = _too_large_body(limit)
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def upload_size_guard(app):
    async def guarded(scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in UPLOAD_PATHS:
            return await app(scope, receive, send)
        limit = settings.LLMP_UPLOAD_MAX_BYTES
        allowed = limit + MULTIPART_OVERHEAD_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > allowed:
            return await _send_413(send, limit)

        state = {"received": 0, "too_large": False, "started": False}

        async def counting_receive():
            if state["too_large"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > allowed:
                    state["too_large"] = True
                    return {"type": "http.disconnect"}  # Django stops reading and answers nothing
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await app(scope, counting_receive, tracking_send)
        if state["too_large"] and not state["started"]:
            await _send_413(send, limit)

    return guarded
