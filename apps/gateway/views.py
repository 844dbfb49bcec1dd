"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from apps.gateway import validation
from apps.gateway.dispatch import node_pick, request_events, request_release, request_send, spawn
from apps.gateway.errors import OpenAIError, broker_unavailable, invalid_api_key, model_not_found
from apps.gateway.history import RequestRecord
from apps.gateway.models import ApiKey, RequestStatus
from apps.gateway.selectors import api_key_check
from apps.gateway.services import api_key_touch
from apps.gateway.sse import DONE, sse_frame, sse_response
from apps.gateway.upstream import upstream_serve
from apps.models.models import RegisteredModel
from apps.models.selectors import model_get_active, model_list_active
from workers import protocol

logger = logging.getLogger(__name__)


async def _authenticate(request: HttpRequest, record: RequestRecord) -> ApiKey:
    scheme, _, raw_key = request.headers.get("Authorization", "").partition(" ")
    check = await api_key_check(raw_key=raw_key.strip() if scheme.lower() == "bearer" else "")
    if check.key is None:
        raise invalid_api_key(check.problem)
    record.identify(check.key)
    spawn(api_key_touch(key=check.key))
    return check.key


def _body(request: HttpRequest) -> bytes:
    try:
        return request.body
    except RequestDataTooBig:
        raise OpenAIError(413, f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.",
                          code="request_too_large") from None


def _failed(record: RequestRecord, error: OpenAIError) -> JsonResponse:
    """Record the failure and answer it; the X-Request-Id finds the history row."""
    record.fail(error)
    response = error.response()
    response["X-Request-Id"] = str(record.id)
    return response


def _method_not_allowed(allowed: str) -> OpenAIError:
    return OpenAIError(405, f"Method not allowed; use {allowed}.", code="method_not_allowed")


class _Generation:
    """One request in flight on a node, from the gateway's point of view."""

    def __init__(self, valid: validation.ValidRequest, model: RegisteredModel, record: RequestRecord) -> None:
        self.valid, self.model, self.record = valid, model, record
        self.request_id = record.id.hex
        self.created = int(time.time())
        self.node = None
        self.events: AsyncIterator | None = None
        self.finished = False

    @property
    def chat(self) -> bool:
        return self.valid.kind == protocol.KIND_CHAT

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    async def start(self) -> None:
        self.node, reason = await node_pick(self.model)
        self.record.open(model=self.model.id, node=self.node.name, placement=reason, stream=self.valid.stream,
                         request_body=self.valid.body)
        incarnation = await request_send(request_id=self.request_id, kind=self.valid.kind, model=self.model,
                                         params=self.valid.params, node=self.node)
        self.events = request_events(self.request_id, self.node.name, incarnation)

    async def next_output(self) -> tuple[str, dict]:
        """The next event that carries output (token, done or error), skipping bookkeeping ones."""
        async for event, data in self.events:
            if event == protocol.EVENT_ERROR:
                raise OpenAIError.from_event(data)
            if event in (protocol.EVENT_TOKEN, protocol.EVENT_DONE):
                if event == protocol.EVENT_TOKEN:
                    self.record.first_token()
                return event, data
        raise OpenAIError(502, "The request stream ended without a result.", code="stream_ended", type="server_error")

    def release(self) -> None:
        """Free the node's slot; tell the worker to stop if the answer was not complete."""
        if self.node is not None:
            spawn(request_release(request_id=self.request_id, node=self.node, cancel=not self.finished))
            self.node = None


async def _serve(request: HttpRequest, parse) -> HttpResponse:
    """The lifecycle every inference endpoint shares: authenticate, validate, dispatch, answer."""
    record = RequestRecord(method=request.method, path=request.path)
    generation = None
    try:
        if request.method != "POST":
            raise _method_not_allowed("POST")
        await _authenticate(request, record)
        valid = parse(validation.parse_json(_body(request)))
        record.fields["model"] = valid.model
        model = await model_get_active(model_id=valid.model)
        if model is None:
            raise model_not_found(valid.model)
        if model.is_external:  # served by another OpenAI-compatible server, not by a node
            return await upstream_serve(valid, model, record)
        generation = _Generation(valid, model, record)
        await generation.start()
        first = await generation.next_output()
        if valid.stream:
            response = sse_response(_sse(generation, first))
            response["X-Request-Id"] = str(generation.record.id)
            generation = None  # the stream owns it from here
            return response
        body = await _collect(generation, first)
        response = JsonResponse(body)
        response["X-Request-Id"] = str(generation.record.id)
        return response
    except OpenAIError as error:
        return _failed(record, error)
    except asyncio.CancelledError:  # the client went away
        record.close(status=RequestStatus.CANCELLED, status_code=499)
        raise
    except RedisError as exc:
        logger.error("%s %s: Redis failed: %s", request.method, request.path, exc)
        return _failed(record, broker_unavailable())
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return _failed(record, OpenAIError(500, "The server failed while handling the request.",
                                           code="internal_error", type="server_error"))
    finally:
        if generation is not None:
            generation.release()


