"""What a JSON request body must be before the platform stores it or passes it on, on both surfaces.

``json.loads`` accepts bodies that fail later: one nested thousands of levels deep (a
RecursionError wherever it is walked) and strings holding a lone surrogate (``"\\ud800"``), which
no database column, Redis stream or UTF-8 encoder takes. The /v1 validation
(``apps.gateway.validation``) and the management API's parser (``llmplatform.api_input``) refuse
both, each in its own error shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Deeper than any real request (an OpenAI tool schema nests a few dozen levels at most), and far
# below the interpreter's recursion limit, so every later walk of the body is safe.
MAX_JSON_DEPTH = 100

TOO_DEEP = f"is nested more than {MAX_JSON_DEPTH} levels deep"
NOT_TEXT = "must be Unicode text, not a lone surrogate (an unpaired \\uD800-\\uDFFF escape)"
KEY_NOT_TEXT = "has a key that is not Unicode text but holds a lone surrogate"


@dataclass(frozen=True)
class JSONProblem:
    """Why a parsed body is refused: ``param`` is the path of the field at fault (``messages[0].content``),
    None for the body itself; ``message`` says what is wrong with it, never repeating the offending text."""

    param: str | None
    message: str

    @property
    def sentence(self) -> str:
        return f"'{self.param}' {self.message}." if self.param else f"The request body {self.message}."


NESTED_TOO_DEEP = JSONProblem(None, TOO_DEEP)  # also what a RecursionError from json.loads means


def _is_text(value: str) -> bool:
    """Whether ``value`` encodes to UTF-8: only a lone surrogate does not."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _join(path: str | None, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path or ''}[{key}]"
    return f"{path}.{key}" if path else key


def json_body_problem(body: Any) -> JSONProblem | None:
    """The first thing in a parsed JSON body that the platform cannot take, or None when it can take it all:
    nesting deeper than ``MAX_JSON_DEPTH``, or a string (key or value) that is not Unicode text."""
    pending: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while pending:
        value, depth, path = pending.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return JSONProblem(path, NOT_TEXT)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            return NESTED_TOO_DEEP
        if isinstance(value, dict):
            for key in value:
                if not _is_text(key):
                    return JSONProblem(path, KEY_NOT_TEXT)
            children = [(child, depth + 1, _join(path, key)) for key, child in value.items()]
        else:
            children = [(child, depth + 1, _join(path, index)) for index, child in enumerate(value)]
        pending.extend(reversed(children))
    return None
