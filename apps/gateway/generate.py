"""One whole answer from a model, for callers other than the /v1 endpoints (the local LLM API's generate).

It goes through the same path as /v1: validation, node choice, the worker, request history.
"""

from __future__ import annotations

from dataclasses import dataclass

from apps.gateway import validation
from apps.gateway.errors import OpenAIError
from apps.gateway.history import RequestRecord
from apps.gateway.models import ApiKey
from apps.gateway.upstream import upstream_answer, usage_counts
from apps.gateway.views import _collect, _Generation
from apps.models.models import RegisteredModel


@dataclass(frozen=True)
class Answer:
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
            generation = _Generation(valid, model, record)
            try:
                await generation.start()
                result = await _collect(generation, await generation.next_output())
            finally:
                generation.release()
    except OpenAIError as error:
        record.fail(error)  # a no-op when the record was already failed
        raise
    finally:
        await record.written()  # the caller's event loop may end with this call
    choice = result["choices"][0]
    usage = usage_counts(result.get("usage")) or {"prompt_tokens": 0, "completion_tokens": 0}
    text = (choice["message"]["content"] if chat else choice["text"]) or ""
    return Answer(text, usage["prompt_tokens"], usage["completion_tokens"], str(record.id))
