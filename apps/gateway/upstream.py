"""Serving /v1 requests for external models: forwarding them to their upstream OpenAI-compatible server.

The body goes upstream as the client sent it (after the same validation as for a local model),
with ``model`` replaced by the upstream's name and the upstream's API key as the bearer; the
answer comes back with ``model`` set to our id, streamed chunk by chunk as it arrives. The
client's own key never leaves the gateway, and the upstream's key is decrypted only here.

Upstream failures become OpenAI errors (``upstream_error``): a 4xx other than 401/403 is the
client's to fix and passes through with the upstream's status and message; a refused key
(401/403) is the operator's to fix and becomes 502 ``upstream_auth_failed``; an upstream 5xx
becomes 502 ``upstream_error``; an upstream that cannot be reached, 502
``upstream_unavailable``; one that does not answer in time, 504 ``upstream_timeout``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.http import HttpResponse, JsonResponse

from apps.gateway.errors import OpenAIError
from apps.gateway.history import RequestRecord
from apps.gateway.models import RequestLog, RequestStatus
from apps.gateway.validation import ValidRequest
from apps.models.models import ExternalEndpoint, RegisteredModel
from apps.models.secrets import SecretUnreadable, secret_decrypt
from llmplatform.sse import DONE, KEEP_ALIVE, sse_frame, sse_response
from workers.protocol import KIND_CHAT, KIND_COMPLETION, KIND_EMBEDDING

logger = logging.getLogger(__name__)

PATHS = {KIND_CHAT: "chat/completions", KIND_COMPLETION: "completions", KIND_EMBEDDING: "embeddings"}
_NODE_MAX_LENGTH = RequestLog._meta.get_field("node").max_length
_ERROR_MESSAGE_MAX_LENGTH = 1000
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def http_client() -> httpx.AsyncClient:
    """One client (and connection pool) per event loop."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        timeout = httpx.Timeout(settings.LLMP_UPSTREAM_TIMEOUT, connect=settings.LLMP_UPSTREAM_CONNECT_TIMEOUT)
        client = _clients[loop] = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None))
    return client


@dataclass(frozen=True)
class _Upstream:
    """Where one external model's requests go, with its key decrypted."""

    model_id: str
    base_url: str
    upstream_model: str
    api_key: str = field(repr=False)

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc

    @property
    def node(self) -> str:
        """What the request history names as the request's node."""
        return f"external:{self.host}"[:_NODE_MAX_LENGTH]

    def url(self, kind: str) -> str:
        return f"{self.base_url}/{PATHS[kind]}"

    def headers(self, request_id: str = "") -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if request_id:
            headers["X-Request-Id"] = request_id
        return headers


async def _upstream_of(model: RegisteredModel) -> _Upstream:
    endpoint = await ExternalEndpoint.objects.filter(model_id=model.id).afirst()
    if endpoint is None:
        raise OpenAIError(503, f"The external model '{model.id}' has no upstream endpoint configured.",
                          code="model_unavailable", type="server_error")
    try:
        api_key = secret_decrypt(endpoint.api_key_encrypted)
    except SecretUnreadable:
        logger.error("the upstream API key of external model %s cannot be decrypted; enter it again", model.id)
        raise OpenAIError(503, f"The upstream API key of '{model.id}' cannot be decrypted on this server; an operator "
                               "must enter it again.", code="upstream_key_unreadable", type="server_error") from None
    return _Upstream(model.id, endpoint.base_url, endpoint.upstream_model, api_key)


