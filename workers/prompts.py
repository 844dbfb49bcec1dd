"""Turning requests into prompt tokens, with the chat template stored in the GGUF file."""

from __future__ import annotations

from functools import lru_cache

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from workers.generation import InferenceError

# Used only for a GGUF that carries no chat template (ChatML, the most common convention).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=64)
def _formatter(template: str, eos_token: str, bos_token: str) -> Jinja2ChatFormatter:
    return Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)


def _token_text(llm: llama_cpp.Llama, token: int) -> str:
    return llm._model.token_get_text(token) if token != -1 else ""


def chat_prompt_tokens(llm: llama_cpp.Llama, messages: list[dict]) -> tuple[list[int], list[str]]:
    """Render ``messages`` with the model's chat template; returns tokens and extra stop strings."""
    template = llm.metadata.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
    formatter = _formatter(template, _token_text(llm, llm.token_eos()), _token_text(llm, llm.token_bos()))
    try:
        rendered = formatter(messages=messages)
    except Exception as exc:  # jinja2 errors and the template's own raise_exception
        raise InferenceError(f"the model's chat template rejected these messages: {exc}",
                             code="invalid_messages", param="messages") from exc
    stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop] if rendered.stop else []
    tokens = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
    return tokens, [s for s in stops if s]


def completion_prompt_tokens(llm: llama_cpp.Llama, prompt: str) -> list[int]:
    if prompt == "":
        return [llm.token_bos()]
    return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
