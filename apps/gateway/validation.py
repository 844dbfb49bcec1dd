"""Checking /v1 request bodies and turning them into the plain parameters a worker needs.

Each check raises an OpenAIError naming the offending parameter, so every bad input gets a
clear 400 before any work is queued.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from apps.gateway.errors import OpenAIError, invalid_value
from llmplatform.jsonbody import NESTED_TOO_DEEP, json_body_problem
from workers.messages import SAMPLING_DEFAULTS, InferenceRequest, ModelRef
from workers.protocol import KIND_CHAT, KIND_COMPLETION, KIND_EMBEDDING

CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 2048


@dataclass
class ValidRequest:
    kind: str
    model: str
    params: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    body: dict[str, Any] = field(default_factory=dict)

    def message(self, request_id: str, model: ModelRef) -> InferenceRequest:
        """The request for a worker (``params`` hold what the body asked for, defaults filled in)."""
        return InferenceRequest.from_params(request_id=request_id, kind=self.kind, model=model, params=self.params)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object the platform can store and pass on (see ``llmplatform.jsonbody``)."""
    try:
        body = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError(400, "We could not parse the JSON body of your request. Send a JSON object "
                               "with 'Content-Type: application/json'.", code="invalid_json") from None
    except RecursionError:
        raise OpenAIError(400, NESTED_TOO_DEEP.sentence, code="invalid_json") from None
    problem = json_body_problem(body)
    if problem is not None and problem.param is not None:
        raise invalid_value(problem.param, problem.sentence)
    if problem is not None:
        raise OpenAIError(400, problem.sentence, code="invalid_json")
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid_value(name, f"'{name}' must be a number between {low:g} and {high:g}, got {value!r}.")
    return float(value)


def _integer(body: dict, name: str, *, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid_value(name, f"'{name}' must be an integer >= {minimum}, got {value!r}.")
    return value


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise OpenAIError(400, "You must provide a model parameter.", code="missing_model", param="model")
    if not isinstance(model, str):
        raise invalid_value("model", f"'model' must be a string, got {model!r}.")
    return model


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stop)):
        raise invalid_value("stop", f"'stop' must be a non-empty string or a list of at most "
                                    f"{MAX_STOP_SEQUENCES} non-empty strings.")
    return stop


def _unsupported(body: dict, name: str, allowed: tuple = (None, False)) -> None:
    if body.get(name) not in allowed:
        raise OpenAIError(400, f"'{name}' is not supported by this server.", code="unsupported_parameter",
                          param=name)


def _sampling(body: dict) -> dict[str, Any]:
    if _integer(body, "n", minimum=1) not in (None, 1):
        raise OpenAIError(400, "Only n=1 is supported.", code="unsupported_parameter", param="n")
    for name in ("logprobs", "top_logprobs"):
        _unsupported(body, name, (None, False, 0))
    max_tokens = _integer(body, "max_completion_tokens", minimum=1) or _integer(body, "max_tokens", minimum=1)
    return {
        "max_tokens": max_tokens or settings.LLMP_DEFAULT_MAX_TOKENS,
        "temperature": _number(body, "temperature", SAMPLING_DEFAULTS.temperature, 0.0, 2.0),
        "top_p": _number(body, "top_p", SAMPLING_DEFAULTS.top_p, 0.0, 1.0),
        "frequency_penalty": _number(body, "frequency_penalty", SAMPLING_DEFAULTS.frequency_penalty, -2.0, 2.0),
        "presence_penalty": _number(body, "presence_penalty", SAMPLING_DEFAULTS.presence_penalty, -2.0, 2.0),
        "stop": _stop(body),
        "seed": _integer(body, "seed", minimum=-(2**63)),
    }


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid_value("stream", "'stream' must be true or false.")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid_value("stream_options", "'stream_options' is only allowed when 'stream' is true.")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise invalid_value("stream_options", "'stream_options' must be an object like {\"include_usage\": true}.")
    return stream, options.get("include_usage", False)


def _message_text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid_value(f"messages[{index}].content",
                                    "Only text content parts ({\"type\": \"text\", \"text\": ...}) are supported.")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise invalid_value(f"messages[{index}].content", "A message's content must be a string or a list of text parts.")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_value("messages", "'messages' must be a non-empty list of {role, content} objects.")
    clean = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise invalid_value(f"messages[{index}].role",
                                f"Each message needs a role, one of {sorted(CHAT_ROLES)}.")
        role = "system" if role == "developer" else role
        clean.append({"role": role, "content": _message_text(index, message.get("content"))})
    return clean


def chat_request(body: dict) -> ValidRequest:
    model = _model(body)
    _unsupported(body, "tools", (None, []))
    if body.get("response_format") not in (None, {"type": "text"}):
        raise OpenAIError(400, "Only response_format {\"type\": \"text\"} is supported.",
                          code="unsupported_parameter", param="response_format")
    params = {"messages": _messages(body), **_sampling(body)}
    stream, include_usage = _stream_flags(body)
    return ValidRequest(KIND_CHAT, model, params, stream, include_usage, body)


def completion_request(body: dict) -> ValidRequest:
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid_value("prompt", "'prompt' must be a string (or a list holding one string).")
    for name in ("echo", "suffix"):
        _unsupported(body, name, (None, False, ""))
    if body.get("best_of") not in (None, 1):
        raise OpenAIError(400, "Only best_of=1 is supported.", code="unsupported_parameter", param="best_of")
    params = {"prompt": prompt, **_sampling(body)}
    stream, include_usage = _stream_flags(body)
    return ValidRequest(KIND_COMPLETION, model, params, stream, include_usage, body)


def embedding_request(body: dict) -> ValidRequest:
    model = _model(body)
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if (not isinstance(inputs, list) or not inputs or len(inputs) > MAX_EMBEDDING_INPUTS
            or not all(isinstance(text, str) and text for text in inputs)):
        raise invalid_value("input", f"'input' must be a non-empty string or a list of 1 to "
                                     f"{MAX_EMBEDDING_INPUTS} non-empty strings.")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise invalid_value("encoding_format", "'encoding_format' must be 'float' or 'base64'.")
    _unsupported(body, "dimensions", (None,))
    return ValidRequest(KIND_EMBEDDING, model, {"input": inputs, "encoding_format": encoding_format}, body=body)