def _described(payload: bytes) -> tuple[str, dict]:
    """The message of an upstream's error body, and its OpenAI error object when it has one."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    message, error = None, {}
    if isinstance(data, dict):
        if isinstance(data.get("error"), dict):
            error = data["error"]
            message = error.get("message")
        elif data.get("error") is not None:
            message = data["error"]
        elif data.get("detail") is not None:  # FastAPI's shape
            message = data["detail"]
        elif data.get("message") is not None:
            message = data["message"]
    if message is None:
        message = payload.decode(errors="replace").strip() or "(no message)"
    if not isinstance(message, str):
        message = json.dumps(message, ensure_ascii=False)
    return message[:_ERROR_MESSAGE_MAX_LENGTH], error


def _text_or_none(value) -> str | None:
    return value if isinstance(value, str) and value else None


def upstream_error(status: int, payload: bytes, upstream: _Upstream) -> OpenAIError:
    """The OpenAI error a client gets for an upstream's answer with HTTP ``status`` and body ``payload``."""
    message, error = _described(payload)
    if upstream.api_key:  # an upstream may quote the key it refused
        message = message.replace(upstream.api_key, "[redacted]")
    logger.warning("external model %s: upstream %s answered %s: %s", upstream.model_id, upstream.host, status, message)
    if status in (401, 403):
        return OpenAIError(502, f"The upstream API at {upstream.host} refused the platform's credentials for "
                                f"'{upstream.model_id}' ({status}: {message}). An operator must update the model's "
                                "upstream API key.", code="upstream_auth_failed", type="server_error")
    if 400 <= status < 500:
        return OpenAIError(status, message, code=_text_or_none(error.get("code")) or "upstream_error",
                           param=_text_or_none(error.get("param")),
                           type=_text_or_none(error.get("type")) or "invalid_request_error")
    return OpenAIError(502, f"The upstream API at {upstream.host} failed ({status}): {message}", code="upstream_error",
                       type="server_error")


def _transport_error(exc: httpx.RequestError, upstream: _Upstream) -> OpenAIError:
    if isinstance(exc, httpx.TimeoutException):
        logger.warning("external model %s: upstream %s timed out (%s)", upstream.model_id, upstream.host,
                       type(exc).__name__)
        return OpenAIError(504, f"The upstream API at {upstream.host} did not answer in time ({type(exc).__name__}).",
                           code="upstream_timeout", type="server_error")
    logger.warning("external model %s: upstream %s unreachable: %r", upstream.model_id, upstream.host, exc)
    return OpenAIError(502, f"The upstream API at {upstream.host} cannot be reached ({type(exc).__name__}: {exc}).",
                       code="upstream_unavailable", type="server_error")


async def _post_json(upstream: _Upstream, kind: str, body: dict, request_id: str = "") -> dict:
    try:
        response = await http_client().post(upstream.url(kind), json=body, headers=upstream.headers(request_id))
    except httpx.RequestError as exc:
        raise _transport_error(exc, upstream) from None
    if response.status_code >= 300:
        raise upstream_error(response.status_code, response.content, upstream)
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise OpenAIError(502, f"The upstream API at {upstream.host} answered with something other than a JSON object.",
                          code="upstream_error", type="server_error")
    return answer


def usage_counts(usage) -> dict | None:
    """An upstream's ``usage`` as token counts the request history can store; None if it is not one."""
    if not isinstance(usage, dict):
        return None
    counts = {name: usage.get(name, 0) for name in ("prompt_tokens", "completion_tokens")}
    return counts if all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()) else None


async def upstream_answer(valid: ValidRequest, model: RegisteredModel, record: RequestRecord) -> dict:
    """The upstream's whole answer to a validated, non-streamed request, with ``model`` set to our id.

    The request history is kept here: ``record`` is opened, then closed as succeeded, or failed
    with the OpenAIError that is raised.
    """
    try:
        upstream = await _upstream_of(model)
        record.open(model=model.id, node=upstream.node, stream=False, request_body=valid.body)
        answer = await _post_json(upstream, valid.kind, {**valid.body, "model": upstream.upstream_model},
                                  str(record.id))
    except OpenAIError as error:
        record.fail(error)
        raise
    answer["model"] = model.id
    usage = answer.get("usage")
    if valid.kind == KIND_EMBEDDING:
        data = answer.get("data")
        logged = {"object": "list", "count": len(data) if isinstance(data, list) else None, "usage": usage}
    else:
        logged = answer
    record.close(status=RequestStatus.SUCCEEDED, status_code=200, usage=usage_counts(usage), response_body=logged)
    return answer


