"""``make run``: Redis (if needed), one local worker and the ASGI server, stopped together by Ctrl-C.

The worker is supervised: llama.cpp runs inside it, so a model can take it down (a segfault, an
abort, the OOM killer). A dead worker is restarted with backoff while the gateway keeps serving;
only a worker that keeps dying, or the death of the server or of the Redis started here, stops
everything.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.models.services import model_register_bundled
from llmplatform.env import env_int, env_str

# Restart delays after a worker dies: 1, 2, 4 ... seconds, at most 30. A worker that ran for
# RESTART_RESET_SECONDS without dying starts the sequence again.
RESTART_DELAY_MAX_SECONDS = 30.0
RESTART_RESET_SECONDS = 300.0
# This many deaths within the window stop everything: the worker cannot run here.
DEATHS_ALLOWED, DEATHS_WINDOW_SECONDS = 5, 300.0


def exit_description(returncode: int) -> str:
    """How a child process ended, for the log: "exit 3", or "SIGSEGV (segmentation fault)"."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"signal {-returncode}"
    text = signal.strsignal(sig) or ""
    if sig == signal.SIGKILL:
        text = f"{text}; the kernel's OOM killer sends it when memory runs out".lstrip("; ")
    return f"{sig.name} ({text.lower()})" if text else sig.name


# Signals the command waits for with sigwait, so it keeps them blocked. SIGHUP (the terminal
# closed) stops everything like Ctrl-C: the worker runs in a session of its own and would not get it.
WATCHED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}
_PR_SET_PDEATHSIG = 1


