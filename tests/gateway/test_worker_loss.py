"""A worker that dies mid-answer: the client is told at once, not left waiting."""

from __future__ import annotations

import json
import signal
import time

import httpx

from llmplatform import devstack


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
