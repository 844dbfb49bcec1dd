"""Server-sent events: the frames and the response of every event stream (/v1 answers, job events).

Frames are built as bytes, because the /v1 streams send one per token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable

from django.http import StreamingHttpResponse

DONE = b"data: [DONE]\n\n"  # OpenAI's end of a streamed answer
KEEP_ALIVE = b": keep-alive\n\n"  # a comment: keeps proxies from closing an idle stream


def _json_bytes(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sse_frame(data: dict | bytes, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One event whose data is ``data`` as compact JSON (or these bytes, one ``data:`` line per line)."""
    if isinstance(data, bytes):
        body = data.replace(b"\n", b"\ndata: ")
    else:
        body = _json_bytes(data)
    if event is None and event_id is None:
        return b"data: " + body + b"\n\n"
    fields = (f"id: {event_id}\n" if event_id is not None else "") + (f"event: {event}\n" if event is not None else "")
    return fields.encode() + b"data: " + body + b"\n\n"


def sse_response(frames: AsyncIterable[bytes]) -> StreamingHttpResponse:
    """A response that sends ``frames`` as they come: not cached, not buffered by a proxy."""
    response = StreamingHttpResponse(frames, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
