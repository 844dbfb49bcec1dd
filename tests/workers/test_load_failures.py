"""A model that fails to load on a node: its runner pool does not start it again while its file stays
the same. Real runner processes, real llama.cpp, real Redis; the files are generated (tiny_gguf)."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from tests.fixtures.tiny_gguf import tiny_gguf, tiny_tokens
from tests.workers.test_runner_pool import REDIS_URL, events, prefix, redis, wait_for  # noqa: F401 (fixtures)
from workers.engine.process import RunnerConfig
from workers.engine.supervisor import LoadFailure, ModelLoadFailed, RunnerPool, file_signature
from workers.messages import InferenceRequest, ModelRef

ARCHITECTURE_VALUE = b"\x05\x00\x00\x00\x00\x00\x00\x00llama"  # general.architecture's string, as GGUF stores it


def completion(max_tokens: int = 3) -> dict:
    return InferenceRequest.from_params(
        request_id=uuid.uuid4().hex, kind="completion", model=ModelRef(id="unused", source="upload", file_name="x"),
        params={"prompt": "hello world", "max_tokens": max_tokens, "temperature": 0.0}).to_wire()


class Records:
    """What the node keeps of load failures (the database, on a real node): here, a list and a flag."""

    def __init__(self) -> None:
        self.failures: list[LoadFailure] = []
        self.cleared = False

    def record(self, failure: LoadFailure) -> None:
        self.failures.append(failure)

    def still_failed(self, model_id: str) -> bool:
        return not self.cleared


@pytest.fixture
def records() -> Records:
    return Records()


@pytest.fixture
def pool(redis, prefix, tmp_path, records):  # noqa: F811
    def config(model_id: str, path: str) -> RunnerConfig:
        return RunnerConfig(model_id=model_id, path=path, node="unit", incarnation="unit-incarnation",
                            redis_url=REDIS_URL, redis_prefix=prefix, n_slots=1, n_ctx=256, n_threads=1)

    pool = RunnerPool(runner_config=config, size_of=lambda c: 10 << 20, redis=redis, redis_prefix=prefix,
                      max_models=2, memory_budget_bytes=1 << 30, on_load_failed=records.record,
                      load_still_failed=records.still_failed)
    yield pool
    pool.close()


def run(pool, redis, prefix, path, model_id="tiny") -> tuple[str, dict]:  # noqa: F811
    wire = completion()
    pool.submit(model_id=model_id, path=str(path), wire=wire)
    return events(redis, prefix, wire["request_id"])[-1]


def test_a_model_whose_runner_aborts_loading_it_is_not_started_again_until_its_file_changes(
        pool, redis, prefix, tmp_path, records):  # noqa: F811
    tokens = tiny_tokens()
    tokens[-1] = tokens[-2]  # llama.cpp aborts (GGML_ASSERT) on a duplicate token
    path = tiny_gguf(tmp_path / "tiny.gguf", tokens=tokens)

    event, error = run(pool, redis, prefix, path)
    assert event == "error" and error["code"] == "model_unavailable" and error["status"] == 503
    assert "its runner died while loading it, SIGABRT" in error["message"]
    assert str(tmp_path) not in error["message"]
    wait_for(lambda: records.failures)
    [failure] = records.failures
    assert failure.model_id == "tiny" and failure.file == file_signature(str(path)) and failure.recorded

    with pytest.raises(ModelLoadFailed, match="Model tiny failed to load on node unit: its runner died while "
                                              r"loading it, SIGABRT\. It is not tried there again"):
        pool.submit(model_id="tiny", path=str(path), wire=completion())
    assert pool.runners() == [] and pool.load_failures_changed() == []

    tiny_gguf(path)  # a new file: loadable
    assert [changed.model_id for changed in pool.load_failures_changed()] == ["tiny"]
    assert run(pool, redis, prefix, path)[0] == "done"
    assert len(records.failures) == 1


def test_a_model_llama_cpp_refuses_is_tried_again_once_its_mark_is_cleared(pool, redis, prefix, tmp_path, records):  # noqa: F811
    path = tiny_gguf(tmp_path / "tiny.gguf")
    good = path.read_bytes()
    path.write_bytes(good.replace(ARCHITECTURE_VALUE, ARCHITECTURE_VALUE[:-1] + b"x", 1))  # same size
    broken = path.stat()

    event, error = run(pool, redis, prefix, path)
    assert event == "error" and error["code"] == "model_unavailable"
    wait_for(lambda: records.failures)
    assert "could not be loaded" in records.failures[0].reason

    path.write_bytes(good)  # repaired, but with the broken file's size and mtime: the pool cannot tell
    os.utime(path, ns=(broken.st_atime_ns, broken.st_mtime_ns))
    assert pool.load_failures_changed() == []
    with pytest.raises(ModelLoadFailed):
        pool.submit(model_id="tiny", path=str(path), wire=completion())

    records.cleared = True  # an operator cleared the mark
    assert run(pool, redis, prefix, path)[0] == "done"
    assert pool.load_failures() == []


def test_a_runner_killed_once_while_loading_is_replaced_but_twice_in_a_row_marks_the_model(
        pool, redis, prefix, tmp_path, records):  # noqa: F811
    path = tiny_gguf(tmp_path / "tiny.gguf")
    wire = completion()
    pool.submit(model_id="tiny", path=str(path), wire=wire)
    first = pool.runners()[0]["pid"]
    os.kill(first, signal.SIGKILL)  # before it is ready: a kill from outside, so the request goes to a new runner
    wait_for(lambda: [runner["pid"] for runner in pool.runners()] not in ([], [first]), timeout=10)
    [second] = pool.runners()
    assert second["state"] == "loading" and not records.failures
    os.kill(second["pid"], signal.SIGKILL)
    end = events(redis, prefix, wire["request_id"])[-1]
    assert end[0] == "error" and end[1]["code"] == "model_unavailable" and "SIGKILL" in end[1]["message"]
    wait_for(lambda: records.failures)
    assert records.failures[0].reason.startswith("its runner died while loading it, SIGKILL")
