"""Which function runs each kind of job: the app that owns a kind registers its handler here.

``apps.models`` registers download, convert and quantize from its ``AppConfig.ready()`` (by
importing ``apps.models.jobs``, whose handlers carry ``@job_handler(kind)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Handler = Callable[[Any], Any]  # run(ctx: JobContext) -> RegisteredModel | None

_handlers: dict[str, Handler] = {}


def job_handler(kind: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of jobs of ``kind`` (one per kind)."""
    def register(handler: Handler) -> Handler:
        if _handlers.get(kind, handler) is not handler:
            raise ValueError(f"job kind {kind!r} already has a handler: {_handlers[kind]!r}")
        _handlers[kind] = handler
        return handler

    return register


def job_handler_get(kind: str) -> Handler:
    """The handler registered for ``kind``; KeyError when none is."""
    return _handlers[kind]
