"""The worker → gateway wire on real Redis: order, completeness, late readers, lost workers."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from apps.gateway.dispatch import request_events
from apps.gateway.errors import OpenAIError
from apps.nodes.services import node_register
from workers import protocol


def _hub() -> protocol.StreamHub:
    """The runners' writer, as a runner process has it."""
    return protocol.StreamHub(redis.Redis.from_url(settings.REDIS_URL), settings.LLMP_REDIS_PREFIX)


def _append(request_id: str, event: str, data: dict) -> None:
    protocol.request_event_append(redis.Redis.from_url(settings.REDIS_URL), settings.LLMP_REDIS_PREFIX, request_id,
                                  event, data)


async def _read_all(request_id: str, node: str) -> list[tuple[str, dict]]:
    events = []
    async for event, data in request_events(request_id, node):
        events.append((event, data))
        if event in (protocol.EVENT_DONE, protocol.EVENT_ERROR):
            return events
    return events


def _live_node() -> str:
    return node_register(name=f"wire-{uuid.uuid4().hex[:6]}", hostname="h", gpu_index=None, hardware={}).name


def test_a_reader_that_starts_late_gets_every_token_once_and_in_order():
    request_id = uuid.uuid4().hex
    hub = _hub()
    writer = hub.open(request_id)
    writer.emit(protocol.EVENT_START, {"node": "n"})
    pieces = [f"<{i}>" for i in range(500)]
    for piece in pieces:
        writer.token(piece)
    writer.emit(protocol.EVENT_DONE, {"finish_reason": "length", "usage": {}}, final=True)
    hub.flush()
    events = asyncio.run(_read_all(request_id, _live_node()))
    assert [data["text"] for event, data in events if event == protocol.EVENT_TOKEN] == pieces
    assert [event for event, _ in events][0] == protocol.EVENT_START
    assert events[-1][0] == protocol.EVENT_DONE


def test_a_reader_keeps_up_with_a_writer_in_another_thread():
    request_id = uuid.uuid4().hex
    pieces = [str(i) for i in range(300)]
    node = _live_node()

    async def scenario():
        def write():
            hub = _hub()
            writer = hub.open(request_id)
            writer.emit(protocol.EVENT_START, {"node": "n"})
            for piece in pieces:
                writer.token(piece)
            writer.emit(protocol.EVENT_DONE, {"finish_reason": "stop", "usage": {}}, final=True)
            hub.flush()

        reading = asyncio.create_task(_read_all(request_id, node))
        await asyncio.to_thread(write)
        return await reading

    events = asyncio.run(scenario())
    assert [d["text"] for e, d in events if e == protocol.EVENT_TOKEN] == pieces


def test_the_token_writer_learns_of_a_cancel_in_the_round_trip_that_appends_tokens():
    request_id = uuid.uuid4().hex
    hub = _hub()
    writer = hub.open(request_id)
    writer.token("a")
    hub.flush()
    assert not writer.cancel_seen
    redis.Redis.from_url(settings.REDIS_URL).set(protocol.cancel_key(settings.LLMP_REDIS_PREFIX, request_id), 1)
    writer.token("b")  # queued before the writer has looked: appended
    hub.flush()  # the writer appends "b" and sees the cancel flag in the same round trip
    assert writer.cancel_seen
    texts = [protocol.decode(f)[1].get("text") for _, f in redis.Redis.from_url(settings.REDIS_URL).xrange(
        protocol.stream_key(settings.LLMP_REDIS_PREFIX, request_id))]
    assert texts == ["a", "b"]


def test_a_request_cancelled_before_it_starts_is_seen_at_once():
    request_id = uuid.uuid4().hex
    redis.Redis.from_url(settings.REDIS_URL).set(protocol.cancel_key(settings.LLMP_REDIS_PREFIX, request_id), 1)
    hub = _hub()
    writer = hub.open(request_id)
    hub.flush()  # the writer's first round, before any event: it reads the flag of every open request
    assert writer.cancel_seen


def test_a_node_that_stops_heartbeating_fails_the_request_at_once(settings):
    settings.LLMP_QUEUE_TIMEOUT = 60
    node = _live_node()
    from apps.nodes.models import Node

    Node.objects.filter(name=node).update(last_heartbeat=timezone.now() - timedelta(hours=1))
    request_id = uuid.uuid4().hex
    _append(request_id, protocol.EVENT_START, {"node": node})
    with pytest.raises(OpenAIError) as caught:
        asyncio.run(_read_all(request_id, node))
    assert caught.value.status == 503 and caught.value.code == "worker_lost"


def test_a_message_the_worker_cannot_read_ends_its_request_with_an_error_at_once(platform):
    from llmplatform.celery import app as celery_app
    from workers.protocol import TASK_INFERENCE_RUN

    request_id = uuid.uuid4().hex
    # A message from a gateway of another version: no "model" fields the worker knows.
    celery_app.send_task(TASK_INFERENCE_RUN, queue=f"node.{platform.node}",
                         kwargs={"request_id": request_id, "kind": "chat", "model": {}, "params": {}})
    events = asyncio.run(asyncio.wait_for(_read_all(request_id, platform.node), timeout=15))
    event, data = events[-1]
    assert event == protocol.EVENT_ERROR and data["code"] == "internal_error"
    assert "cannot read this request" in data["message"]


def test_tokens_within_the_stream_interval_go_out_together_but_the_first_and_the_end_at_once():
    client = redis.Redis.from_url(settings.REDIS_URL)
    hub = protocol.StreamHub(client, settings.LLMP_REDIS_PREFIX, poll_seconds=30.0, interval_seconds=30.0)
    request_id = uuid.uuid4().hex
    key = protocol.stream_key(settings.LLMP_REDIS_PREFIX, request_id)
    writer = hub.open(request_id)

    def written(count: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if client.xlen(key) >= count:
                return True
            time.sleep(0.01)
        return client.xlen(key) >= count

    writer.emit(protocol.EVENT_START, {"node": "n"})
    writer.token("first")
    assert written(2, within=2.0)  # the first token does not wait for the interval
    writer.token(" second")
    writer.token(" third")
    assert not written(3, within=0.5)  # mid-stream tokens wait for the interval (or the end)
    writer.emit(protocol.EVENT_DONE, {"finish_reason": "stop", "usage": {}}, final=True)
    assert written(5, within=2.0)  # the end goes out at once, with what waited before it
    events = [protocol.decode(fields) for _, fields in client.xrange(key)]
    assert [event for event, _ in events] == [protocol.EVENT_START] + [protocol.EVENT_TOKEN] * 3 + [protocol.EVENT_DONE]
    assert "".join(data["text"] for event, data in events if event == protocol.EVENT_TOKEN) == "first second third"
