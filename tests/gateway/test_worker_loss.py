"""A worker that dies mid-answer: the client is told at once, not left waiting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from django.conf import settings

from apps.gateway import validation
from apps.gateway.dispatch import _inflight_key, request_events, request_send
from apps.models.services import model_register_bundled
from apps.nodes.models import Node, node_queue_name
from llmplatform import devstack
from workers import protocol


def test_a_worker_killed_mid_stream_ends_the_stream_with_worker_lost(tmp_path, model_id):
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'loss.sqlite3'}", LLMP_DATA_DIR=str(tmp_path),
                             LLMP_NODE_OFFLINE_SECONDS="3", LLMP_HEARTBEAT_INTERVAL="0.5")
    key = devstack.database_prepare(env=env, key_name="loss")
    stack = devstack.stack_start("doomed", env=env, log_dir=tmp_path)
    base_url, worker = stack.base_url, stack.worker
    try:
        body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            worker.popen.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            ended_at = time.monotonic()
        assert "error" in events[-1], events[-1]
        assert events[-1]["error"]["code"] == "worker_lost"
        # Noticed within the liveness window plus one re-check, not after the 120 s idle timeout.
        assert ended_at - killed_at < 3 + 2 + 2
    finally:
        stack.stop()


# --- The liveness keys: a dead worker is noticed within 5 s, whatever the heartbeat window -----------

OFFLINE_SECONDS = 60  # the heartbeat window, far beyond every limit below: only the liveness keys can be quick
NOTICED_WITHIN = 5.0


@dataclass
class Cluster:
    """A gateway of this module's own; tests start (and kill) worker nodes behind it."""

    base_url: str
    key: str
    env: dict[str, str]
    log_dir: Path
    server: devstack.Process

    def worker(self, node: str, *extra: str) -> devstack.Process:
        """Start a worker for ``node`` and wait until it is live and its incarnation is announced."""
        before = _incarnation(node)
        worker = devstack.start_worker(node, env=self.env, log_dir=self.log_dir, extra=["--no-default-queue", *extra])
        devstack.wait_until(lambda: _incarnation(node) not in (None, before), timeout=120,
                            what=f"a new incarnation of {node}", processes=(worker, self.server))
        devstack.wait_ready(self.base_url, nodes={node}, timeout=60, processes=(worker, self.server))
        return worker

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _incarnation(node: str) -> str | None:
    value = redis.Redis.from_url(settings.REDIS_URL).get(protocol.node_incarnation_key(settings.LLMP_REDIS_PREFIX, node))
    return value.decode() if value else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("liveness")
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{root / 'liveness.sqlite3'}", LLMP_DATA_DIR=str(root),
                             LLMP_NODE_OFFLINE_SECONDS=str(OFFLINE_SECONDS), LLMP_HEARTBEAT_INTERVAL="1")
    key = devstack.database_prepare(env=env, key_name="liveness")
    port = devstack.free_port()
    server = devstack.start_server(port, env=env, log_dir=root)
    base_url = f"http://127.0.0.1:{port}"
    devstack.wait_until(lambda: httpx.get(f"{base_url}/health").status_code == 200, timeout=60,
                        what="the gateway", processes=(server,))
    yield Cluster(base_url, key, env, root, server)
    server.stop()


def _first_token(lines) -> None:
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
            return
    raise AssertionError("the stream ended before its first token")


def test_a_worker_that_segfaults_mid_stream_is_reported_lost_within_5s_and_its_restart_serves_the_next_request(
        cluster, model_id):
    node = f"crash-{uuid.uuid4().hex[:6]}"
    worker = cluster.worker(node)
    replacement = None
    try:
        body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{cluster.base_url}/v1/completions", json=body, timeout=60,
                          headers=cluster.headers()) as response:
            lines = response.iter_lines()
            _first_token(lines)
            os.kill(worker.popen.pid, signal.SIGSEGV)
            killed_at = time.monotonic()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            ended_at = time.monotonic()
        assert worker.popen.wait(timeout=10) == -signal.SIGSEGV
        assert events[-1].get("error", {}).get("code") == "worker_lost", events[-1]
        print(f"segfault to worker_lost: {ended_at - killed_at:.2f}s")
        assert ended_at - killed_at < NOTICED_WITHIN
        assert httpx.get(f"{cluster.base_url}/health").status_code == 200  # the gateway lives on

        replacement = cluster.worker(node)
        sent_at = time.monotonic()
        answer = httpx.post(f"{cluster.base_url}/v1/completions", headers=cluster.headers(), timeout=60,
                            json={"model": model_id, "prompt": "Hello", "max_tokens": 8})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert time.monotonic() - sent_at < OFFLINE_SECONDS / 2
    finally:
        worker.stop()
        if replacement is not None:
            replacement.stop()


