"""Recording one /v1 request in the request history, without delaying the response.

The row is inserted as soon as the request is understood (so a request is on record even if
the gateway dies mid-stream) and completed when it ends, both in the background. The writes of
every request on an event loop go through one writer, which applies what has gathered since its
last batch in one transaction: a burst of requests costs a few commits, not two each, and its writes
do not queue one by one in front of the requests that follow. The writer runs detached from the
request that started it (``spawn(detached=True)``), so its batches share one long-lived database thread
and connection instead of opening a connection on each starting request's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.gateway.errors import OpenAIError
from apps.gateway.models import ApiKey, RequestLog, RequestStatus
from llmplatform.background import spawn

logger = logging.getLogger(__name__)

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


@dataclass
class _Write:
    """One row's pending write: its insert (``create``, all its fields) and/or its completion (``update``)."""

    row_id: uuid.UUID
    create: dict | None = None
    update: dict | None = None
    done: list[asyncio.Future] = field(default_factory=list)


def _apply(writes: list[_Write]) -> list[BaseException | None]:
    """Apply a batch in one transaction; if that fails, each write alone, so one bad row loses only itself."""
    try:
        with transaction.atomic():
            _apply_all(writes)
        return [None] * len(writes)
    except Exception:
        logger.exception("writing %d request history rows in one batch failed; writing them one by one", len(writes))
    outcomes: list[BaseException | None] = []
    for write in writes:
        try:
            with transaction.atomic():
                _apply_all([write])
            outcomes.append(None)
        except Exception as exc:
            logger.exception("writing request history row %s failed", write.row_id)
            outcomes.append(exc)
    return outcomes


def _apply_all(writes: list[_Write]) -> None:
    creates = [RequestLog(id=w.row_id, **w.create, **(w.update or {})) for w in writes if w.create is not None]
    if creates:
        RequestLog.objects.bulk_create(creates)
    for write in writes:
        if write.create is None and write.update:
            RequestLog.objects.filter(pk=write.row_id).update(**write.update)


class _HistoryWriter:
    """The request history writes of one event loop, applied in batches (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[uuid.UUID, _Write] = {}
        self._task: asyncio.Task | None = None

    def submit(self, row_id: uuid.UUID, *, create: dict | None = None, update: dict | None = None) -> asyncio.Future:
        """Queue a row's insert or completion; the future is done once the write is over (see ``_settle``)."""
        write = self._pending.get(row_id)
        if write is None:
            write = self._pending[row_id] = _Write(row_id)
        if create is not None:
            write.create = create
        if update is not None:
            write.update = {**(write.update or {}), **update}
        future = asyncio.get_running_loop().create_future()
        write.done.append(future)
        if self._task is None or self._task.done():
            self._task = spawn(self._run(), detached=True)
        return future

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = list(self._pending.values()), {}
            try:
                outcomes = await sync_to_async(_apply)(batch)
            except BaseException as exc:  # the event loop is closing, or the database thread failed
                _settle(batch, [exc] * len(batch))
                raise
            _settle(batch, outcomes)


def _settle(batch: list[_Write], outcomes: list[BaseException | None]) -> None:
    """Each write's futures resolve to None, or to the exception that lost it (they never raise: the
    failure is logged where it happened, and a waiter only needs to know the write is over)."""
    for write, outcome in zip(batch, outcomes):
        for future in write.done:
            if not future.done():
                future.set_result(outcome)


_writers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _HistoryWriter] = weakref.WeakKeyDictionary()


def _writer() -> _HistoryWriter:
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        writer = _writers[loop] = _HistoryWriter()
    return writer


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
        self._insert = _writer().submit(self.id, create=dict(self.fields))

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
        if self._insert is None:  # never opened (refused early): one insert of everything
            self._closing = _writer().submit(self.id, create={**self.fields, **updates})
        else:
            self._closing = _writer().submit(self.id, update=updates)

    async def written(self) -> None:
        """Until the writes started so far are done: for a caller whose event loop ends with the request
        (``async_to_sync``), where a background write would be cut off."""
        pending = [task for task in (self._insert, self._closing) if task is not None]
        if pending:
            await asyncio.wait(pending)

    def fail(self, error: OpenAIError) -> None:
        self.close(status=RequestStatus.FAILED, status_code=error.status, error=error)
