"""One whole answer from a model, for callers other than the /v1 endpoints (the local LLM API's generate).

It goes through the same path as /v1: validation, node choice, the worker, request history.
"""

from __future__ import annotations

from dataclasses import dataclass

from apps.gateway import validation
from apps.gateway.history import RequestRecord
from apps.gateway.models import ApiKey
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
    chat = "messages" in body
    body = {**body, "model": model.id, "stream": False}
    if model.is_external:
        from apps.gateway.upstream import upstream_chat

        record.open(model=model.id, node="external", stream=False, request_body=body)
        try:
            result = await upstream_chat(model, body)
        except Exception as exc:
            from apps.gateway.errors import OpenAIError

            if isinstance(exc, OpenAIError):
                record.fail(exc)
            raise
        usage = result.get("usage") or {}
        record.close(status="succeeded", status_code=200, usage=usage, response_body=result)
        return Answer(result["choices"][0]["message"]["content"] or "", usage.get("prompt_tokens", 0),
                      usage.get("completion_tokens", 0), str(record.id))
    valid = (validation.chat_request if chat else validation.completion_request)(body)
    generation = _Generation(valid, model, record)
    try:
        await generation.start()
        result = await _collect(generation, await generation.next_output())
    except Exception as exc:
        from apps.gateway.errors import OpenAIError

        if isinstance(exc, OpenAIError):
            record.fail(exc)
        raise
    finally:
        generation.release()
    choice = result["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    usage = result["usage"]
    return Answer(text, usage["prompt_tokens"], usage["completion_tokens"], str(record.id))
