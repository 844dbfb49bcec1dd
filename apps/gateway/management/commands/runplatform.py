"""``make run``: Redis (if needed), one local worker and the ASGI server, stopped together by Ctrl-C."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.models.services import model_register_bundled
from llmplatform.env import env_int, env_str


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class Command(BaseCommand):
    help = "Run the whole platform locally: Redis if needed, one worker node and the ASGI server."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=env_str("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=env_int("PORT", 8000, minimum=1))
        parser.add_argument("--node", default=env_str("LLMP_NODE_NAME", socket.gethostname()))

    def handle(self, *args, host, port, node, **options):
        children: list[subprocess.Popen] = []
        redis_process = self._ensure_redis()
        if redis_process:
            children.append(redis_process)
        model_register_bundled()
        python = sys.executable
        children.append(subprocess.Popen([python, "-m", "workers", "--node", node, "--beat"]))
        children.append(subprocess.Popen([python, "-m", "uvicorn", "llmplatform.asgi:application", "--host", host,
                                          "--port", str(port), "--no-access-log"]))
        base = f"http://{host}:{port}"
        self.stdout.write(self.style.SUCCESS(f"\nllmplatform is starting on {base}"))
        self.stdout.write(f"  OpenAI endpoint: {base}/v1   (model: {settings.LLMP_DEFAULT_MODEL_ID})")
        self.stdout.write(f"  Admin:           {base}/admin/   (create a login: .venv/bin/python manage.py createsuperuser)")
        self.stdout.write(f"  Management API:  {base}/api/v1/   docs: {base}/api/docs/")
        self.stdout.write("  Create a key:    .venv/bin/python manage.py create_api_key --name me")
        self.stdout.write("Press Ctrl-C to stop everything.\n")
        # Sleep until Ctrl-C, a TERM, or one of the children exiting (SIGCHLD), whichever comes first.
        watched = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        stopped_by_signal = False
        try:
            while all(child.poll() is None for child in children):
                if signal.sigwait(watched) != signal.SIGCHLD:
                    stopped_by_signal = True
                    break
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in reversed(children):
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.kill()
            # A second Ctrl-C pressed while the children stopped is not an error.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
        failed = [c for c in children if c.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
        if failed and not stopped_by_signal:
            raise CommandError(f"a process stopped unexpectedly (exit {failed[0].returncode}); see its output above")

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
        process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no"], stdout=subprocess.DEVNULL)
        for _ in range(50):
            if _redis_answers(url):
                return process
            time.sleep(0.1)
        process.terminate()
        raise CommandError(f"redis-server did not start on port {port}")
