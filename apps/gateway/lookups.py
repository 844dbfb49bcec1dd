"""The gateway's hot-path reads, from a copy in each process: API keys, active models, live nodes.

Every /v1 request reads a key, a model and the live nodes. From the database each read is a query
on Django's one database thread, which a burst of requests queues on (with the request history's
writes), so under load these reads, not the model, set the time to first token. So each process
keeps what it read, and trusts it while:

- its epoch (``llmplatform.epochs``) has not moved: any save or delete of a key, a user, a model
  (or its upstream endpoint) or a node bumps the epoch of that kind when its transaction commits,
  so a request that starts after a key is revoked or a model deleted never uses the old row, in any
  process. The receivers below do the bumping; they are how a write from the admin, a service or a
  shell reaches every copy, and do nothing else;
- and it is younger than its kind's time limit: writes that bypass the ORM's signals (a queryset
  ``update``) and time itself (a node's heartbeat ageing) are caught by that. Live nodes, which
  heartbeats rewrite with ``update``, are re-read at most once a second.

Only rows that exist are kept: an unknown key or model name always goes to the database. When Redis
does not answer, every read goes to the database.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models.signals import post_delete, post_save

from apps.gateway.models import ApiKey
from apps.models.models import ExternalEndpoint, RegisteredModel
from apps.models.selectors import model_get_active
from apps.nodes.models import Node
from apps.nodes.selectors import node_list_live
from llmplatform.epochs import EPOCH_KEYS as KEYS
from llmplatform.epochs import EPOCH_MODELS as MODELS
from llmplatform.epochs import EPOCH_NODES as NODES
from llmplatform.epochs import epoch_bump, epochs_read, request_epochs

# How long a copy is trusted at most, epoch unchanged (seconds).
TIME_LIMITS = {KEYS: 10.0, MODELS: 10.0, NODES: 1.0}
MAX_ENTRIES = 10_000  # per kind: a copy that grows past this starts again empty


class _Copy:
    """The rows of one kind that this process read, under the epoch they were read in."""

    def __init__(self, kind: str) -> None:
        self.kind, self.limit = kind, TIME_LIMITS[kind]
        self.epoch: int | None = None
        self.rows: dict[Any, tuple[float, Any]] = {}
        # Reads from the database under way, by name: the requests of a burst that all find a row missing
        # (or aged out) wait for one read instead of queueing one each on the database thread.
        self.loading: dict[Any, tuple[int | None, asyncio.AbstractEventLoop, asyncio.Task]] = {}

    async def get(self, name, load: Callable[[], Awaitable[Any]]):
        """The row called ``name``: the copy's if still good, else ``load()``'s (kept unless None)."""
        if not await _epochs_refresh():  # no epoch to trust the copy by
            self.rows.clear()
            return await load()
        epoch, now = self.epoch, time.monotonic()
        kept = self.rows.get(name)
        if kept is not None and now - kept[0] < self.limit:
            return kept[1]
        loop = asyncio.get_running_loop()
        pending = self.loading.get(name)
        if pending is not None and pending[0] == epoch and pending[1] is loop:  # read since this epoch began
            return await asyncio.shield(pending[2])
        task = loop.create_task(self._load(name, epoch, now, load))
        self.loading[name] = (epoch, loop, task)
        return await asyncio.shield(task)  # a waiter that is cancelled leaves the read to the others

    async def _load(self, name, epoch: int | None, now: float, load: Callable[[], Awaitable[Any]]):
        try:
            row = await load()
        finally:
            if self.loading.get(name, (None, None, None))[2] is asyncio.current_task():
                del self.loading[name]
        if row is not None and self.epoch == epoch:  # not if the epoch moved while it loaded
            if len(self.rows) >= MAX_ENTRIES:
                self.rows.clear()
            self.rows[name] = (now, row)
        return row

    def epoch_seen(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.rows.clear()
            self.epoch = epoch


_copies = {kind: _Copy(kind) for kind in TIME_LIMITS}
# Outside an HTTP request (``epochs_request``): the task that last read the epochs, whose later lookups
# need not read them again.
_epochs_read_by: weakref.ref | None = None


async def _epochs_refresh() -> bool:
    """Bring every copy up to the current epochs, once per request (its guard's key check and its view
    share the read; outside a request, once per asyncio task): one round trip for all kinds. False when
    Redis does not answer."""
    global _epochs_read_by
    request = request_epochs()
    task = asyncio.current_task()
    if request is not None:
        if request.fresh():
            return True
    elif _epochs_read_by is not None and task is not None and _epochs_read_by() is task:
        return True
    epochs = await epochs_read(*_copies)
    if epochs is None:
        _epochs_read_by = None
        return False
    for copy, epoch in zip(_copies.values(), epochs):
        copy.epoch_seen(epoch)
    if request is not None:
        request.read = True
    else:
        _epochs_read_by = weakref.ref(task) if task is not None else None
    return True


async def lookup_key(*, key_hash: str, load: Callable[[], Awaitable[Any]]):
    """The API key with this digest (``load`` reads it from the database when the copy cannot answer)."""
    return await _copies[KEYS].get(key_hash, load)


async def lookup_model(*, model_id: str) -> RegisteredModel | None:
    """The active model with this id, or None (``model_get_active``)."""
    return await _copies[MODELS].get(model_id, lambda: model_get_active(model_id=model_id))


async def lookup_live_nodes() -> list[Node]:
    """The nodes that can take work (``node_list_live``), as read at most a second ago."""
    async def load() -> list[Node]:
        return [node async for node in node_list_live()]

    return await _copies[NODES].get("live", load)


def _bumper(kind: str):
    def bump(sender, **kwargs) -> None:
        epoch_bump(kind)
    bump.__name__ = f"bump_{kind}_epoch"
    return bump


_RECEIVERS = {kind: _bumper(kind) for kind in TIME_LIMITS}


def lookups_connect() -> None:
    """Connect the receivers that bump the epochs (from the gateway app's ``ready``)."""
    watched = {KEYS: (ApiKey, get_user_model()), MODELS: (RegisteredModel, ExternalEndpoint), NODES: (Node,)}
    for kind, senders in watched.items():
        for sender in senders:
            for signal in (post_save, post_delete):
                signal.connect(_RECEIVERS[kind], sender=sender, weak=False,
                               dispatch_uid=f"llmp-epoch-{kind}-{sender._meta.label}-{signal is post_save}")
