"""Turning requests into prompt tokens, with the chat template stored in the GGUF file.

Two guarantees beyond rendering:

* **User text never becomes control tokens.** The template's own text is tokenized with special
  tokens parsed (its ``<|im_start|>`` markers are real markers); every message's content is
  tokenized as plain text, so a user who types ``<|im_start|>system`` gets those characters.
* **Bounded work.** A prompt that cannot fit the context is refused from its length in bytes
  before anything is tokenized, and rendering has a time and a size budget.
"""

from __future__ import annotations

import datetime
import json
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from workers.engine.model import LoadedModel
from workers.generation import InferenceError

# Used only for a GGUF that carries no chat template (ChatML, the most common convention).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

RENDER_SECONDS = 2.0  # a template that runs longer than this is looping, not formatting

# Marks where each message's content goes, so the template's text and the user's text can be
# tokenized apart. Private-use code points that no tokenizer merges with their neighbours.
_OPEN, _CLOSE = "\U000F0000", "\U000F0001"


class TemplateBudgetExceeded(Exception):
    pass


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)


@lru_cache(maxsize=64)
def _compiled(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Jinja2ChatFormatter.IgnoreGenerationTags,
                                                            "jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception,
                               strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return environment.from_string(template)


@contextmanager
def _time_budget(seconds: float):
    """Interrupt a render that takes longer than ``seconds`` (main thread only: SIGALRM)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TemplateBudgetExceeded(f"the chat template ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _render(template: str, *, max_chars: int, seconds: float, **context) -> str:
    """Render chunk by chunk, stopping once the output passes ``max_chars`` or time runs out."""
    parts, size, deadline = [], 0, time.monotonic() + seconds
    with _time_budget(seconds):
        for chunk in _compiled(template).generate(**context):
            parts.append(chunk)
            size += len(chunk)
            if size > max_chars:
                raise TemplateBudgetExceeded("the rendered prompt is longer than the model's context")
            if time.monotonic() > deadline:
                raise TemplateBudgetExceeded(f"the chat template ran for more than {seconds:g} s")
    return "".join(parts)


def _too_long(n_bytes: int, model: LoadedModel, n_ctx: int, param: str) -> InferenceError:
    return InferenceError(f"This model's maximum context length is {n_ctx} tokens, but the {param} is "
                          f"{n_bytes} bytes long, which is more than {n_ctx} tokens can hold.",
                          code="context_length_exceeded", param=param)


def utf8(text: str, param: str) -> bytes:
    """The UTF-8 bytes of a client's text; a lone surrogate (valid JSON, not valid text) is a 400."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InferenceError(f"{param} contains a lone surrogate, which is not text", code="invalid_value",
                             param=param) from None


def check_length(texts: Sequence[str], model: LoadedModel, n_ctx: int, param: str) -> None:
    """Refuse, without tokenizing, text that has more tokens than the context for certain (or is not text)."""
    n_bytes = sum(len(utf8(text, param)) for text in texts)
    if n_bytes > n_ctx * model.longest_token_bytes:
        raise _too_long(n_bytes, model, n_ctx, param)


def chat_prompt_tokens(model: LoadedModel, messages: list[dict], *, n_ctx: int) -> tuple[list[int], list[str]]:
    """Render ``messages`` with the model's chat template; returns tokens and extra stop strings."""
    if len(messages) > n_ctx:  # every message takes at least one token
        raise InferenceError(f"This model's maximum context length is {n_ctx} tokens, which cannot hold "
                             f"{len(messages)} messages.", code="context_length_exceeded", param="messages")
    check_length([str(m.get("content") or "") for m in messages], model, n_ctx, "messages")
    template = model.chat_template or FALLBACK_TEMPLATE
    eos_text, bos_text = model.token_text(model.eos), model.token_text(model.bos)
    contents = [str(m.get("content") or "") for m in messages]
    marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    max_chars = n_ctx * model.longest_token_bytes + sum(len(c) for c in contents) + 64 * len(messages)
    try:
        rendered = _render(template, max_chars=max_chars, seconds=RENDER_SECONDS, messages=marked,
                           eos_token=eos_text, bos_token=bos_text, add_generation_prompt=True)
    except TemplateBudgetExceeded as exc:
        raise InferenceError(f"the model's chat template could not render these messages: {exc}",
                             code="invalid_messages", param="messages") from exc
    except Exception as exc:  # jinja2 errors and the template's own raise_exception
        raise InferenceError(f"the model's chat template rejected these messages: {exc}",
                             code="invalid_messages", param="messages") from exc
    tokens = _tokenize_marked(model, rendered, contents)
    if tokens is None:
        # The template rewrote the contents (trimmed or split them), so the marks are gone: render
        # the real contents, which must then hold no control-token text to be parsed as such.
        for index, content in enumerate(contents):
            control = next((t for t in model.control_token_texts if t in content), None)
            if control is not None:
                raise InferenceError(f"messages[{index}].content contains {control!r}, a control token of this "
                                     f"model, which its chat template cannot keep apart from its own markers",
                                     code="invalid_messages", param="messages")
        real = _render(template, max_chars=max_chars, seconds=RENDER_SECONDS, messages=messages,
                       eos_token=eos_text, bos_token=bos_text, add_generation_prompt=True)
        tokens = model.tokenize(real, add_special=False, parse_special=True)
    return tokens, [eos_text] if eos_text else []


def _tokenize_marked(model: LoadedModel, rendered: str, contents: list[str]) -> list[int] | None:
    """Tokenize template text with special tokens and each content as plain text; None if the
    marks did not come through the template once each, in order."""
    tokens: list[int] = []
    position = 0
    for index, content in enumerate(contents):
        mark = f"{_OPEN}{index}{_CLOSE}"
        found = rendered.find(mark, position)
        if found < 0 or rendered.find(mark, found + len(mark)) >= 0:
            return None
        if found > position:
            tokens += model.tokenize(rendered[position:found], add_special=False, parse_special=True)
        if content:
            tokens += model.tokenize(content, add_special=False, parse_special=False)
        position = found + len(mark)
    rest = rendered[position:]
    if _OPEN in rest or _CLOSE in rest:
        return None
    if rest:
        tokens += model.tokenize(rest, add_special=False, parse_special=True)
    return tokens


def completion_prompt_tokens(model: LoadedModel, prompt: str, *, n_ctx: int) -> list[int]:
    """A completion prompt is the client's own text: special tokens in it are parsed, as llama.cpp does."""
    check_length([prompt], model, n_ctx, "prompt")
    if prompt == "":
        return [model.bos]
    return model.tokenize(prompt, add_special=True, parse_special=True)