def _chunk(generation: _Generation, choice: dict | None, usage: dict | None = None) -> bytes:
    payload = {
        "id": generation.response_id,
        "object": "chat.completion.chunk" if generation.chat else "text_completion",
        "created": generation.created,
        "model": generation.model.id,
        "system_fingerprint": None,
        "choices": [choice] if choice is not None else [],
    }
    if generation.valid.include_usage:
        payload["usage"] = usage
    return sse_frame(payload)


def _choice(generation: _Generation, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict:
    if not generation.chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    delta = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


async def _sse(generation: _Generation, first: tuple[str, dict]) -> AsyncIterator[bytes]:
    """Server-sent events framed as OpenAI frames them, ending with ``data: [DONE]``."""
    record = generation.record
    parts: list[str] = []
    try:
        if generation.chat:
            yield _chunk(generation, _choice(generation, "", None, role=True))
        event, data = first
        while True:
            if event == protocol.EVENT_TOKEN:
                parts.append(data["text"])
                yield _chunk(generation, _choice(generation, data["text"], None))
            elif event == protocol.EVENT_DONE:
                generation.finished = True
                closing_text = None if generation.chat else ""
                yield _chunk(generation, _choice(generation, closing_text, data["finish_reason"]))
                if generation.valid.include_usage:
                    yield _chunk(generation, None, data["usage"])
                yield DONE
                record.close(status=RequestStatus.SUCCEEDED, status_code=200, usage=data["usage"],
                             response_body={"text": "".join(parts), "finish_reason": data["finish_reason"],
                                            "usage": data["usage"]})
                return
            try:
                event, data = await generation.next_output()
            except OpenAIError as error:  # not finished: the worker is told to stop, if it still runs
                yield sse_frame(error.body())
                record.fail(error)
                return
    finally:
        if not generation.finished:
            record.close(status=RequestStatus.CANCELLED, status_code=499,
                         response_body={"text": "".join(parts), "finish_reason": None})
        generation.release()


async def _collect(generation: _Generation, first: tuple[str, dict]) -> dict:
    """The whole answer of a non-streamed request, in OpenAI's response shape."""
    parts: list[str] = []
    event, data = first
    while event == protocol.EVENT_TOKEN:
        parts.append(data["text"])
        event, data = await generation.next_output()
    generation.finished = True
    valid, usage = generation.valid, data.get("usage")
    if valid.kind == protocol.KIND_EMBEDDING:
        body = {"object": "list", "data": data["data"], "model": generation.model.id, "usage": usage}
        logged = {"object": "list", "count": len(data["data"]), "usage": usage}
    else:
        text = "".join(parts)
        if generation.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": data["finish_reason"]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": data["finish_reason"]}
        body = {
            "id": generation.response_id,
            "object": "chat.completion" if generation.chat else "text_completion",
            "created": generation.created, "model": generation.model.id, "system_fingerprint": None,
            "choices": [choice], "usage": usage,
        }
        logged = body
    generation.record.close(status=RequestStatus.SUCCEEDED, status_code=200, usage=usage, response_body=logged)
    return body


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await _serve(request, validation.chat_request)


@csrf_exempt
async def completions(request: HttpRequest) -> HttpResponse:
    return await _serve(request, validation.completion_request)


@csrf_exempt
async def embeddings(request: HttpRequest) -> HttpResponse:
    return await _serve(request, validation.embedding_request)


def _model_object(model: RegisteredModel) -> dict:
    return {"id": model.id, "object": "model", "created": int(model.created_at.timestamp()),
            "owned_by": model.owned_by}


async def _serve_read(request: HttpRequest, produce) -> HttpResponse:
    record = RequestRecord(method=request.method, path=request.path)
    try:
        if request.method != "GET":
            raise _method_not_allowed("GET")
        await _authenticate(request, record)
        body = await produce()
    except OpenAIError as error:
        return _failed(record, error)
    record.close(status=RequestStatus.SUCCEEDED, status_code=200, response_body=body)
    response = JsonResponse(body)
    response["X-Request-Id"] = str(record.id)
    return response


async def models_list(request: HttpRequest) -> HttpResponse:
    async def produce() -> dict:
        return {"object": "list", "data": [_model_object(m) async for m in model_list_active()]}

    return await _serve_read(request, produce)


async def model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    async def produce() -> dict:
        model = await model_get_active(model_id=model_id)
        if model is None:
            raise model_not_found(model_id)
        return _model_object(model)

    return await _serve_read(request, produce)


@csrf_exempt
async def unknown_path(request: HttpRequest, path: str) -> HttpResponse:
    return OpenAIError(404, f"Invalid URL ({request.method} {request.path}).", code="unknown_url").response()
