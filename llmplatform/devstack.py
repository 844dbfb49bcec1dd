"""Starting real platform processes (a node worker, the ASGI server) and waiting until they serve.

Used by the test suite and the benchmarks, which run the platform exactly as ``make run``
does: separate processes talking through Redis and the database.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO = field(repr=False)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log_file.close()


def start(name: str, args: list[str], *, env: dict[str, str], log_dir: Path) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")
    popen = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log_file,
                             stderr=subprocess.STDOUT)
    return Process(name, popen, log_path, log_file)


def start_worker(node: str, *, env: dict[str, str], log_dir: Path, extra: list[str] = ()) -> Process:
    return start(f"worker-{node}", ["-m", "workers", "--node", node, *extra], env=env, log_dir=log_dir)


def start_server(port: int, *, env: dict[str, str], log_dir: Path) -> Process:
    return start(f"server-{port}", ["-m", "uvicorn", "llmplatform.asgi:application", "--host", "127.0.0.1",
                                    "--port", str(port), "--no-access-log"], env=env, log_dir=log_dir)


def server_start_live(*, env: dict[str, str], log_dir: Path, what: str = "the server",
                      timeout: float = 60) -> tuple[str, Process]:
    """Start an ASGI server on a free port and wait until its /health answers; returns its URL and process."""
    port = free_port()
    server = start_server(port, env=env, log_dir=log_dir)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{base_url}/health"), timeout=timeout, what=what, processes=(server,))
    except BaseException:
        server.stop()
        raise
    return base_url, server


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate, *, timeout: float, interval: float = 0.1, what: str,
               processes: tuple[Process, ...] = ()) -> None:
    """Poll ``predicate`` until it holds; fail early, with logs, if a process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited ({process.popen.returncode}) while waiting for "
                                   f"{what}:\n{process.log()[-4000:]}")
        try:
            if predicate():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in processes)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{logs}")


def wait_ready(base_url: str, *, nodes: set[str], timeout: float, processes: tuple[Process, ...]) -> None:
    """Until /health/ready answers 200 with every node in ``nodes`` live."""

    def ready() -> bool:
        reply = httpx.get(f"{base_url}/health/ready", timeout=2)
        return reply.status_code == 200 and nodes <= set(reply.json()["checks"]["workers"]["live_nodes"])

    wait_until(ready, timeout=timeout, what=f"{base_url} ready with nodes {sorted(nodes)}", processes=processes)


def child_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def database_prepare(*, env: dict[str, str], key_name: str) -> str:
    """Migrate the database ``env`` points at (a fresh process, as an operator would) and return
    a new API key for it, made by ``create_api_key``."""
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    made = subprocess.run([sys.executable, "manage.py", "create_api_key", "--name", key_name], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True)
    return made.stdout.strip().splitlines()[-1]


@dataclass
class Stack:
    """One worker node and the ASGI server in front of it."""

    base_url: str
    node: str
    worker: Process
    server: Process

    def stop(self) -> None:
        self.server.stop()
        self.worker.stop()


def stack_start(node: str, *, env: dict[str, str], log_dir: Path, timeout: float = 90) -> Stack:
    """Start a worker and a server and wait until the server is ready with that node live."""
    port = free_port()
    stack = Stack(f"http://127.0.0.1:{port}", node, start_worker(node, env=env, log_dir=log_dir),
                  start_server(port, env=env, log_dir=log_dir))
    try:
        wait_ready(stack.base_url, nodes={node}, timeout=timeout, processes=(stack.worker, stack.server))
    except BaseException:
        stack.stop()
        raise
    return stack
