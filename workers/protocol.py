"""The wire between gateway and worker: one Redis stream per request, plus a cancel flag.

Why Redis Streams: a stream is an append-only log with ids, so the gateway can start
reading after the worker has written (it reads from id 0), every entry arrives exactly once
and in order, and nothing is lost if the reader is briefly slow. Pub/sub would drop tokens
published before the gateway subscribes; a list would need one BLPOP per token and could
not be re-read. The stream expires on its own, so an abandoned request leaves nothing.

Entries carry two fields: ``t`` (the event type) and ``d`` (JSON).
"""

from __future__ import annotations

import json
from typing import Any

STREAM_TTL_SECONDS = 600

# What a request asks the worker to do.
KIND_CHAT = "chat"
KIND_COMPLETION = "completion"
KIND_EMBEDDING = "embedding"

EVENT_START = "start"  # the worker picked the request up: {"node": name}
EVENT_TOKEN = "token"  # one piece of generated text: {"text": str}
EVENT_DONE = "done"  # generation ended: {"finish_reason", "usage", and "data" for embeddings}
EVENT_ERROR = "error"  # the request failed: {"message", "code", "type", "status"}
# The worker stopped because the client left: {"tokens_emitted", "at" (unix time)}. Nobody
# waits for it; it records when and where generation stopped, for operators and tests.
EVENT_CANCELLED = "cancelled"


def stream_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:req:{request_id}:events"


def cancel_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:req:{request_id}:cancel"


def encode(event: str, data: dict[str, Any]) -> dict[str, str]:
    return {"t": event, "d": json.dumps(data, separators=(",", ":"))}


def decode(fields: dict) -> tuple[str, dict[str, Any]]:
    event = fields[b"t"] if b"t" in fields else fields["t"]
    data = fields[b"d"] if b"d" in fields else fields["d"]
    if isinstance(event, bytes):
        event = event.decode()
    return event, json.loads(data)


class RequestCancelled(Exception):
    """The client went away; the worker stops generating for it."""


class RequestStream:
    """The worker's side of one request's stream (synchronous Redis client)."""

    def __init__(self, redis, prefix: str, request_id: str) -> None:
        self._redis = redis
        self._key = stream_key(prefix, request_id)
        self._cancel_key = cancel_key(prefix, request_id)
        self.tokens_emitted = 0

    def cancelled(self) -> bool:
        return bool(self._redis.exists(self._cancel_key))

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Append one event, refreshing the stream's expiry."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._key, encode(event, data))
        pipe.expire(self._key, STREAM_TTL_SECONDS)
        pipe.execute()

    def emit_token(self, text: str) -> None:
        """Append one token and learn in the same round trip whether the client left."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._key, encode(EVENT_TOKEN, {"text": text}))
        pipe.exists(self._cancel_key)
        _, cancelled = pipe.execute()
        self.tokens_emitted += 1
        if cancelled:
            raise RequestCancelled()
