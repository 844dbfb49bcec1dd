"""Taking one inference request on this node to the runner of its model (or ending it with an error)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers import protocol
from workers.bundled import BundledModelMissing, bundled_model_path
from workers.engine.process import RunnerConfig
from workers.engine.supervisor import ModelLoadFailed, PoolExhausted, RunnerPool
from workers.generation import InferenceError
from workers.hardware import inference_threads
from workers.messages import InferenceRequest, ModelRef

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    name: str
    models_dir: Path
    redis_prefix: str
    n_ctx: int
    n_gpu_layers: int
    n_threads: int  # 0: every CPU the process may use (workers.hardware.inference_threads)
    n_slots: int = 8  # sequences one model's runner decodes together, each with n_ctx positions
    stream_interval_ms: int = 0  # tokens of one stream produced within this long are written together
    # A node with its own model cache pulls missing files from the server: the URL of a model's blob.
    blob_url: Callable[[str], str] | None = None
    # Called (off the token path) the first time this process finds a model's file on its disk.
    on_model_present: Callable[[str], None] | None = None


def model_path(model: ModelRef, models_dir: Path) -> Path:
    """Where this node keeps the file of a registered model."""
    if model.source == "bundled":
        try:
            return bundled_model_path()
        except BundledModelMissing as exc:
            raise InferenceError(str(exc), code="model_unavailable", status=503, type="server_error") from exc
    return models_dir / model.file_name


def _pull(model: ModelRef, path: Path, config: NodeConfig) -> Path:
    import httpx

    from workers.distribution import PullError, model_pull

    logger.info("model %s is not on this node; pulling %s from the server", model.id, path.name)
    try:
        return model_pull(url=config.blob_url(model.id), dest=path, size=model.size_bytes or 0,
                          sha256=model.sha256 or "")
    except (PullError, OSError, httpx.HTTPError) as exc:
        logger.error("pulling %s failed: %s", model.id, exc)
        raise InferenceError(f"model {model.id} could not be fetched to node {config.name}: {exc}",
                             code="model_unavailable", status=503, type="server_error") from exc


def llama_options(config: NodeConfig) -> dict:
    """The keyword arguments of ``llama_cpp.Llama`` the start-up self-test loads a model with: the
    context, offload and threads this node's runners use; JSON-serialisable."""
    threads = inference_threads(config.n_threads)
    return {"n_ctx": config.n_ctx, "n_gpu_layers": config.n_gpu_layers, "n_threads": threads,
            "n_threads_batch": threads, "verbose": False}


def runner_config(config: NodeConfig, *, model_id: str, path: str, redis_url: str, incarnation: str,
                  lock_path: str) -> RunnerConfig:
    """How this node starts the runner of one model."""
    return RunnerConfig(model_id=model_id, path=path, node=config.name, incarnation=incarnation,
                        redis_url=redis_url, redis_prefix=config.redis_prefix, n_slots=config.n_slots,
                        n_ctx=config.n_ctx, n_threads=inference_threads(config.n_threads),
                        n_gpu_layers=config.n_gpu_layers, lock_path=lock_path,
                        stream_interval_ms=config.stream_interval_ms)


def request_refuse(*, request_id: str, reason: str, config: NodeConfig, redis) -> None:
    """End a request this worker cannot even read with an error event, so its client learns at once."""
    logger.error("request %s refused: %s", request_id, reason)
    _end_with(request_id, InferenceError(reason, code="internal_error", status=500, type="server_error"),
              config=config, redis=redis)


def request_submit(request: InferenceRequest, *, config: NodeConfig, redis, pool: RunnerPool) -> None:
    """Hand one request to its model's runner; returns at once. A request that cannot even reach a
    runner (its model's file is missing, does not fit, or failed to load here) ends now with one error event."""
    try:
        model = request.model
        path = model_path(model, config.models_dir)
        if not path.is_file() and config.blob_url is not None and model.source != "bundled":
            path = _pull(model, path, config)
        if config.on_model_present is not None and path.is_file():
            config.on_model_present(model.id)
        if not path.is_file():
            logger.error("model %s: %s does not exist on this node", model.id, path)
            raise InferenceError(f"model {model.id} is not available on node {config.name}: its file "
                                 f"{path.name} is missing", code="model_unavailable", status=503, type="server_error")
        pool.submit(model_id=model.id, path=str(path), wire=request.to_wire())
    except InferenceError as exc:
        _end_with(request.request_id, exc, config=config, redis=redis)
    except (PoolExhausted, ModelLoadFailed) as exc:
        _end_with(request.request_id, InferenceError(str(exc), code="model_unavailable", status=503,
                                                     type="server_error"), config=config, redis=redis)
    except Exception as exc:
        logger.exception("request %s could not be handed to a runner", request.request_id)
        _end_with(request.request_id, InferenceError(f"the worker failed: {exc}", code="internal_error", status=500,
                                                     type="server_error"), config=config, redis=redis)


def _end_with(request_id: str, error: InferenceError, *, config: NodeConfig, redis) -> None:
    protocol.request_event_append(redis, config.redis_prefix, request_id, protocol.EVENT_ERROR, error.as_event())
