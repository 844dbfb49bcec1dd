"""The /v1 inference service: one request to a node, from placement to the whole answer or its stream.

The /v1 endpoints (``apps.gateway.views``) and callers inside the platform (``generate_answer``,
for the local LLM API's generate) go through it alike: validation, node choice, the worker,
request history.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from apps.gateway import validation
from apps.gateway.dispatch import node_pick, request_event_batches, request_release, request_send
from apps.gateway.errors import OpenAIError, broker_unavailable
from apps.gateway.history import RequestRecord
from apps.gateway.models import ApiKey, RequestStatus
from apps.gateway.upstream import upstream_answer, usage_counts
from apps.models.models import RegisteredModel
from llmplatform.background import spawn
from llmplatform.errors import BROKER_ERRORS
from llmplatform.sse import DONE, sse_frame
from workers import protocol


class Generation:
    """One request in flight on a node, from the gateway's point of view.

    ``start`` places and queues it; ``next_output`` reads its answer; ``release`` must follow,
    whatever happened (``generation_stream`` sees to it; after ``generation_collect`` the caller does).
    """

    def __init__(self, valid: validation.ValidRequest, model: RegisteredModel, record: RequestRecord) -> None:
        self.valid, self.model, self.record = valid, model, record
        self.request_id = record.id.hex
        self.created = int(time.time())
        self.node = None
        self.batches: AsyncIterator | None = None
        self.pending: deque = deque()  # events read from the stream, not yet handed on
        self.finished = False

    @property
    def chat(self) -> bool:
        return self.valid.kind == protocol.KIND_CHAT

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    async def start(self) -> None:
        """Choose the node, open the request's record and queue the request; raises OpenAIError."""
        self.node, reason = await node_pick(self.model)
        self.record.open(model=self.model.id, node=self.node.name, placement=reason, stream=self.valid.stream,
                         request_body=self.valid.body)
        incarnation = await request_send(message=self.valid.message(self.request_id, self.model.worker_spec()),
                                         node=self.node)
        self.batches = request_event_batches(self.request_id, self.node.name, incarnation)

    async def next_output(self) -> tuple[str, dict]:
        """The next event that carries output (token, done or error), skipping bookkeeping ones."""
        while True:
            while self.pending:
                event, data = self.pending.popleft()
                if event == protocol.EVENT_ERROR:
                    raise OpenAIError.from_event(data)
                if event in (protocol.EVENT_TOKEN, protocol.EVENT_DONE):
                    if event == protocol.EVENT_TOKEN:
                        self.record.first_token()
                    return event, data
            try:
                self.pending.extend(await anext(self.batches))
            except StopAsyncIteration:
                raise OpenAIError(502, "The request stream ended without a result.", code="stream_ended",
                                  type="server_error") from None

    def output_ready(self) -> bool:
        """Whether output already read from the stream waits to be handed on (``next_output`` would not wait)."""
        return any(event in (protocol.EVENT_TOKEN, protocol.EVENT_DONE, protocol.EVENT_ERROR)
                   for event, _ in self.pending)

    def release(self) -> None:
        """Free the node's slot; tell the worker to stop if the answer was not complete."""
        if self.node is not None:
            spawn(request_release(request_id=self.request_id, node=self.node, cancel=not self.finished))
            self.node = None


def _chunk(generation: Generation, choice: dict | None, usage: dict | None = None) -> bytes:
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


def _choice(generation: Generation, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict:
    if not generation.chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    delta = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


async def generation_stream(*, generation: Generation, first: tuple[str, dict]) -> AsyncIterator[bytes]:
    """The answer as server-sent events framed as OpenAI frames them (a chunk per token), ending with
    ``data: [DONE]`` (or an error frame); the record is closed and the generation released when the
    stream ends, however it ends. The frames of tokens that arrived together leave in one write."""
    record = generation.record
    parts: list[str] = []
    frames: list[bytes] = []
    try:
        if generation.chat:
            frames.append(_chunk(generation, _choice(generation, "", None, role=True)))
        event, data = first
        while True:
            if event == protocol.EVENT_TOKEN:
                parts.append(data["text"])
                frames.append(_chunk(generation, _choice(generation, data["text"], None)))
            elif event == protocol.EVENT_DONE:
                generation.finished = True
                closing_text = None if generation.chat else ""
                frames.append(_chunk(generation, _choice(generation, closing_text, data["finish_reason"])))
                if generation.valid.include_usage:
                    frames.append(_chunk(generation, None, data["usage"]))
                yield b"".join(frames) + DONE
                record.close(status=RequestStatus.SUCCEEDED, status_code=200, usage=data["usage"],
                             response_body={"text": "".join(parts), "finish_reason": data["finish_reason"],
                                            "usage": data["usage"], "timings": data.get("timings")})
                return
            if not generation.output_ready():
                yield b"".join(frames)
                frames.clear()
            try:
                event, data = await generation.next_output()
            except OpenAIError as error:  # not finished: the worker is told to stop, if it still runs
                yield b"".join(frames) + sse_frame(error.body())
                record.fail(error)
                return
    finally:
        if not generation.finished:
            record.close(status=RequestStatus.CANCELLED, status_code=499,
                         response_body={"text": "".join(parts), "finish_reason": None})
        generation.release()


async def generation_collect(*, generation: Generation, first: tuple[str, dict]) -> dict:
    """The whole answer of a non-streamed request, in OpenAI's response shape, with its record closed;
    raises OpenAIError. The caller releases the generation."""
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


@dataclass(frozen=True)
class Answer:
    """The whole answer of ``generate_answer``."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str


async def generate_answer(*, model: RegisteredModel, body: dict, path: str, api_key: ApiKey | None = None,
                          user_id: int | None = None) -> Answer:
    """Run a chat (``messages``) or completion (``prompt``) request to the end; OpenAIError on failure."""
    record = RequestRecord(method="POST", path=path)
    if api_key is not None:
        record.identify(api_key)
    elif user_id is not None:
        record.fields["user_id"] = user_id
    body = {**body, "model": model.id, "stream": False}
    if model.is_external and "prompt" in body:  # external models are reached through chat completions
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    chat = "messages" in body
    try:
        valid = (validation.chat_request if chat else validation.completion_request)(body)
        if model.is_external:
            result = await upstream_answer(valid, model, record)
        else:
            generation = Generation(valid, model, record)
            try:
                await generation.start()
                result = await generation_collect(generation=generation, first=await generation.next_output())
            finally:
                generation.release()
    except OpenAIError as error:
        record.fail(error)  # a no-op when the record was already failed
        raise
    except BROKER_ERRORS as exc:
        error = broker_unavailable()
        record.fail(error)
        raise error from exc
    finally:
        await record.written()  # the caller's event loop may end with this call
    choice = result["choices"][0]
    usage = usage_counts(result.get("usage")) or {"prompt_tokens": 0, "completion_tokens": 0}
    text = (choice["message"]["content"] if chat else choice["text"]) or ""
    return Answer(text, usage["prompt_tokens"], usage["completion_tokens"], str(record.id))
