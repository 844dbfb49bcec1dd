"""``make run``'s command: Redis when needed, a worker and the server, all stopped by Ctrl-C."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import openai
import psutil

from llmplatform import devstack


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_runplatform_starts_redis_a_worker_and_the_server_and_ctrl_c_stops_them(tmp_path, model_id):
    redis_port, http_port = devstack.free_port(), devstack.free_port()
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'run.sqlite3'}", LLMP_DATA_DIR=str(tmp_path),
                             REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", PORT=str(http_port),
                             LLMP_NODE_NAME="run-node")
    key = devstack.database_prepare(env=env, key_name="run")
    run = devstack.start("runplatform", ["manage.py", "runplatform"], env=env, log_dir=tmp_path)
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        devstack.wait_ready(base_url, nodes={"run-node"}, timeout=90, processes=(run,))
        assert _port_open(redis_port), "runplatform should have started its own redis-server"
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True)
            if chunk.choices)
        assert text
        log = run.log()
        assert f"{base_url}/admin/" in log and "create_api_key" in log
        run.popen.send_signal(signal.SIGINT)
        assert run.popen.wait(timeout=30) == 0
        assert not _port_open(http_port) and not _port_open(redis_port)
        # The worker stopped cleanly too: on the way out it took its node out of routing.
        with sqlite3.connect(tmp_path / "run.sqlite3") as db:
            (last_heartbeat,) = db.execute("SELECT last_heartbeat FROM nodes_node WHERE name = 'run-node'").fetchone()
        stopped_at = datetime.fromisoformat(last_heartbeat).replace(tzinfo=timezone.utc)
        assert stopped_at < datetime.now(timezone.utc) - timedelta(hours=1)
    finally:
        run.stop()


def test_runplatform_without_redis_explains_how_to_install_it(tmp_path):
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'run.sqlite3'}", LLMP_DATA_DIR=str(tmp_path),
                             REDIS_URL=f"redis://127.0.0.1:{devstack.free_port()}/0", PATH="/nonexistent")
    result = subprocess.run([sys.executable, "manage.py", "runplatform"], cwd=devstack.ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "apt-get install -y redis-server" in result.stderr


def test_runplatform_stops_everything_when_one_of_its_processes_dies(tmp_path):
    redis_port, http_port = devstack.free_port(), devstack.free_port()
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'run.sqlite3'}", LLMP_DATA_DIR=str(tmp_path),
                             REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", PORT=str(http_port),
                             LLMP_NODE_NAME="dying-node")
    devstack.database_prepare(env=env, key_name="run")
    run = devstack.start("runplatform", ["manage.py", "runplatform"], env=env, log_dir=tmp_path)
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        devstack.wait_ready(base_url, nodes={"dying-node"}, timeout=90, processes=(run,))
        server_pid = next(p.pid for p in psutil.Process(run.popen.pid).children() if "uvicorn" in " ".join(p.cmdline()))
        psutil.Process(server_pid).kill()
        assert run.popen.wait(timeout=30) != 0
        assert "stopped unexpectedly" in run.log()
        assert not _port_open(redis_port)
    finally:
        run.stop()