def test_requests_queued_on_a_worker_that_is_killed_before_starting_them_end_with_worker_lost_within_5s(
        cluster, model_id):
    node = f"busy-{uuid.uuid4().hex[:6]}"
    worker = cluster.worker(node, "--concurrency", "1")
    inflight = redis.Redis.from_url(settings.REDIS_URL)
    try:
        long_body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0,
                     "stream": True}
        with httpx.stream("POST", f"{cluster.base_url}/v1/completions", json=long_body, timeout=60,
                          headers=cluster.headers()) as running, ThreadPoolExecutor(2) as pool:
            lines = running.iter_lines()
            _first_token(lines)

            def queued_request() -> tuple[httpx.Response, float]:
                answer = httpx.post(f"{cluster.base_url}/v1/completions", headers=cluster.headers(), timeout=60,
                                    json={"model": model_id, "prompt": "Hello", "max_tokens": 8})
                return answer, time.monotonic()

            queued = [pool.submit(queued_request) for _ in range(2)]
            devstack.wait_until(lambda: inflight.zcard(_inflight_key(node)) == 3, timeout=30,
                                what="both requests queued behind the running one")
            os.kill(worker.popen.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            stream_ended_at = time.monotonic()
            answers = [future.result(timeout=30) for future in queued]
        assert events[-1].get("error", {}).get("code") == "worker_lost", events[-1]
        assert stream_ended_at - killed_at < NOTICED_WITHIN
        for answer, answered_at in answers:
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "worker_lost", answer.text
            print(f"kill to worker_lost for a queued request: {answered_at - killed_at:.2f}s")
            assert answered_at - killed_at < NOTICED_WITHIN
    finally:
        worker.stop()


def test_a_request_left_in_a_queue_past_its_expiry_is_never_run_by_a_worker_started_later(
        cluster, model_id, settings):
    name = f"late-{uuid.uuid4().hex[:6]}"
    node = Node(name=name, queue=node_queue_name(name))  # no worker has ever served it
    model = model_register_bundled()
    valid = validation.completion_request({"model": model_id, "prompt": "Hello", "max_tokens": 8})
    stale, fresh = uuid.uuid4().hex, uuid.uuid4().hex

    settings.LLMP_QUEUE_TIMEOUT = 1
    asyncio.run(request_send(message=valid.message(stale, model.worker_spec()), node=node))
    expired_at = time.time() + settings.LLMP_QUEUE_TIMEOUT
    devstack.wait_until(lambda: time.time() > expired_at + 0.5, timeout=10, what="the message's expiry")

    settings.LLMP_QUEUE_TIMEOUT = 60
    worker = cluster.worker(name)
    try:
        async def serve_fresh() -> list[str]:
            incarnation = await request_send(message=valid.message(fresh, model.worker_spec()), node=node)
            return [event async for event, _ in request_events(fresh, name, incarnation)]

        # The queue is first in, first out: once the fresh request is served, the stale one was seen.
        assert asyncio.run(serve_fresh())[-1] == protocol.EVENT_DONE
        assert f"Discarding revoked task: {protocol.TASK_INFERENCE_RUN}[{stale}]" in worker.log()
        assert not redis.Redis.from_url(settings.REDIS_URL).exists(
            protocol.stream_key(settings.LLMP_REDIS_PREFIX, stale))  # it never started
    finally:
        worker.stop()


def test_a_worker_stopped_cleanly_finishes_the_answer_it_was_streaming_then_withdraws_its_liveness_at_once(
        cluster, model_id):
    node = f"calm-{uuid.uuid4().hex[:6]}"
    worker = cluster.worker(node)
    incarnation = _incarnation(node)
    alive = redis.Redis.from_url(settings.REDIS_URL)
    try:
        body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{cluster.base_url}/v1/completions", json=body, timeout=60,
                          headers=cluster.headers()) as response:
            lines = response.iter_lines()
            _first_token(lines)
            worker.popen.terminate()  # a warm shutdown: running requests finish first
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop"), events[-1]
        assert worker.popen.wait(timeout=60) == 0
        # Gone when the process is, not a TTL later.
        assert not alive.exists(protocol.worker_alive_key(settings.LLMP_REDIS_PREFIX, incarnation))
        assert _incarnation(node) is None
    finally:
        worker.stop()
