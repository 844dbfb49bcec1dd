"""Epochs: counters in Redis that say "what you cached of this changed", for caches kept in every process.

A process that keeps a copy of rows (the gateway's keys, models and live nodes, see
``apps.gateway.lookups``) reads the counter of each kind with the request that uses the copy, and
drops the copy when the counter moved. A write bumps the counter once its transaction commits, so a
request that starts after the write returns (a revoked key, a deleted model) never sees the old row,
in any process. Reading costs one Redis round trip; nothing is pushed. One HTTP request reads them once
(``epochs_request``): the guard's key check and the view run in different asyncio tasks, which share
the request's read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import redis
from django.conf import settings
from django.db import transaction

from llmplatform.aioredis import redis_client

logger = logging.getLogger(__name__)

# The kinds of rows that processes keep copies of.
EPOCH_KEYS, EPOCH_MODELS, EPOCH_NODES = "keys", "models", "nodes"

_sync_clients: dict[str, redis.Redis] = {}


def _key(kind: str) -> str:
    return f"{settings.LLMP_REDIS_PREFIX}:epoch:{kind}"


def _sync_client() -> redis.Redis:
    client = _sync_clients.get(settings.REDIS_URL)
    if client is None:
        client = _sync_clients[settings.REDIS_URL] = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    return client


def _bump_now(kinds: tuple[str, ...]) -> None:
    try:
        pipe = _sync_client().pipeline(transaction=False)
        for kind in kinds:
            pipe.incr(_key(kind))
        pipe.execute()
    except redis.RedisError as exc:  # the caches' own time limits still end the stale copies
        logger.warning("could not bump the %s epoch(s): %s", ", ".join(kinds), exc)


def epoch_bump(*kinds: str) -> None:
    """Tell every process that rows of these kinds changed, once the current transaction (if any) commits."""
    transaction.on_commit(lambda: _bump_now(kinds))


async def epochs_read(*kinds: str) -> tuple[int, ...] | None:
    """The current counters of ``kinds`` (0 for one never bumped); None when Redis does not answer."""
    try:
        values = await redis_client().mget([_key(kind) for kind in kinds])
    except redis.RedisError as exc:
        logger.warning("could not read the %s epoch(s): %s", ", ".join(kinds), exc)
        return None
    return tuple(int(value) if value else 0 for value in values)


class RequestEpochs:
    """Whether the HTTP request under way has read the epochs (every task of the request sees the same
    object: tasks copy the context they are created in). Once the request ends it counts as unread, so a
    task that outlives its request reads them again."""

    __slots__ = ("open", "read")

    def __init__(self) -> None:
        self.open, self.read = True, False

    def fresh(self) -> bool:
        return self.open and self.read


_request_epochs: ContextVar[RequestEpochs | None] = ContextVar("llmp_request_epochs", default=None)


@contextmanager
def epochs_request() -> Iterator[RequestEpochs]:
    """The span of one HTTP request (the ASGI guard opens it): its reads of the epochs are shared."""
    scope = RequestEpochs()
    token = _request_epochs.set(scope)
    try:
        yield scope
    finally:
        scope.open = False
        _request_epochs.reset(token)


def request_epochs() -> RequestEpochs | None:
    """The request under way's (``epochs_request``), or None outside one."""
    return _request_epochs.get()