def _spawn(args: list[str], **kwargs) -> subprocess.Popen:
    """Start a child that gets SIGTERM if this command dies, however it dies (Linux).

    A child inherits the blocked signal set, so it unblocks the watched signals before it starts
    (otherwise SIGTERM would never reach it).
    """
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls into it

    def prepare() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return subprocess.Popen(args, preexec_fn=prepare, **kwargs)


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _kill_group(process: subprocess.Popen) -> None:
    """Kill whatever is left of a dead worker's process group (its embedded beat, a test decode)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class WorkerSupervisor:
    """Keeps one worker process running: restarts it with backoff, gives up when it keeps dying."""

    def __init__(self, args: list[str], log) -> None:
        self.args, self.log = args, log
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.deaths: deque[float] = deque()
        self.consecutive = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        # Its own process group, so that its children can be killed with it.
        self.process = _spawn(self.args, start_new_session=True)
        self.started_at, self.restart_at = time.monotonic(), None

    def check(self) -> None:
        """Notice a death (schedule a restart, or raise CommandError) and start a due restart."""
        now = time.monotonic()
        if self.restart_at is None and self.process is not None and self.process.poll() is not None:
            _kill_group(self.process)
            lived = now - self.started_at
            self.deaths.append(now)
            while self.deaths and self.deaths[0] < now - DEATHS_WINDOW_SECONDS:
                self.deaths.popleft()
            self.consecutive = 1 if lived >= RESTART_RESET_SECONDS else self.consecutive + 1
            how = exit_description(self.process.returncode)
            if len(self.deaths) >= DEATHS_ALLOWED:
                raise CommandError(
                    f"the worker died {len(self.deaths)} times within {DEATHS_WINDOW_SECONDS / 60:g} minutes "
                    f"(last: {how}); stopping. Its log above says why; a crash in llama.cpp on the first request "
                    "usually means a broken build for this CPU: make clean && make install")
            delay = min(RESTART_DELAY_MAX_SECONDS, 2.0 ** (self.consecutive - 1))
            self.log(f"worker (pid {self.process.pid}) died after {lived:.0f}s: {how}; restarting it in {delay:g}s "
                     f"({len(self.deaths)} of {DEATHS_ALLOWED} deaths allowed within "
                     f"{DEATHS_WINDOW_SECONDS / 60:g} minutes)")
            self.restart_at = now + delay
        if self.restart_at is not None and now >= self.restart_at:
            try:
                self.start()
            except OSError as exc:
                raise CommandError(f"could not restart the worker: {exc}") from exc
            self.log(f"worker restarted (pid {self.process.pid})")

    def seconds_to_restart(self) -> float | None:
        return None if self.restart_at is None else max(0.0, self.restart_at - time.monotonic())

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _kill_group(self.process)


class Command(BaseCommand):
    help = "Run the whole platform locally: Redis if needed, one worker node and the ASGI server."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=env_str("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=env_int("PORT", 8000, minimum=1))
        parser.add_argument("--node", default=env_str("LLMP_NODE_NAME", socket.gethostname()))

    def handle(self, *args, host, port, node, **options):
        essential: list[subprocess.Popen] = []  # their death stops everything
        redis_process = self._ensure_redis()
        if redis_process:
            essential.append(redis_process)
        model_register_bundled()
        python = sys.executable
        worker = WorkerSupervisor([python, "-m", "workers", "--node", node, "--beat"],
                                  log=lambda line: self.stderr.write(f"runplatform: {line}"))
        # Block the watched signals before the first child starts, so that no SIGCHLD is missed.
        signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
        failure: str | None = None
        try:
            worker.start()
            server = _spawn([python, "-m", "uvicorn", "llmplatform.asgi:application", "--host", host,
                             "--port", str(port), "--no-access-log"])
            essential.append(server)
            self._banner(f"http://{host}:{port}")
            # Sleep until Ctrl-C, a TERM or HUP, a child exiting (SIGCHLD) or a worker restart falling due.
            while True:
                dead = next((child for child in essential if child.poll() is not None), None)
                if dead is not None:
                    name = "the server" if dead is server else "redis-server"
                    failure = f"{name} stopped unexpectedly ({exit_description(dead.returncode)}); see its output above"
                    break
                worker.check()
                wait = worker.seconds_to_restart()
                received = signal.sigtimedwait(WATCHED, wait) if wait is not None else signal.sigwait(WATCHED)
                if received in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    break
        except CommandError as exc:
            failure = str(exc)
        finally:
            self._stop_all(worker, essential, last=redis_process)
            # A second Ctrl-C pressed while the children stopped is not an error.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
        if failure:
            raise CommandError(failure)

    def _banner(self, base: str) -> None:
        self.stdout.write(self.style.SUCCESS(f"\nllmplatform is starting on {base}"))
        self.stdout.write(f"  OpenAI endpoint: {base}/v1   (model: {settings.LLMP_DEFAULT_MODEL_ID})")
        self.stdout.write(f"  Admin:           {base}/admin/   (create a login: .venv/bin/python manage.py createsuperuser)")
        self.stdout.write(f"  Management API:  {base}/api/v1/   docs: {base}/api/docs/")
        self.stdout.write("  Create a key:    .venv/bin/python manage.py create_api_key --name me")
        self.stdout.write("Press Ctrl-C to stop everything.\n")

    def _stop_all(self, worker: WorkerSupervisor, essential: list[subprocess.Popen],
                  last: subprocess.Popen | None) -> None:
        """Stop the server and the worker, then ``last`` (the Redis this command started)."""
        for child in essential:
            if child is not last and child.poll() is None:
                child.send_signal(signal.SIGTERM)
        worker.stop()
        for child in reversed(essential):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _ensure_redis(self) -> subprocess.Popen | None:
        url = settings.REDIS_URL
        if _redis_answers(url):
            return None
        parsed = urlparse(url)
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise CommandError(f"Redis at {url} does not answer; start it or point REDIS_URL at a running one.")
        server = shutil.which("redis-server")
        if server is None:
            raise CommandError("Redis is not running and redis-server is not installed: "
                               "sudo apt-get install -y redis-server")
        port = parsed.port or 6379
        self.stdout.write(f"Starting redis-server on port {port} (it keeps nothing on disk)…")
        process = _spawn([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL)
        for _ in range(50):
            if _redis_answers(url):
                return process
            time.sleep(0.1)
        process.terminate()
        raise CommandError(f"redis-server did not start on port {port}")
