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

from workers.liveness import WorkerLiveness
from workers.pool import ModelPool
from workers.runner import NodeConfig, load_llama


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

        from apps.models.models import RegisteredModel
        from apps.models.services import model_copy_record
        from apps.nodes.models import Node

        try:
            close_old_connections()
            model = RegisteredModel.objects.filter(id=model_id).first()
            node = Node.objects.filter(name=node_name()).first()
            if model is not None and node is not None:
                model_copy_record(model=model, node=node)
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
    )


@cache
def node_redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


@cache
def node_liveness() -> WorkerLiveness:
    """This process's incarnation and the keys that tell the gateway it is alive."""
    return WorkerLiveness(node_redis(), prefix=settings.LLMP_REDIS_PREFIX, node=node_name())


@cache
def node_pool() -> ModelPool:
    budget_mb = settings.LLMP_POOL_MEMORY_BUDGET_MB or int(psutil.virtual_memory().total * 0.6) >> 20
    config = node_config()

    def unload(instance) -> None:
        instance.close()

    return ModelPool(
        loader=lambda key: load_llama(key, config),
        size_of=lambda key: os.path.getsize(key.path),
        unloader=unload,
        max_models=settings.LLMP_POOL_MAX_MODELS,
        memory_budget_bytes=budget_mb << 20,
        slots_per_model=settings.LLMP_POOL_SLOTS_PER_MODEL,
    )


def loaded_model_ids() -> list[str]:
    return sorted({key.model_id for key in node_pool().loaded()})


__all__ = ["node_config", "node_liveness", "node_pool", "node_redis", "node_name", "gpu_index", "loaded_model_ids"]
