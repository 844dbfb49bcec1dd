"""Recording one /v1 request in the request history, without delaying the response.

The row is inserted as soon as the request is understood (so a request is on record even if
the gateway dies mid-stream) and completed when it ends, both in the background.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from django.conf import settings
from django.utils import timezone

from apps.gateway.errors import OpenAIError
from apps.gateway.models import ApiKey, RequestLog, RequestStatus
from llmplatform.background import spawn

# Fields of a /v1 body that carry what the client wrote: prompts, message contents, inputs.
_CLIENT_TEXT = ("messages", "prompt", "input")


def _length_only(value):
    """Every string inside ``value`` replaced by its length; the structure (roles, types) kept."""
    if isinstance(value, str):
        return f"[{len(value)} characters]"
    if isinstance(value, list):
        return [_length_only(item) for item in value]
    if isinstance(value, dict):
        return {key: (item if key in ("role", "type", "name") else _length_only(item)) for key, item in value.items()}
    return value


def _kept_request(body):
    """The request body as ``LLMP_REQUEST_LOG_BODIES`` says history keeps it."""
    policy = settings.LLMP_REQUEST_LOG_BODIES
    if policy == "full" or not isinstance(body, dict):
        return body if policy == "full" else None
    if policy == "metadata":
        return {key: value for key, value in body.items() if key not in _CLIENT_TEXT}
    return {key: (_length_only(value) if key in _CLIENT_TEXT else value) for key, value in body.items()}


_ANSWER_TEXT = ("text", "content", "refusal")  # where an answer carries generated text, at any depth


def _answer_without_text(value, *, drop: bool):
    if isinstance(value, list):
        return [_answer_without_text(item, drop=drop) for item in value]
    if isinstance(value, dict):
        return {key: (_length_only(item) if key in _ANSWER_TEXT else _answer_without_text(item, drop=drop))
                for key, item in value.items() if not (drop and key in _ANSWER_TEXT)}
    return value


def _kept_response(body):
    """The answer as history keeps it: its text redacted or dropped (error bodies, our own words, stay whole)."""
    policy = settings.LLMP_REQUEST_LOG_BODIES
    if policy == "full" or not isinstance(body, dict):
        return body
    return _answer_without_text(body, drop=policy == "metadata")


class RequestRecord:
    def __init__(self, *, method: str, path: str) -> None:
        self.id = uuid.uuid4()
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.fields: dict = {"method": method, "path": path}
        self._insert = None
        self._closing = None
        self._closed = False

    def _ms_since_start(self, moment: float) -> float:
        return round((moment - self.started) * 1000, 3)

    def identify(self, key: ApiKey) -> None:
        self.fields.update(api_key_id=key.pk, user_id=key.user_id)

    def open(self, **fields) -> None:
        """The request is valid and about to be served: put it on record now."""
        if "request_body" in fields:
            fields["request_body"] = _kept_request(fields["request_body"])
        self.fields.update(fields)
        self._insert = spawn(RequestLog.objects.acreate(id=self.id, **self.fields))

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def close(self, *, status: str, status_code: int, response_body=None, error: OpenAIError | None = None,
              usage: dict | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        updates = {
            "status": status,
            "status_code": status_code,
            "response_body": error.body() if error is not None else _kept_response(response_body),
            "error_code": (error.code or error.type) if error is not None else "",
            "latency_ms": self._ms_since_start(time.perf_counter()),
            "ttft_ms": self._ms_since_start(self.first_token_at) if self.first_token_at else None,
            "finished_at": timezone.now(),
        }
        if usage:
            updates.update(prompt_tokens=usage.get("prompt_tokens", 0),
                           completion_tokens=usage.get("completion_tokens", 0))
        self._closing = spawn(self._write(updates))

    async def written(self) -> None:
        """Until the writes started so far are done: for a caller whose event loop ends with the request
        (``async_to_sync``), where a background write would be cut off."""
        pending = [task for task in (self._insert, self._closing) if task is not None]
        if pending:
            await asyncio.wait(pending)

    def fail(self, error: OpenAIError) -> None:
        self.close(status=RequestStatus.FAILED, status_code=error.status, error=error)

    async def _write(self, updates: dict) -> None:
        if self._insert is None:
            await RequestLog.objects.acreate(id=self.id, **self.fields, **updates)
        else:
            await self._insert
            await RequestLog.objects.filter(pk=self.id).aupdate(**updates)