async def upstream_serve(valid: ValidRequest, model: RegisteredModel, record: RequestRecord) -> HttpResponse:
    """Answer a validated /v1 request for an external model from its upstream; raises OpenAIError."""
    if valid.stream:
        upstream = await _upstream_of(model)
        record.open(model=model.id, node=upstream.node, stream=True, request_body=valid.body)
        body = {**valid.body, "model": upstream.upstream_model}
        response = sse_response(_relay(await _open_stream(upstream, valid.kind, body, record), upstream, record))
    else:
        response = JsonResponse(await upstream_answer(valid, model, record))
    response["X-Request-Id"] = str(record.id)
    return response


async def _open_stream(upstream: _Upstream, kind: str, body: dict, record: RequestRecord) -> httpx.Response:
    """The upstream's streamed answer, once it has said it will stream one (status and headers read)."""
    client = http_client()
    request = client.build_request("POST", upstream.url(kind), json=body, headers=upstream.headers(str(record.id)))
    try:
        response = await client.send(request, stream=True)
    except httpx.RequestError as exc:
        raise _transport_error(exc, upstream) from None
    try:
        if response.status_code >= 300:
            try:
                payload = await response.aread()
            except httpx.RequestError:
                payload = b""
            raise upstream_error(response.status_code, payload, upstream)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise OpenAIError(502, f"The upstream API at {upstream.host} did not stream its answer.",
                              code="upstream_error", type="server_error")
    except BaseException:
        await response.aclose()
        raise
    return response


async def _relay(response: httpx.Response, upstream: _Upstream, record: RequestRecord) -> AsyncIterator[bytes]:
    """The upstream's server-sent events, each passed on as soon as it is complete, ``model`` set to ours.

    Closing this iterator (the client went away) closes the upstream request, so the upstream
    stops generating too.
    """
    parts: list[str] = []
    finish_reason, usage = None, None
    try:
        data_lines: list[str] = []
        ended = False
        lines = response.aiter_lines()
        while not ended:
            try:
                line = await anext(lines)
            except StopAsyncIteration:
                ended = True
                line = ""
            if line.startswith("data:"):
                data_lines.append(line[5:].removeprefix(" "))
                continue
            if line.startswith(":"):  # an SSE comment: a keep-alive
                yield KEEP_ALIVE
                continue
            if line or not data_lines:  # event:, id: and retry: fields carry nothing we use
                continue
            data, data_lines = "\n".join(data_lines), []
            if data.strip() == "[DONE]":
                yield DONE
                record.close(status=RequestStatus.SUCCEEDED, status_code=200, usage=usage_counts(usage),
                             response_body={"text": "".join(parts), "finish_reason": finish_reason, "usage": usage})
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                chunk = None
            if not isinstance(chunk, dict):
                yield sse_frame(data.encode())
                continue
            if isinstance(chunk.get("error"), dict):
                error = chunk["error"]
                record.fail(OpenAIError(502, str(error.get("message", "the upstream failed"))[:_ERROR_MESSAGE_MAX_LENGTH],
                                        code=_text_or_none(error.get("code")) or "upstream_error",
                                        type=_text_or_none(error.get("type")) or "server_error"))
            if "model" in chunk:
                chunk["model"] = upstream.model_id
            for choice in chunk.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str) and text:
                    record.first_token()
                    parts.append(text)
                finish_reason = choice.get("finish_reason") or finish_reason
            usage = chunk.get("usage") or usage
            yield sse_frame(chunk)
        error = OpenAIError(502, f"The upstream API at {upstream.host} ended its stream before it was complete.",
                            code="upstream_stream_ended", type="server_error")
        yield sse_frame(error.body())
        record.fail(error)
    except httpx.RequestError as exc:
        error = _transport_error(exc, upstream)
        yield sse_frame(error.body())
        record.fail(error)
    finally:
        await response.aclose()
        record.close(status=RequestStatus.CANCELLED, status_code=499,  # a no-op unless the client went away
                     response_body={"text": "".join(parts), "finish_reason": None})
