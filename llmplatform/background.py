"""Background tasks of an async request: work that must finish even when its request does not."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

_background: set[asyncio.Task] = set()


def spawn(coro: Coroutine) -> asyncio.Task:
    """Run ``coro`` to completion on the running event loop even if the request that started it is cancelled."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)  # the loop keeps only a weak reference to its tasks
    task.add_done_callback(_background.discard)
    return task
