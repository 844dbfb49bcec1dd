"""Runner processes as the worker drives them: real processes, the real model, real Redis."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import redis as redis_lib

from workers import protocol
from workers.bundled import bundled_model_path
from workers.engine.process import RunnerConfig
from workers.engine.supervisor import RUNNER_OMP_SPINCOUNT, PoolExhausted, RunnerPool, runner_environment
from workers.messages import InferenceRequest, ModelRef

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> str:
    return f"llmp-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis():
    return redis_lib.Redis.from_url(REDIS_URL)


def make_pool(redis, prefix, tmp_path, **options) -> RunnerPool:
    def config(model_id: str, path: str) -> RunnerConfig:
        return RunnerConfig(model_id=model_id, path=path, node="unit", incarnation="unit-incarnation",
                            redis_url=REDIS_URL, redis_prefix=prefix, n_slots=4, n_ctx=512, n_threads=2,
                            lock_path=str(tmp_path / "decode.lock"))

    settings = {"max_models": 2, "memory_budget_bytes": 8 << 30, **options}
    return RunnerPool(runner_config=config, size_of=lambda c: options.get("size", 100 << 20), redis=redis,
                      redis_prefix=prefix, max_models=settings["max_models"],
                      memory_budget_bytes=settings["memory_budget_bytes"])


@pytest.fixture
def pool(redis, prefix, tmp_path):
    pool = make_pool(redis, prefix, tmp_path)
    yield pool
    pool.close()


def chat(max_tokens: int = 16, content: str = "Say hello.") -> dict:
    return InferenceRequest.from_params(
        request_id=uuid.uuid4().hex, kind="chat", model=ModelRef(id="unused", source="bundled", file_name="x"),
        params={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0.0},
    ).to_wire()


def events(redis, prefix, request_id, *, timeout: float = 60.0, until=("done", "error", "cancelled")):
    key, last, seen, deadline = protocol.stream_key(prefix, request_id), "0", [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, entries in redis.xread({key: last}, block=500) or []:
            for entry_id, fields in entries:
                last = entry_id
                seen.append(protocol.decode(fields))
                if seen[-1][0] in until:
                    return seen
    raise AssertionError(f"no end event for {request_id} in {timeout}s: {seen}")


def submit(pool, wire, model_id="smollm2", path=None):
    pool.submit(model_id=model_id, path=path or str(bundled_model_path()), wire=wire)
    return wire["request_id"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_request_is_handed_over_at_once_and_the_runner_streams_it(pool, redis, prefix):
    started = time.monotonic()
    request_id = submit(pool, chat())
    assert time.monotonic() - started < 0.5  # the model loads in the runner, not in the caller
    seen = events(redis, prefix, request_id)
    assert seen[0][0] == "start" and seen[0][1]["worker"] == "unit-incarnation"
    assert seen[-1][0] == "done" and seen[-1][1]["usage"]["completion_tokens"] >= 1
    text = "".join(d["text"] for e, d in seen if e == "token")
    assert text
    runner = pool.runners()[0]
    assert runner["state"] == "ready" and runner["memory"]["weights_bytes"] > 50 << 20
    assert runner["memory"]["kv_bytes"] > 0 and runner["memory"]["slots"] == 4


def test_concurrent_requests_share_one_runner_and_its_decode_steps(pool, redis, prefix):
    ids = [submit(pool, chat(max_tokens=24, content=f"Tell me about the number {i}.")) for i in range(4)]
    ends = [events(redis, prefix, i)[-1] for i in ids]
    assert all(event == "done" for event, _ in ends)
    assert max(data["timings"]["max_batch_sequences"] for _, data in ends) > 1
    assert len(pool.runners()) == 1


def test_unloading_an_idle_model_stops_its_runner(pool, redis, prefix):
    events(redis, prefix, submit(pool, chat(max_tokens=2)))
    pid = pool.runners()[0]["pid"]
    wait_for(lambda: pool.in_flight() == 0)
    assert pool.unload() == ["smollm2"]
    wait_for(lambda: not alive(pid))
    assert pool.loaded() == []


def test_a_model_serving_a_request_is_unloaded_when_the_request_ends(pool, redis, prefix):
    request_id = submit(pool, chat(max_tokens=64))
    events(redis, prefix, request_id, until=("token",))
    pid = pool.runners()[0]["pid"]
    assert pool.unload(["smollm2"]) == []  # returns at once; still serving
    assert events(redis, prefix, request_id)[-1][0] == "done"
    wait_for(lambda: not alive(pid))
    assert pool.loaded() == []
    # The next request loads the model afresh.
    assert events(redis, prefix, submit(pool, chat(max_tokens=2)))[-1][0] == "done"


def test_the_least_recently_used_idle_runner_makes_room(redis, prefix, tmp_path):
    pool = make_pool(redis, prefix, tmp_path, max_models=1)
    try:
        events(redis, prefix, submit(pool, chat(max_tokens=2), model_id="first"))
        wait_for(lambda: pool.in_flight() == 0)
        first_pid = pool.runners()[0]["pid"]
        events(redis, prefix, submit(pool, chat(max_tokens=2), model_id="second"))
        assert pool.loaded() == ["second"]
        wait_for(lambda: not alive(first_pid))
    finally:
        pool.close()


def test_a_model_over_the_budget_is_refused(redis, prefix, tmp_path):
    pool = make_pool(redis, prefix, tmp_path, memory_budget_bytes=10 << 20, size=20 << 20)
    with pytest.raises(PoolExhausted, match="more than this node's budget"):
        submit(pool, chat())


def test_a_file_llama_cpp_cannot_load_fails_its_requests(pool, redis, prefix, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    seen = events(redis, prefix, submit(pool, chat(), model_id="bad", path=str(bad)))
    assert seen[-1][0] == "error" and seen[-1][1]["code"] == "model_unavailable"
    assert pool.loaded() == []


def test_a_runner_that_segfaults_ends_its_streams_and_the_next_request_gets_a_new_runner(pool, redis, prefix):
    request_id = submit(pool, chat(max_tokens=400, content="Write a very long story."))
    events(redis, prefix, request_id, until=("token",))
    pid = pool.runners()[0]["pid"]
    killed = time.monotonic()
    os.kill(pid, signal.SIGSEGV)
    end = events(redis, prefix, request_id)[-1]
    assert end[0] == "error" and end[1]["code"] == "worker_lost" and "SIGSEGV" in end[1]["message"]
    assert time.monotonic() - killed < 2.0
    assert pool.exits[-1]["how"] == "SIGSEGV"
    seen = events(redis, prefix, submit(pool, chat(max_tokens=4)))
    assert seen[-1][0] == "done" and pool.runners()[0]["pid"] != pid


def test_requests_a_runner_had_not_started_go_to_a_new_runner(pool, redis, prefix):
    ids = [submit(pool, chat(max_tokens=4)) for _ in range(3)]  # queued while the runner loads
    os.kill(pool.runners()[0]["pid"], signal.SIGKILL)
    for request_id in ids:
        assert events(redis, prefix, request_id)[-1][0] == "done"


def test_runners_decode_only_while_holding_the_node_lock(pool, redis, prefix, tmp_path):
    """The node's runners take turns on its threads: while another holder has the lock, none decodes."""
    import fcntl

    events(redis, prefix, submit(pool, chat(max_tokens=2)))  # loaded and idle
    with open(tmp_path / "decode.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a runner of another model would during its step
        request_id = submit(pool, chat(max_tokens=4))
        with pytest.raises(AssertionError, match="no end event"):
            events(redis, prefix, request_id, timeout=1.5, until=("token", "done", "error"))
        fcntl.flock(held, fcntl.LOCK_UN)
    assert events(redis, prefix, request_id)[-1][0] == "done"


@pytest.mark.parametrize("wire", [
    chat(content="hello \ud800 there"),
    InferenceRequest.from_params(request_id=uuid.uuid4().hex, kind="embedding",
                                 model=ModelRef(id="unused", source="bundled", file_name="x"),
                                 params={"input": ["fine", "lone \udfff surrogate"]}).to_wire(),
], ids=["chat", "embedding"])
def test_text_that_is_not_text_is_a_400_and_the_runner_serves_on(pool, redis, prefix, wire):
    """JSON can carry a lone surrogate; the gateway refuses it, and the runner would too."""
    event, data = events(redis, prefix, submit(pool, wire))[-1]
    assert event == "error" and data["status"] == 400 and data["code"] == "invalid_value"
    pid = pool.runners()[0]["pid"]
    assert events(redis, prefix, submit(pool, chat(max_tokens=2)))[-1][0] == "done"
    assert pool.runners()[0]["pid"] == pid


def test_a_runner_waits_between_steps_without_spinning_unless_the_operator_says_otherwise(pool, redis, prefix):
    events(redis, prefix, submit(pool, chat(max_tokens=2)))
    pid = pool.runners()[0]["pid"]
    environ = dict(item.split("=", 1) for item in open(f"/proc/{pid}/environ").read().split("\0") if "=" in item)
    assert environ["GOMP_SPINCOUNT"] == RUNNER_OMP_SPINCOUNT
    assert runner_environment({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert runner_environment({"GOMP_SPINCOUNT": "1000000"})["GOMP_SPINCOUNT"] == "1000000"
