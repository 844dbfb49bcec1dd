"""Start the Celery worker of one node: ``python -m workers --node NAME [--gpu INDEX]``."""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys

from llmplatform.env import ImproperlyConfiguredEnv, env_str
from llmplatform.secret_key import remote_worker_secret_check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    parser.add_argument("--node", default=env_str("LLMP_NODE_NAME", socket.gethostname()),
                        help="node name; also names the queue node.NAME (default: the hostname)")
    parser.add_argument("--gpu", type=int, default=None, help="pin to this GPU (sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--concurrency", type=int, default=None, help="task threads (LLMP_WORKER_CONCURRENCY)")
    parser.add_argument("--no-default-queue", action="store_true", help="do not consume the shared default queue")
    parser.add_argument("--beat", action="store_true", help="also run the periodic-task scheduler (one per fleet)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", args.node):
        parser.error(f"--node must be letters, digits, '-' or '_' (got {args.node!r})")
    if args.gpu is not None:
        if args.gpu < 0:
            parser.error("--gpu must be a GPU index (0, 1, …)")
        # Must be set before llama.cpp initialises CUDA, i.e. before any model loads.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        os.environ["LLMP_GPU_INDEX"] = str(args.gpu)
    os.environ["LLMP_NODE_NAME"] = args.node
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmplatform.settings")
    try:
        remote_worker_secret_check()
    except ImproperlyConfiguredEnv as exc:
        sys.exit(f"python -m workers: {exc}")

    import django

    django.setup()
    from django.conf import settings

    from apps.nodes.models import node_queue_name
    from llmplatform.celery import app
    from llmplatform.logredact import redact_logs
    from node.lifecycle import NodeLifecycle

    redact_logs()  # blob URLs carry a token
    app.steps["worker"].add(NodeLifecycle)
    queues = [node_queue_name(args.node)]
    if not args.no_default_queue:
        queues.append(settings.CELERY_TASK_DEFAULT_QUEUE)
    concurrency = args.concurrency or settings.LLMP_WORKER_CONCURRENCY
    worker_args = [
        "worker", "--queues", ",".join(queues), "--hostname", f"{args.node}@{socket.gethostname()}",
        "--pool", "threads", "--concurrency", str(concurrency), "--loglevel", args.loglevel,
        "--without-gossip", "--without-mingle",
    ]
    if args.beat:
        from celery.signals import beat_init

        # Celery's hook inside the embedded beat's own process: the only place to arm it there.
        beat_init.connect(_die_with_worker, weak=False)
        worker_args += ["--beat", "--schedule", str(settings.DATA_DIR / "celerybeat-schedule")]
    try:
        app.worker_main(worker_args)
    finally:
        # A clean stop: the pool has drained, so no request waits on this incarnation any more.
        from node.config import node_liveness

        node_liveness().stop()


def _die_with_worker(**_) -> None:
    """The embedded beat (a child process) ends when its worker does, however the worker died.

    Otherwise a worker killed by a crash leaves its beat running, and after a restart two beats
    send every periodic task twice.
    """
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the worker died before the line above ran
        os._exit(1)
