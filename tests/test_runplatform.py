"""``make run``'s command: Redis when needed, a worker and the server, all stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import httpx
import openai
import psutil
import pytest

from llmplatform import devstack


@dataclass
class Setup:
    env: dict[str, str]
    key: str
    redis_port: int
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def _setup(tmp_path, node: str) -> Setup:
    """A database with a key, and the environment of a ``make run`` that starts its own Redis."""
    redis_port, http_port = devstack.free_port(), devstack.free_port()
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'run.sqlite3'}", LLMP_DATA_DIR=str(tmp_path),
                             REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", PORT=str(http_port),
                             LLMP_NODE_NAME=node)
    return Setup(env, devstack.database_prepare(env=env, key_name="run"), redis_port, http_port)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_runplatform_starts_redis_a_worker_and_the_server_and_ctrl_c_stops_them(tmp_path, model_id):
    setup = _setup(tmp_path, "run-node")
    key, redis_port, http_port, base_url = setup.key, setup.redis_port, setup.http_port, setup.base_url
    run = devstack.start("runplatform", ["manage.py", "runplatform"], env=setup.env, log_dir=tmp_path)
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


def _children(run, word: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(run.popen.pid).children() if word in " ".join(p.cmdline())]


def test_runplatform_restarts_a_worker_killed_by_sigsegv_while_the_gateway_keeps_serving(tmp_path, model_id):
    setup = _setup(tmp_path, "crash-node")
    key, redis_port, http_port, base_url = setup.key, setup.redis_port, setup.http_port, setup.base_url
    run = devstack.start("runplatform", ["manage.py", "runplatform"], env=setup.env, log_dir=tmp_path)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)
    try:
        devstack.wait_ready(base_url, nodes={"crash-node"}, timeout=90, processes=(run,))
        (worker,) = _children(run, "workers")
        devstack.wait_until(lambda: worker.children(recursive=True), timeout=30, what="the embedded beat",
                            processes=(run,))
        beat_pids = [child.pid for child in worker.children(recursive=True)]
        stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Count to 500."}],
                                                max_tokens=1000, temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)  # tokens flow
        killed_at = time.monotonic()
        os.kill(worker.pid, signal.SIGSEGV)
        with pytest.raises(openai.APIError) as raised:
            for _ in chunks:
                pass
        assert time.monotonic() - killed_at < 5, "the stream should end within 5 s of the worker's death"
        assert "worker_lost" in str(raised.value.body or raised.value)
        assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200, "the gateway survives"
        devstack.wait_until(lambda: "SIGSEGV" in run.log() and "restarted" in run.log(), timeout=30,
                            what="the worker's restart", processes=(run,))
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in beat_pids), "the dead worker's embedded beat must die with it"
        (restarted,) = _children(run, "workers")
        assert restarted.pid != worker.pid

        def served() -> bool:
            reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4, temperature=0)
            return bool(reply.choices[0].message.content)

        devstack.wait_until(served, timeout=60, interval=0.5, what="a request served by the restarted worker",
                            processes=(run,))
        # Closing the terminal (SIGHUP) stops everything, the restarted worker included, at once.
        run.popen.send_signal(signal.SIGHUP)
        assert run.popen.wait(timeout=20) == 0
        gone, alive = psutil.wait_procs([restarted], timeout=5)
        assert not alive and not _port_open(redis_port) and not _port_open(http_port)
    finally:
        run.stop()


def test_runplatform_gives_up_on_a_worker_that_keeps_dying(tmp_path):
    # A node name the worker refuses: it exits at once, every time it is started.
    setup = _setup(tmp_path, "not a node name")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "manage.py", "runplatform"], cwd=devstack.ROOT, env=setup.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "the worker died 5 times within 5 minutes" in result.stderr
    # Backoff between the restarts: 1 + 2 + 4 + 8 seconds.
    assert [line for line in result.stderr.splitlines() if "restarting it in" in line and "exit 2" in line]
    assert "restarting it in 8s" in result.stderr
    assert time.monotonic() - started >= 15
    assert not _port_open(setup.http_port) and not _port_open(setup.redis_port)


def test_runplatform_stops_everything_when_the_server_dies(tmp_path):
    setup = _setup(tmp_path, "dying-node")
    redis_port, base_url = setup.redis_port, setup.base_url
    run = devstack.start("runplatform", ["manage.py", "runplatform"], env=setup.env, log_dir=tmp_path)
    try:
        devstack.wait_ready(base_url, nodes={"dying-node"}, timeout=90, processes=(run,))
        (server,) = _children(run, "uvicorn")
        (worker,) = _children(run, "workers")
        server.kill()
        assert run.popen.wait(timeout=30) != 0
        assert "the server stopped unexpectedly (SIGKILL" in run.log()
        assert not _port_open(redis_port)
        assert not psutil.pid_exists(worker.pid) or psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        run.stop()


def test_a_killed_runplatform_takes_its_worker_server_and_redis_with_it(tmp_path):
    setup = _setup(tmp_path, "orphan-node")
    run = devstack.start("runplatform", ["manage.py", "runplatform"], env=setup.env, log_dir=tmp_path)
    try:
        devstack.wait_ready(setup.base_url, nodes={"orphan-node"}, timeout=90, processes=(run,))
        children = psutil.Process(run.popen.pid).children()
        assert len(children) == 3, children  # redis-server, the worker, uvicorn
        run.popen.kill()
        run.popen.wait(timeout=10)
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"left running after runplatform was killed: {[p.cmdline() for p in alive]}"
        assert not _port_open(setup.redis_port) and not _port_open(setup.http_port)
    finally:
        run.stop()
