"""The token loop: sampling, incremental UTF-8 decoding, stop sequences, finish reasons.

It owns the loop (rather than calling llama-cpp-python's ``create_completion``) so that usage
counts are exact for streamed and non-streamed requests alike, and so that a cancelled
request stops between two tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp

from workers.messages import SamplingParams  # defined with the request it comes in


class InferenceError(Exception):
    """A request the worker cannot serve; carries the OpenAI error fields for the client."""

    def __init__(self, message: str, *, code: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.code, self.status, self.param, self.type = message, code, status, param, type

    def as_event(self) -> dict:
        return {"message": self.message, "code": self.code, "status": self.status, "param": self.param,
                "type": self.type}


@dataclass
class GenerationResult:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"
    text_parts: list[str] = field(default_factory=list)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


def generate(llm: llama_cpp.Llama, prompt_tokens: list[int], params: SamplingParams,
             emit: Callable[[str], None]) -> GenerationResult:
    """Generate from ``prompt_tokens``, handing each new piece of text to ``emit`` in order.

    Guarantees: the concatenation of emitted pieces is the completion text, with any stop
    sequence and everything after it removed; ``emit`` is never called with an empty string.
    An exception raised by ``emit`` (a cancellation) ends generation at once.
    """
    n_ctx = llm.n_ctx()
    result = GenerationResult(prompt_tokens=len(prompt_tokens))
    if len(prompt_tokens) >= n_ctx:
        raise InferenceError(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has {len(prompt_tokens)} tokens.",
            code="context_length_exceeded", param="messages",
        )
    # Without a seed every request draws a fresh one rather than replaying the last request's.
    llm.set_seed(params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
    stops = tuple(s for s in params.stop if s)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    finish_reason = "length"
    stopped_by_sequence = False

    def send(text: str) -> None:
        if text:
            result.text_parts.append(text)
            emit(text)

    for token in llm.generate(
        prompt_tokens,
        temp=params.temperature,
        top_p=params.top_p,
        top_k=0 if params.temperature > 0 else 40,
        min_p=0.0,
        repeat_penalty=1.0,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        reset=True,
    ):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            finish_reason = "stop"
            break
        result.completion_tokens += 1
        pending += decoder.decode(llm.detokenize([token], special=False))
        hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            send(pending[:hit])
            finish_reason, stopped_by_sequence = "stop", True
            break
        keep = _held_back(pending, stops)
        send(pending[: len(pending) - keep])
        pending = pending[len(pending) - keep:]
        if result.completion_tokens >= params.max_tokens or len(prompt_tokens) + result.completion_tokens >= n_ctx:
            finish_reason = "length"
            break
    if not stopped_by_sequence:  # text held back for a stop sequence that never completed
        send(pending + decoder.decode(b"", final=True))
    result.finish_reason = finish_reason
    return result
