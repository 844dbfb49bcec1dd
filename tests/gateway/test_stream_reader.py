"""The gateway's one reader of request streams, on real Redis: sharing, waking, leaving, failing, liveness."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import pytest
import redis
from django.conf import settings

from apps.gateway.dispatch import request_events
from apps.gateway.errors import OpenAIError
from apps.gateway.streams import stream_reader
from apps.nodes.services import node_register
from llmplatform import devstack
from llmplatform.aioredis import client_name
from workers import protocol
from workers.liveness import WorkerLiveness


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


class _Writer:
    """Writes a request's events in the wire's format, one entry per call (what the reader reads)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def emit(self, event: str, data: dict) -> None:
        protocol.request_event_append(_redis(), settings.LLMP_REDIS_PREFIX, self.request_id, event, data)

    def emit_token(self, text: str) -> None:
        self.emit(protocol.EVENT_TOKEN, {"text": text})

    def close(self) -> None:
        pass


def _stream(request_id: str) -> _Writer:
    return _Writer(request_id)


def _live_node() -> str:
    return node_register(name=f"reader-{uuid.uuid4().hex[:6]}", hostname="h", gpu_index=None, hardware={}).name


async def _read_all(request_id: str, node: str, incarnation: str | None = None) -> list[tuple[str, dict]]:
    return [(event, data) async for event, data in request_events(request_id, node, incarnation)]


def _named_connections(name: str) -> int:
    return sum(1 for client in _redis().client_list() if client.get("name") == name)


def test_a_hundred_requests_share_one_reader_connection_and_each_gets_its_events_in_order():
    node = _live_node()
    request_ids = [uuid.uuid4().hex for _ in range(100)]
    pieces = [str(i) for i in range(40)]

    def write(request_id: str) -> None:
        writer = _stream(request_id)
        writer.emit(protocol.EVENT_START, {"node": node})
        for piece in pieces:
            writer.emit_token(piece)
        writer.emit(protocol.EVENT_DONE, {"finish_reason": "length", "usage": {}})

    async def scenario():
        readers = [asyncio.create_task(_read_all(request_id, node)) for request_id in request_ids]
        await asyncio.sleep(0)  # every request subscribed before the first token exists
        writers = [asyncio.to_thread(write, request_id) for request_id in request_ids]
        await asyncio.gather(*writers)
        results = await asyncio.gather(*readers)
        return results, _named_connections(client_name("reader"))

    results, reader_connections = asyncio.run(scenario())
    for events in results:
        assert [event for event, _ in events] == ["start", *["token"] * len(pieces), "done"]
        assert [data["text"] for event, data in events if event == protocol.EVENT_TOKEN] == pieces
    assert reader_connections == 1


def test_a_request_that_arrives_while_the_reader_blocks_is_read_at_once():
    node = _live_node()

    async def scenario() -> list[float]:
        idle = asyncio.create_task(_read_all(uuid.uuid4().hex, node))  # keeps the reader blocked in XREAD
        await asyncio.sleep(0.2)
        latencies = []
        for _ in range(5):
            request_id = uuid.uuid4().hex
            _stream(request_id).emit(protocol.EVENT_START, {"node": node})
            await asyncio.sleep(0.3)  # well inside the reader's one-second block
            started = time.monotonic()
            events = request_events(request_id, node)
            assert (await anext(events))[0] == protocol.EVENT_START
            latencies.append(time.monotonic() - started)
            await events.aclose()
        idle.cancel()
        return latencies

    latencies = asyncio.run(scenario())
    assert max(latencies) < 0.25, latencies


def test_a_request_that_stops_listening_leaves_the_reader():
    node = _live_node()

    async def scenario() -> tuple[int, int, int]:
        reader = stream_reader()
        closed_id, cancelled_id = uuid.uuid4().hex, uuid.uuid4().hex
        _stream(closed_id).emit(protocol.EVENT_START, {"node": node})
        closing = request_events(closed_id, node)
        await anext(closing)
        cancelled = asyncio.create_task(_read_all(cancelled_id, node))
        await asyncio.sleep(0.1)
        both = reader.waiting
        await closing.aclose()
        one = reader.waiting
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        return both, one, reader.waiting

    assert asyncio.run(scenario()) == (2, 1, 0)


