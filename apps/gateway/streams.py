"""The gateway's reader of every request stream, one per event loop (each gateway process).

A blocking XREAD holds a connection for as long as it blocks, so reading each request's stream on
its own would take one connection per request in flight, and a burst would exhaust any pool. So
each event loop (each gateway process) has one ``StreamReader``: one task on one connection, doing
one XREAD BLOCK over the streams of every request waiting on it and handing each entry to its
request's queue. The same task checks, once a second and for all requests at once, that the worker
process each request waits on is alive (see ``workers.liveness``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

from apps.gateway.errors import OpenAIError, broker_unavailable, worker_lost
from apps.nodes.selectors import node_list_live
from llmplatform.aioredis import redis_client, redis_client_dedicated
from workers import protocol

logger = logging.getLogger(__name__)

# How often the reader checks the liveness of the workers its requests wait on; also its longest
# XREAD block. A dead worker is noticed within WORKER_ALIVE_TTL_SECONDS plus this.
LIVENESS_CHECK_SECONDS = 1.0
# A request with no worker incarnation to watch (none was running at dispatch, or one that sends
# none) that is silent this long has its node's heartbeat checked, as a fallback.
HEARTBEAT_CHECK_SECONDS = 2.0
READ_COUNT = 512  # entries per stream per XREAD
WAKE_TTL_SECONDS = 3600
FINAL_EVENTS = frozenset({protocol.EVENT_DONE, protocol.EVENT_ERROR, protocol.EVENT_CANCELLED})

def _resp_command(args: list) -> bytes:
    """A command in Redis's wire format (RESP), its arguments str or bytes."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _fields(flat) -> dict:
    """An entry's fields as a dict (RESP2 sends them as a flat list of names and values)."""
    if isinstance(flat, dict):
        return flat
    pairs = iter(flat)
    return dict(zip(pairs, pairs))


_readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamReader] = weakref.WeakKeyDictionary()


def stream_reader() -> StreamReader:
    """The event loop's reader of request streams."""
    loop = asyncio.get_running_loop()
    reader = _readers.get(loop)
    if reader is None:
        reader = _readers[loop] = StreamReader(node_check=_nodes_not_live)
    return reader


async def _nodes_not_live(names: set[str]) -> set[str]:
    live = {name async for name in node_list_live().filter(name__in=names).values_list("name", flat=True)}
    return names - live


@dataclass(eq=False)
class Subscription:
    """One request's place in the reader: where its stream was read up to, and whom it waits on."""

    key: str
    node: str
    # The worker process to watch: the node's at dispatch, then the one that started the request.
    # None: none was known at dispatch (wait for one), or the worker predates liveness keys.
    incarnation: str | None
    last_id: bytes | str = "0-0"
    started: bool = False
    heard_at: float = field(default_factory=time.monotonic)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def next_events(self) -> list[tuple[str, dict]]:
        """The next events of the stream, in order; raises the OpenAIError that ended the request."""
        item = await self.inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item


