"""The async Redis client of a process: one bounded client per event loop.

Short commands (placement counts, dispatch, release, health, job event reads) share
``REDIS_MAX_CONNECTIONS`` connections per event loop; a command waits up to
``REDIS_CONNECTION_WAIT_SECONDS`` for one, and a Redis that does not answer within
``REDIS_SOCKET_TIMEOUT_SECONDS`` is unavailable.
"""

from __future__ import annotations

import asyncio
import os
import weakref

import redis.asyncio as aioredis
from django.conf import settings

REDIS_MAX_CONNECTIONS = 50
REDIS_CONNECTION_WAIT_SECONDS = 10.0
REDIS_SOCKET_TIMEOUT_SECONDS = 10.0

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()


def client_name(role: str) -> str:
    """What this process's connections of ``role`` call themselves in Redis's CLIENT LIST."""
    return f"{settings.LLMP_REDIS_PREFIX}:gateway-{role}:{os.getpid()}"


def redis_client() -> aioredis.Redis:
    """The running event loop's client, over a bounded pool: a burst waits for a connection, it is not refused."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_CONNECTION_WAIT_SECONDS,
            socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
            client_name=client_name("commands"))
        client = _clients[loop] = aioredis.Redis(connection_pool=pool)
    return client


def redis_client_dedicated(*, role: str, read_timeout: float) -> aioredis.Redis:
    """A new client with a single connection of its own, for a command that blocks (XREAD BLOCK): it never
    waits for the shared pool nor holds one of its connections. A read gets ``read_timeout`` seconds on top
    of the usual socket timeout. The caller closes it."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.REDIS_URL, max_connections=1, timeout=REDIS_CONNECTION_WAIT_SECONDS,
        socket_timeout=read_timeout + REDIS_SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT_SECONDS, client_name=client_name(role))
    return aioredis.Redis(connection_pool=pool)
