"""A worker that dies mid-answer: the client is told at once, not left waiting."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx

from llmplatform import devstack


def test_a_worker_killed_mid_stream_ends_the_stream_with_worker_lost(tmp_path, model_id):
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'loss.sqlite3'}", LLMP_DATA_DIR=str(tmp_path),
                             LLMP_NODE_LIVE_SECONDS="3", LLMP_HEARTBEAT_INTERVAL="0.5")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=devstack.ROOT, env=env, check=True)
    made = subprocess.run([sys.executable, "manage.py", "create_api_key", "--name", "loss"], cwd=devstack.ROOT,
                          env=env, check=True, capture_output=True, text=True)
    key = made.stdout.strip().splitlines()[-1]
    port = devstack.free_port()
    worker = devstack.start_worker("doomed", env=env, log_dir=tmp_path)
    server = devstack.start_server(port, env=env, log_dir=tmp_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        devstack.wait_ready(base_url, nodes={"doomed"}, timeout=90, processes=(worker, server))
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
        server.stop()
        worker.stop()