class StreamReader:
    """Reads every subscribed request stream with one XREAD BLOCK on one connection.

    A new subscription does not wait for the current block to end: the reader's XREAD also reads
    its own wake stream, which ``subscribe`` appends to. A Redis failure fails the requests waiting
    at that moment with broker_unavailable, and the reader carries on for the ones that follow.
    """

    def __init__(self, *, node_check: Callable[[set[str]], Awaitable[set[str]]]) -> None:
        self._node_check = node_check
        self._subs: dict[str, Subscription] = {}
        self._wake_key = f"{settings.LLMP_REDIS_PREFIX}:gateway:reader:{uuid.uuid4().hex}:wake"
        self._wake_last: bytes | str = "0-0"
        self._reading = False  # an XREAD is in flight
        self._woken = False  # ... and a wake has been sent for it
        self._wakes: set[asyncio.Task] = set()
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client: aioredis.Redis | None = None
        self._raw: aioredis.Connection | None = None  # the reader's own connection, taken from _client
        self._next_check = 0.0
        self._heartbeat_task: asyncio.Task | None = None
        self._next_heartbeat_check = 0.0
        self._nodes_found_dead: set[str] = set()

    @property
    def waiting(self) -> int:
        """How many requests the reader reads for now."""
        return len(self._subs)

    def subscribe(self, key: str, *, node: str, incarnation: str | None) -> Subscription:
        """Start reading ``key`` from its first entry, for a request dispatched to ``node``."""
        sub = Subscription(key=key, node=node, incarnation=incarnation)
        self._subs[key] = sub
        self._work.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-stream-reader")
        elif self._reading and not self._woken:
            self._woken = True
            wake = asyncio.get_running_loop().create_task(self._wake())
            self._wakes.add(wake)
            wake.add_done_callback(self._wakes.discard)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop reading a request's stream (idempotent); its key leaves the next XREAD."""
        if self._subs.get(sub.key) is sub:
            del self._subs[sub.key]

    async def _wake(self) -> None:
        try:
            pipe = redis_client().pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": 1}, maxlen=1, approximate=False)
            pipe.expire(self._wake_key, WAKE_TTL_SECONDS)
            await pipe.execute()
        except RedisError as exc:  # the new request is read when the current block ends
            logger.warning("could not wake the stream reader: %s", exc)

    def _connection(self) -> aioredis.Redis:
        if self._client is None:
            self._client = redis_client_dedicated(role="reader", read_timeout=LIVENESS_CHECK_SECONDS)
        return self._client

    async def _xread(self, streams: dict, *, block_ms: int | None) -> list:
        """XREAD on the reader's connection, spoken directly: the client's command layer (pool checkout,
        retries, reply callbacks) costs more than the read itself, and the reader does one per token.
        Returns ``[(key, [(entry_id, fields), ...]), ...]`` whether Redis answers in RESP2 or RESP3."""
        if self._raw is None:
            pool = self._connection().connection_pool
            self._raw = await pool.get_connection()  # held until the connection is reset
        args = [b"XREAD", b"COUNT", b"%d" % READ_COUNT]
        if block_ms is not None:
            args += [b"BLOCK", b"%d" % block_ms]
        args += [b"STREAMS", *streams.keys(), *streams.values()]
        await self._raw.send_packed_command(_resp_command(args), check_health=False)
        reply = await self._raw.read_response()
        if not reply:
            return []
        pairs = reply.items() if isinstance(reply, dict) else reply
        return [(key, [(entry_id, _fields(flat)) for entry_id, flat in entries]) for key, entries in pairs]

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:  # the event loop is closing: do not leave the connection to the garbage collector
            await self._close_connection()

    async def _serve(self) -> None:
        task = asyncio.current_task()
        while True:
            # redis-py can let a cancellation (the event loop closing) return from a blocking XREAD as if
            # it had timed out; without this the reader would go back to waiting and the loop never closes.
            if task.cancelling():
                raise asyncio.CancelledError()
            if not self._subs:
                self._work.clear()
                await self._work.wait()
                continue
            try:
                await self._read()
                doomed = self._silent_on_dead_nodes()
                if time.monotonic() >= self._next_check:
                    doomed.update(await self._dead_workers())
                await self._fail(doomed)
                self._heartbeats_check()
            except RedisError as exc:
                logger.error("reading request streams failed: %s; failing the %d request(s) waiting",
                             exc, len(self._subs))
                self._fail_all(broker_unavailable())
                await self._reset_connection()
            except Exception:
                logger.exception("the request stream reader failed; failing the %d request(s) waiting",
                                 len(self._subs))
                self._fail_all(OpenAIError(500, "The server failed while reading the request's stream.",
                                           code="internal_error", type="server_error"))
                await self._reset_connection()

    async def _read(self) -> None:
        streams = {sub.key: sub.last_id for sub in self._subs.values()}
        streams[self._wake_key] = self._wake_last
        block_ms = max(1, int((self._next_check - time.monotonic()) * 1000))
        self._reading, self._woken = True, False
        try:
            reply = await self._xread(streams, block_ms=min(block_ms, int(LIVENESS_CHECK_SECONDS * 1000)))
        finally:
            self._reading = False
        self._deliver(reply)

    def _deliver(self, reply) -> None:
        for raw_key, entries in reply or ():
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            if key == self._wake_key:
                self._wake_last = entries[-1][0]
                continue
            sub = self._subs.get(key)
            if sub is None or not entries:  # the request stopped listening meanwhile
                continue
            events = []
            for entry_id, fields in entries:
                event, data = protocol.decode(fields)
                if event == protocol.EVENT_START:
                    # Watch the process that took the request; a worker without liveness keys sends none.
                    sub.started, sub.incarnation = True, data.get("worker")
                events.append((event, data))
                sub.last_id = entry_id
            sub.heard_at = time.monotonic()
            sub.inbox.put_nowait(events)
            if events[-1][0] in FINAL_EVENTS:
                self.unsubscribe(sub)

    async def _dead_workers(self) -> dict[Subscription, OpenAIError]:
        """One round trip: is each watched incarnation alive; has each node without one got one now."""
        self._next_check = time.monotonic() + LIVENESS_CHECK_SECONDS
        prefix = settings.LLMP_REDIS_PREFIX
        watched = sorted({sub.incarnation for sub in self._subs.values() if sub.incarnation})
        waiting = sorted({sub.node for sub in self._subs.values() if not sub.started and not sub.incarnation})
        if not watched and not waiting:
            return {}
        pipe = redis_client().pipeline(transaction=False)
        for incarnation in watched:
            pipe.exists(protocol.worker_alive_key(prefix, incarnation))
        for node in waiting:
            pipe.get(protocol.node_incarnation_key(prefix, node))
        replies = await pipe.execute()
        dead = {incarnation for incarnation, alive in zip(watched, replies) if not alive}
        appeared = {node: value.decode() for node, value in zip(waiting, replies[len(watched):]) if value}
        doomed = {}
        for sub in self._subs.values():
            if not sub.started and not sub.incarnation and sub.node in appeared:
                sub.incarnation = appeared[sub.node]  # a (re)started worker will take it from the queue
            elif sub.incarnation in dead:
                doomed[sub] = worker_lost(
                    f"The worker of node {sub.node} serving the request stopped." if sub.started else
                    f"The worker of node {sub.node} the request was queued for stopped before starting it.")
        return doomed

    def _silent_on_dead_nodes(self) -> dict[Subscription, OpenAIError]:
        """Requests silent for a while on nodes the last heartbeat check found offline."""
        if not self._nodes_found_dead:
            return {}
        dead, self._nodes_found_dead = self._nodes_found_dead, set()
        silent_since = time.monotonic() - HEARTBEAT_CHECK_SECONDS
        return {sub: worker_lost(f"Node {sub.node} stopped answering while serving the request.")
                for sub in self._unwatched() if sub.node in dead and sub.heard_at <= silent_since}

    def _unwatched(self) -> list[Subscription]:
        """Requests with no worker incarnation to watch: only their node's heartbeat tells."""
        return [sub for sub in self._subs.values() if sub.incarnation is None]

    def _heartbeats_check(self) -> None:
        """Every few seconds, in the background (a database query must not hold up the streams): are the
        nodes of unwatched requests gone silent still heartbeating?"""
        now = time.monotonic()
        if now < self._next_heartbeat_check or (self._heartbeat_task and not self._heartbeat_task.done()):
            return
        self._next_heartbeat_check = now + HEARTBEAT_CHECK_SECONDS
        silent = {sub.node for sub in self._unwatched() if sub.heard_at <= now - HEARTBEAT_CHECK_SECONDS}
        if silent:
            self._heartbeat_task = asyncio.get_running_loop().create_task(self._find_dead_nodes(silent))

    async def _find_dead_nodes(self, names: set[str]) -> None:
        try:
            self._nodes_found_dead |= await self._node_check(names)
        except Exception:  # the database is not the broker: the liveness keys still decide
            logger.exception("checking the heartbeats of %s failed", sorted(names))

    async def _fail(self, doomed: dict[Subscription, OpenAIError]) -> None:
        """End these requests with their errors, after one last read of what was written before the death:
        a final event, or a start by another worker (which the request then follows), saves a request."""
        if not doomed:
            return
        watched = {sub: sub.incarnation for sub in doomed}
        self._deliver(await self._xread({sub.key: sub.last_id for sub in doomed}, block_ms=None))
        for sub, error in doomed.items():
            if self._subs.get(sub.key) is sub and sub.incarnation == watched[sub]:
                self.unsubscribe(sub)
                sub.inbox.put_nowait(error)

    def _fail_all(self, error: OpenAIError) -> None:
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub.inbox.put_nowait(error)

    async def _close_connection(self) -> None:
        client, self._client = self._client, None
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                await raw.disconnect()
                await client.connection_pool.release(raw)
            except Exception:  # it was broken already
                pass
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # it was broken already
                pass

    async def _reset_connection(self) -> None:
        await self._close_connection()
        await asyncio.sleep(0.1)  # a Redis refusing connections is not retried in a tight loop
