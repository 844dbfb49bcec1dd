"""A runner (one loaded model's process) that crashes: only its streams end; the node keeps serving."""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import httpx
import psutil

from llmplatform import devstack


def _runner_pids(worker: devstack.Process) -> list[int]:
    return [child.pid for child in psutil.Process(worker.popen.pid).children(recursive=True)
            if "workers.engine.process" in " ".join(child.cmdline())]


def test_a_segfaulting_runner_ends_its_streams_and_leaves_worker_and_gateway_serving(tmp_path, model_id):
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'crash.sqlite3'}", LLMP_DATA_DIR=str(tmp_path),
                             LLMP_HEARTBEAT_INTERVAL="0.5")
    key = devstack.database_prepare(env=env, key_name="crash")
    stack = devstack.stack_start("crashy", env=env, log_dir=tmp_path)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=60,
                          headers=headers) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            [runner] = _runner_pids(stack.worker)
            psutil.Process(runner).send_signal(signal.SIGSEGV)
            killed_at = time.monotonic()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            ended_at = time.monotonic()
        assert events[-1]["error"]["code"] == "worker_lost" and "SIGSEGV" in events[-1]["error"]["message"]
        assert ended_at - killed_at < 2.0  # the worker noticed at once: no liveness window to wait out
        assert stack.worker.popen.poll() is None  # the worker lives on
        assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200
        answer = httpx.post(f"{stack.base_url}/v1/completions", headers=headers, timeout=120,
                            json={"model": model_id, "prompt": "Hello", "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        assert _runner_pids(stack.worker) and runner not in _runner_pids(stack.worker)  # a new runner

        assert "SIGSEGV; 1 requests lost" in stack.worker.log()

        def reported() -> list:  # the node's heartbeat records the death on the node (its API and admin show it)
            with sqlite3.connect(tmp_path / "crash.sqlite3") as db:
                row = db.execute("SELECT runners FROM nodes_node WHERE name = 'crashy'").fetchone()
            return [exit for exit in json.loads(row[0] or "{}").get("exits", []) if exit["how"] == "SIGSEGV"]
        devstack.wait_until(reported, timeout=10, what="the runner's death in the node's report")
    finally:
        stack.stop()
