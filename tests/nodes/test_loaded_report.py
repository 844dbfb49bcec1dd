"""A node tells the gateway at once when its loaded models change, not at its next heartbeat."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx

from llmplatform import devstack


def test_a_model_loaded_on_a_node_is_reported_long_before_the_next_heartbeat(tmp_path, model_id):
    interval = 30.0
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'loaded.sqlite3'}", LLMP_DATA_DIR=str(tmp_path),
                             LLMP_HEARTBEAT_INTERVAL=str(interval), LLMP_NODE_DEGRADED_SECONDS="90",
                             LLMP_NODE_OFFLINE_SECONDS="120")
    key = devstack.database_prepare(env=env, key_name="loaded")
    stack = devstack.stack_start("loader", env=env, log_dir=tmp_path)

    def loaded() -> list[str]:
        with sqlite3.connect(tmp_path / "loaded.sqlite3") as db:
            row = db.execute("SELECT loaded_models FROM nodes_node WHERE name = 'loader'").fetchone()
        return json.loads(row[0] or "[]")

    try:
        assert model_id not in loaded()
        answer = httpx.post(f"{stack.base_url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": model_id, "prompt": "Hello", "max_tokens": 2}, timeout=120)
        answered_at = time.monotonic()
        assert answer.status_code == 200
        devstack.wait_until(lambda: model_id in loaded(), timeout=5, what="the loaded model in the node's record")
        assert time.monotonic() - answered_at < interval / 3
    finally:
        stack.stop()