@pytest.fixture
def own_redis(tmp_path, settings):
    """A Redis server of this test's own, which the test can stop and start again."""
    port = devstack.free_port()

    def start() -> subprocess.Popen:
        server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                   "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        devstack.wait_until(client.ping, timeout=10, what="redis-server answering")
        return server

    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    servers = [start()]
    yield servers, start
    for server in servers:
        server.kill()
        server.wait()


def test_a_redis_that_goes_away_fails_the_waiting_requests_with_broker_unavailable_and_the_reader_recovers(
        own_redis):
    servers, start = own_redis
    node = _live_node()

    async def scenario():
        waiting = [asyncio.create_task(_read_all(uuid.uuid4().hex, node)) for _ in range(3)]
        await asyncio.sleep(0.3)
        servers[0].kill()
        servers[0].wait()
        failures = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), timeout=60)
        servers.append(await asyncio.to_thread(start))
        request_id = uuid.uuid4().hex
        writer = _stream(request_id)
        writer.emit(protocol.EVENT_START, {"node": node})
        writer.emit(protocol.EVENT_DONE, {"finish_reason": "stop", "usage": {}})
        after = await asyncio.wait_for(_read_all(request_id, node), timeout=30)
        return failures, after

    failures, after = asyncio.run(scenario())
    assert all(isinstance(failure, OpenAIError) for failure in failures), failures
    assert {(failure.status, failure.code) for failure in failures} == {(503, "broker_unavailable")}
    assert [event for event, _ in after] == [protocol.EVENT_START, protocol.EVENT_DONE]


def test_a_queued_request_fails_with_worker_lost_once_the_worker_it_was_queued_for_is_gone():
    node = _live_node()
    worker = WorkerLiveness(_redis(), prefix=settings.LLMP_REDIS_PREFIX, node=node)
    worker.start()

    async def scenario() -> tuple[OpenAIError, float]:
        reading = asyncio.create_task(_read_all(uuid.uuid4().hex, node, worker.incarnation))
        await asyncio.sleep(1.5)  # the reader has checked the worker at least once, and found it alive
        assert not reading.done()
        stopped = time.monotonic()
        await asyncio.to_thread(worker.stop)
        with pytest.raises(OpenAIError) as caught:
            await reading
        return caught.value, time.monotonic() - stopped

    error, waited = asyncio.run(scenario())
    assert (error.status, error.code) == (503, "worker_lost")
    assert waited < protocol.WORKER_ALIVE_TTL_SECONDS + 1.5


def test_a_request_queued_while_no_worker_runs_follows_the_worker_that_starts_and_fails_when_it_dies():
    node = _live_node()
    request_id = uuid.uuid4().hex
    worker = WorkerLiveness(_redis(), prefix=settings.LLMP_REDIS_PREFIX, node=node)

    async def scenario() -> tuple[list[str], OpenAIError]:
        events = request_events(request_id, node, None)
        first = asyncio.create_task(anext(events))
        await asyncio.sleep(1.5)  # no incarnation to watch: it waits
        assert not first.done()
        await asyncio.to_thread(worker.start)
        writer = _stream(request_id)
        writer.emit(protocol.EVENT_START, {"node": node, "worker": worker.incarnation})
        writer.emit_token("a")
        writer.close()
        seen = [(await first)[0], (await anext(events))[0]]
        await asyncio.to_thread(worker.stop)
        with pytest.raises(OpenAIError) as caught:
            await anext(events)
        return seen, caught.value

    seen, error = asyncio.run(scenario())
    assert seen == [protocol.EVENT_START, protocol.EVENT_TOKEN]
    assert error.code == "worker_lost" and "serving the request" in error.message


def test_events_written_just_before_the_worker_went_away_are_delivered_not_replaced_by_worker_lost():
    node = _live_node()
    request_id = uuid.uuid4().hex
    worker = WorkerLiveness(_redis(), prefix=settings.LLMP_REDIS_PREFIX, node=node)
    worker.start()
    writer = _stream(request_id)
    writer.emit(protocol.EVENT_START, {"node": node, "worker": worker.incarnation})

    async def scenario() -> list[str]:
        events = request_events(request_id, node, worker.incarnation)
        assert (await anext(events))[0] == protocol.EVENT_START

        def finish_and_stop() -> None:  # the answer's last event, then a clean stop, in one go
            writer.emit(protocol.EVENT_DONE, {"finish_reason": "stop", "usage": {}})
            worker.stop()

        await asyncio.to_thread(finish_and_stop)
        return [event async for event, _ in events]

    assert asyncio.run(scenario()) == [protocol.EVENT_DONE]
