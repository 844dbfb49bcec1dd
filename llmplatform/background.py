"""Background tasks of an async request: work that must finish even when its request does not."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine

_background: set[asyncio.Task] = set()


def spawn(coro: Coroutine, *, detached: bool = False) -> asyncio.Task:
    """Run ``coro`` to completion on the running event loop even if the request that started it is cancelled.

    ``detached``: in a context of its own, not a copy of the caller's. A task that outlives its request
    and serves many requests (a writer shared by all of them) needs it: in the request's copy its
    ``sync_to_async`` calls would run on that request's thread (Django's ThreadSensitiveContext), which
    is gone once the request ends (asgiref then refuses the call), and whose database connection Django
    closes at the end of the request. Detached, they run on one long-lived thread, where a database
    connection stays open between calls (or, under ``async_to_sync``, on the calling thread as usual).
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(coro, context=contextvars.Context()) if detached else loop.create_task(coro)
    _background.add(task)  # the loop keeps only a weak reference to its tasks
    task.add_done_callback(_background.discard)
    return task
