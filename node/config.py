"""This process's node: its configuration, its model pool and its Redis connection.

Built once per worker process from Django settings and the environment that
``python -m workers`` sets (``LLMP_NODE_NAME``, ``LLMP_GPU_INDEX``).
"""

from __future__ import annotations

import os
import socket
import threading
from functools import cache

import psutil
import redis
from django.conf import settings

from workers import calibration
from workers.engine.memory import runner_memory_estimate
from workers.engine.supervisor import LoadFailure, RunnerPool
from workers.generation import InferenceError
from workers.liveness import WorkerLiveness
from workers.runner import NodeConfig, model_path, runner_config


def node_name() -> str:
    return os.environ.get("LLMP_NODE_NAME") or socket.gethostname()


def gpu_index() -> int | None:
    raw = os.environ.get("LLMP_GPU_INDEX")
    return int(raw) if raw else None


def _blob_url(model_id: str) -> str:
    from apps.models.services import blob_token

    return f"{settings.LLMP_SERVER_URL.rstrip('/')}/api/v1/blobs/{model_id}?token={blob_token(model_id)}"


_present: set[str] = set()
_present_lock = threading.Lock()


def _model_present(model_id: str) -> None:
    """Record once per process, in the background, that this node holds a model's file."""
    with _present_lock:
        if model_id in _present:
            return
        _present.add(model_id)

    def record() -> None:
        from django.db import close_old_connections

        from apps.models.services import model_copy_record_seen

        try:
            close_old_connections()
            model_copy_record_seen(model_id=model_id, node_name=node_name())
        except Exception:
            with _present_lock:
                _present.discard(model_id)

    threading.Thread(target=record, name="model-copy-record", daemon=True).start()


@cache
def node_config() -> NodeConfig:
    return NodeConfig(
        blob_url=_blob_url if settings.LLMP_SERVER_URL else None,
        on_model_present=_model_present,
        name=node_name(),
        models_dir=settings.MODELS_DIR,
        redis_prefix=settings.LLMP_REDIS_PREFIX,
        n_ctx=settings.LLMP_N_CTX,
        n_gpu_layers=settings.LLMP_N_GPU_LAYERS,
        n_threads=settings.LLMP_N_THREADS,
        n_slots=settings.LLMP_POOL_SLOTS_PER_MODEL,
        stream_interval_ms=settings.LLMP_STREAM_INTERVAL_MS,
    )


@cache
def node_redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


@cache
def node_liveness() -> WorkerLiveness:
    """This process's incarnation and the keys that tell the gateway it is alive."""
    return WorkerLiveness(node_redis(), prefix=settings.LLMP_REDIS_PREFIX, node=node_name())


@cache
def node_pool() -> RunnerPool:
    """This worker's runner processes, one per loaded model."""
    budget_mb = settings.LLMP_POOL_MEMORY_BUDGET_MB or int(psutil.virtual_memory().total * 0.6) >> 20
    config = node_config()
    lock_path = str(settings.DATA_DIR / f"node-{config.name}.decode.lock")

    def make(model_id: str, path: str):
        return runner_config(config, model_id=model_id, path=path, redis_url=settings.REDIS_URL,
                             incarnation=node_liveness().incarnation, lock_path=lock_path)

    def size_of(runner) -> int:
        return runner_memory_estimate(runner.path, n_slots=runner.n_slots, n_ctx=runner.n_ctx,
                                      n_batch=runner.n_batch)["total_bytes"]

    def ready(handle) -> None:  # fit calibration: the bytes llama.cpp holds for the weights
        if handle.memory and handle.memory.get("weights_bytes"):
            calibration.weights_measured(handle.model_id, int(handle.memory["weights_bytes"]))

    def ended(handle, message: dict) -> None:  # fit calibration: decoding speed
        tokens, decode_ms = message.get("completion_tokens") or 0, message.get("decode_ms") or 0
        if tokens >= 8 and decode_ms > 0:
            calibration.speed_measured(handle.model_id, (tokens - 1) / (decode_ms / 1000))

    def load_failed(failure: LoadFailure) -> None:  # on the node's copy: the gateway sends the model elsewhere
        from django.db import close_old_connections, connection

        from apps.models.services import model_load_failure_record

        close_old_connections()
        try:
            model_load_failure_record(model_id=failure.model_id, node_name=config.name, error=failure.reason,
                                      file=failure.file)
        finally:
            connection.close()  # called on a runner's watcher thread, which ends with the runner

    def load_still_failed(model_id: str) -> bool:  # False once an operator cleared the mark
        from apps.models.selectors import model_load_failure_marked

        return model_load_failure_marked(model_id=model_id, node_name=config.name)

    return RunnerPool(runner_config=make, size_of=size_of, redis=node_redis(), redis_prefix=config.redis_prefix,
                      max_models=settings.LLMP_POOL_MAX_MODELS, memory_budget_bytes=budget_mb << 20,
                      on_ready=ready, on_ended=ended, on_load_failed=load_failed, load_still_failed=load_still_failed)


def load_failures_restore() -> int:
    """Give this worker's pool the load failures recorded for its node before it started; returns how many."""
    from apps.models.selectors import model_load_failures_of_node

    config = node_config()
    failures = []
    for copy in model_load_failures_of_node(node_name=config.name):
        try:
            path = model_path(copy.model.worker_spec(), config.models_dir)
        except InferenceError:  # the bundled model is not installed: nothing to retry
            continue
        file = {k: copy.load_failed_file[k] for k in ("size", "mtime_ns") if k in copy.load_failed_file}
        failures.append(LoadFailure(model_id=copy.model_id, path=str(path), node=config.name, reason=copy.load_error,
                                    file=file))
    node_pool().load_failures_restore(failures)
    return len(failures)


def load_failures_recheck() -> list[str]:
    """Clear the records of this node's load failures whose file has changed since; returns their models."""
    from apps.models.services import model_load_failure_clear

    changed = node_pool().load_failures_changed()
    for index, failure in enumerate(changed):
        try:
            model_load_failure_clear(model_id=failure.model_id, node_name=node_config().name)
        except Exception:
            node_pool().load_failures_restore(changed[index:])  # still changed: the next heartbeat tries again
            raise
    return [failure.model_id for failure in changed]


def loaded_model_ids() -> list[str]:
    return node_pool().loaded()


__all__ = ["node_config", "node_liveness", "node_pool", "node_redis", "node_name", "gpu_index", "loaded_model_ids",
           "load_failures_recheck", "load_failures_restore"]
