"""Running one inference request on this node and writing its events to the request stream."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import llama_cpp
import numpy as np

from workers import calibration, protocol
from workers.bundled import BundledModelMissing, bundled_model_path
from workers.generation import InferenceError, generate
from workers.hardware import inference_threads
from workers.messages import InferenceRequest, ModelRef
from workers.pool import ModelKey, ModelPool, PoolExhausted
from workers.prompts import chat_prompt_tokens, completion_prompt_tokens

logger = logging.getLogger(__name__)

KIND_CHAT, KIND_COMPLETION, KIND_EMBEDDING = protocol.KIND_CHAT, protocol.KIND_COMPLETION, protocol.KIND_EMBEDDING


@dataclass(frozen=True)
class NodeConfig:
    name: str
    models_dir: Path
    redis_prefix: str
    n_ctx: int
    n_gpu_layers: int
    n_threads: int  # 0: every CPU the process may use (workers.hardware.inference_threads)
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


def llama_options(config: NodeConfig, *, embedding: bool = False) -> dict:
    """The keyword arguments of ``llama_cpp.Llama`` every model on this node is loaded with
    (requests and the start-up self-test alike); JSON-serialisable."""
    threads = inference_threads(config.n_threads)
    options = {"n_ctx": config.n_ctx, "n_gpu_layers": config.n_gpu_layers, "n_threads": threads,
               "n_threads_batch": threads, "verbose": False}
    if embedding:
        options.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    return options


def load_llama(key: ModelKey, config: NodeConfig) -> llama_cpp.Llama:
    options = llama_options(config, embedding=key.embedding)
    logger.info("loading %s from %s (embedding=%s)", key.model_id, key.path, key.embedding)
    llm = llama_cpp.Llama(model_path=key.path, **options)
    if not key.embedding:  # fit calibration: the bytes llama.cpp holds for the weights, on GPU or CPU
        calibration.weights_measured(key.model_id, llama_cpp.llama_model_size(llm.model))
    return llm


def _embedding_result(llm: llama_cpp.Llama, inputs: list[str], encoding_format: str) -> dict:
    n_ctx = llm.n_ctx()
    for index, text in enumerate(inputs):
        if len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)) > n_ctx:
            raise InferenceError(f"input[{index}] is longer than the model's context of {n_ctx} tokens",
                                 code="context_length_exceeded", param="input")
    vectors, total_tokens = llm.embed(inputs, normalize=True, truncate=False, return_count=True)
    data = []
    for index, vector in enumerate(vectors):
        if encoding_format == "base64":
            encoded = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        else:
            encoded = [float(x) for x in vector]
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"data": data, "usage": {"prompt_tokens": total_tokens, "total_tokens": total_tokens}}


def request_refuse(*, request_id: str, reason: str, config: NodeConfig, redis) -> None:
    """End a request this worker cannot even read with an error event, so its client learns at once."""
    logger.error("request %s refused: %s", request_id, reason)
    stream = protocol.RequestStream(redis, config.redis_prefix, request_id)
    stream.emit(protocol.EVENT_ERROR, InferenceError(reason, code="internal_error", status=500,
                                                     type="server_error").as_event())
    stream.close()


def request_run(request: InferenceRequest, *, config: NodeConfig, redis, pool: ModelPool,
                incarnation: str | None = None) -> None:
    """Serve one request; every outcome, failure included, ends the stream with one final event.

    ``incarnation`` (this worker process's liveness id) goes out with the start event, so the
    gateway watches the process that actually serves the request.
    """
    request_id, kind, model = request.request_id, request.kind, request.model
    stream = protocol.RequestStream(redis, config.redis_prefix, request_id)
    if stream.emit(protocol.EVENT_START, {"node": config.name, "worker": incarnation}):
        logger.info("request %s was cancelled before it started", request_id)
        stream.emit(protocol.EVENT_CANCELLED, {"tokens_emitted": 0, "at": time.time()})
        return
    try:
        path = model_path(model, config.models_dir)
        if not path.is_file() and config.blob_url is not None and model.source != "bundled":
            path = _pull(model, path, config)
        if config.on_model_present is not None and path.is_file():
            config.on_model_present(model.id)
        if not path.is_file():
            logger.error("model %s: %s does not exist on this node", model.id, path)
            raise InferenceError(f"model {model.id} is not available on node {config.name}: its file "
                                 f"{path.name} is missing", code="model_unavailable", status=503, type="server_error")
        key = ModelKey(model.id, str(path), embedding=kind == KIND_EMBEDDING)
        leasing_started = time.monotonic()
        with pool.lease(key) as llm:
            # A client may leave while its request waits for a slot or a model load.
            if time.monotonic() - leasing_started > 0.05 and stream.cancelled():
                raise protocol.RequestCancelled()
            if kind == KIND_EMBEDDING:
                result = _embedding_result(llm, list(request.input), request.encoding_format)
                stream.emit(protocol.EVENT_DONE, result)
                return
            if kind == KIND_CHAT:
                tokens, template_stops = chat_prompt_tokens(llm, list(request.messages))
            else:
                tokens, template_stops = completion_prompt_tokens(llm, request.prompt), []
            sampling = replace(request.sampling, stop=request.sampling.stop + tuple(template_stops))
            first_token_at: list[float] = []

            def emit_token(text: str) -> None:
                if not first_token_at:
                    first_token_at.append(time.monotonic())
                stream.emit_token(text)

            result = generate(llm, tokens, sampling, emit_token)
            decode_seconds = time.monotonic() - first_token_at[0] if first_token_at else 0.0
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        stream.emit(protocol.EVENT_DONE, {"finish_reason": result.finish_reason, "usage": usage})
        if result.completion_tokens >= 8 and decode_seconds > 0:  # fit calibration: decoding speed
            calibration.speed_measured(model.id, (result.completion_tokens - 1) / decode_seconds)
    except protocol.RequestCancelled:
        logger.info("request %s cancelled by its client after %d tokens", request_id, stream.tokens_emitted)
        stream.emit(protocol.EVENT_CANCELLED, {"tokens_emitted": stream.tokens_emitted, "at": time.time()})
    except InferenceError as exc:
        stream.emit(protocol.EVENT_ERROR, exc.as_event())
    except PoolExhausted as exc:
        stream.emit(protocol.EVENT_ERROR, InferenceError(str(exc), code="model_unavailable", status=503,
                                                         type="server_error").as_event())
    except Exception as exc:
        logger.exception("request %s failed", request_id)
        stream.emit(protocol.EVENT_ERROR, InferenceError(f"the worker failed: {exc}", code="internal_error",
                                                         status=500, type="server_error").as_event())
    finally:
        stream.close()
