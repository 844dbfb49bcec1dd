"""A burst of streamed requests is served, every one of them, on a bounded number of Redis connections."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import redis
from django.conf import settings

from llmplatform import devstack
from llmplatform.aioredis import REDIS_MAX_CONNECTIONS

BURST = 200


@pytest.fixture(scope="module")
def burst_stack(tmp_path_factory):
    """A worker and a gateway of their own, whose queue timeout a burst on two cores cannot outlast."""
    root = tmp_path_factory.mktemp("burst")
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{root / 'burst.sqlite3'}", LLMP_DATA_DIR=str(root),
                             LLMP_QUEUE_TIMEOUT="900")
    key = devstack.database_prepare(env=env, key_name="burst")
    stack = devstack.stack_start("burst", env=env, log_dir=root)
    yield stack, key
    stack.stop()


class ConnectionSampler(threading.Thread):
    """Counts, a few times a second, the Redis connections the gateway process has named as its own."""

    def __init__(self, server_pid: int) -> None:
        super().__init__(daemon=True)
        self.names = {f"{settings.LLMP_REDIS_PREFIX}:gateway-{role}:{server_pid}" for role in ("commands", "reader")}
        self.peak: dict[str, int] = dict.fromkeys(self.names, 0)
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        client = redis.Redis.from_url(settings.REDIS_URL)
        while not self.done.wait(0.2):
            counts = dict.fromkeys(self.names, 0)
            for connection in client.client_list():
                if connection.get("name") in counts:
                    counts[connection["name"]] += 1
            self.peak = {name: max(self.peak[name], counts[name]) for name in self.names}
            self.samples += 1


async def _stream_one(client: httpx.AsyncClient, model_id: str, index: int) -> tuple[int, list[str]]:
    body = {"model": model_id, "messages": [{"role": "user", "content": f"Say a number: {index}"}],
            "max_tokens": 8, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return response.status_code, [(await response.aread()).decode()]
        return 200, [line async for line in response.aiter_lines() if line.startswith("data: ")]


def test_a_burst_of_200_concurrent_streams_is_served_in_full_on_a_bounded_number_of_redis_connections(
        burst_stack, model_id):
    stack, key = burst_stack
    sampler = ConnectionSampler(stack.server.popen.pid)
    sampler.start()

    async def burst():
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
        async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=httpx.Timeout(900, connect=60), limits=limits) as client:
            return await asyncio.gather(*(_stream_one(client, model_id, index) for index in range(BURST)))

    started = time.monotonic()
    try:
        results = asyncio.run(burst())
    finally:
        sampler.done.set()
        sampler.join()
    elapsed = time.monotonic() - started
    failures = [(status, lines[-1][:300]) for status, lines in results if status != 200 or lines[-1] != "data: [DONE]"]
    assert not failures, f"{len(failures)} of {BURST} failed, e.g. {failures[:3]}"
    for status, lines in results:
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert not any("error" in chunk for chunk in chunks)
    print(f"{BURST} streams in {elapsed:.1f}s; peak connections {sampler.peak} over {sampler.samples} samples")
    assert sampler.samples >= 3
    reader, commands = (sampler.peak[f"{settings.LLMP_REDIS_PREFIX}:gateway-{role}:{stack.server.popen.pid}"]
                        for role in ("reader", "commands"))
    assert reader == 1  # one reader for every stream of the process
    assert 1 <= commands <= REDIS_MAX_CONNECTIONS
