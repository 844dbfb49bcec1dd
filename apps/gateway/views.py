"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from apps.gateway import validation
from apps.gateway.errors import OpenAIError, broker_unavailable, invalid_api_key, model_not_found
from apps.gateway.history import RequestRecord
from apps.gateway.inference import Generation, generation_collect, generation_stream
from apps.gateway.lookups import lookup_model
from apps.gateway.models import ApiKey, RequestStatus
from apps.gateway.selectors import api_key_check
from apps.gateway.services import api_key_touch
from apps.gateway.upstream import upstream_serve
from apps.models.models import RegisteredModel
from apps.models.selectors import model_get_active, model_list_active
from llmplatform.authentication import guard_key_check
from llmplatform.background import spawn
from llmplatform.errors import BROKER_ERRORS
from llmplatform.sse import sse_response

logger = logging.getLogger(__name__)


async def _authenticate(request: HttpRequest, record: RequestRecord) -> ApiKey:
    check = guard_key_check(request)  # the ASGI guard checked the key before the body was read
    if check is None:
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
        model = await lookup_model(model_id=valid.model)
        if model is None:
            raise model_not_found(valid.model)
        if model.is_external:  # served by another OpenAI-compatible server, not by a node
            return await upstream_serve(valid, model, record)
        generation = Generation(valid, model, record)
        await generation.start()
        first = await generation.next_output()
        if valid.stream:
            response = sse_response(generation_stream(generation=generation, first=first))
            response["X-Request-Id"] = str(generation.record.id)
            generation = None  # the stream owns it from here
            return response
        body = await generation_collect(generation=generation, first=first)
        response = JsonResponse(body)
        response["X-Request-Id"] = str(generation.record.id)
        return response
    except OpenAIError as error:
        return _failed(record, error)
    except asyncio.CancelledError:  # the client went away
        record.close(status=RequestStatus.CANCELLED, status_code=499)
        raise
    except BROKER_ERRORS as exc:
        logger.error("%s %s: Redis failed: %s", request.method, request.path, exc)
        return _failed(record, broker_unavailable())
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return _failed(record, OpenAIError(500, "The server failed while handling the request.",
                                           code="internal_error", type="server_error"))
    finally:
        if generation is not None:
            generation.release()


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
