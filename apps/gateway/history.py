"""Recording one /v1 request in the request history, without delaying the response.

The row is inserted as soon as the request is understood (so a request is on record even if
the gateway dies mid-stream) and completed when it ends, both in the background.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from django.utils import timezone

from apps.gateway.errors import OpenAIError
from apps.gateway.models import ApiKey, RequestLog, RequestStatus
from llmplatform.background import spawn


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
            "response_body": error.body() if error is not None else response_body,
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
