"""The runner process of one loaded model: ``python -m workers.engine.process``.

Started and watched by the node's worker (``workers.engine.supervisor``). It owns the model's
weights and one generation context holding every slot's KV (plus an embedding context on the
same weights, made on first use), reads requests from its parent over a socket (one JSON object
per line) and writes each request's events straight to that request's Redis stream. A crash here
(a driver fault, a hostile file, OOM) ends this process only; the worker sees it and ends the
requests it was serving.

Parent to runner: ``{"op": "submit", "request": InferenceRequest wire}`` and ``{"op": "stop"}``.
Runner to parent: ``ready`` (with the memory it holds), ``failed`` (could not load), ``started``
and ``ended`` per request (``ended`` carries what calibration needs), and ``stats``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from workers import protocol
from workers.generation import InferenceError

logger = logging.getLogger("workers.engine.process")

CONFIG_ENV = "LLMP_RUNNER_CONFIG"
STATS_SECONDS = 2.0


@dataclass(frozen=True)
class RunnerConfig:
    """What a runner process is started with (JSON in its environment)."""

    model_id: str
    path: str
    node: str
    incarnation: str  # the worker's: the start event names it, so the gateway watches the worker too
    redis_url: str
    redis_prefix: str
    n_slots: int
    n_ctx: int  # per sequence
    n_threads: int
    n_gpu_layers: int = 0
    n_batch: int = 512
    lock_path: str = ""  # the node's decode lock: runners of one node take turns on its CPU threads
    stream_interval_ms: int = 0  # a stream's tokens produced within this long are written together

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: str) -> RunnerConfig:
        return cls(**json.loads(raw))


class Control:
    """The socket to the parent: a reader thread queues its messages; ``send`` may be called from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._send_lock = threading.Lock()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, name="runner-control", daemon=True).start()

    def _read(self) -> None:
        for line in self._reader:
            try:
                self.inbox.put(json.loads(line))
            except ValueError:
                logger.error("unreadable control message: %r", line[:200])
        self.inbox.put({"op": "stop", "reason": "the worker closed the control socket"})

    def send(self, op: str, **data: Any) -> None:
        line = (json.dumps({"op": op, **data}, separators=(",", ":")) + "\n").encode()
        with self._send_lock:
            try:
                self._sock.sendall(line)
            except OSError:
                pass  # the parent is gone; the reader sees it too and stops us


class DecodeLock:
    """The node's decode lock, an flock (released by the kernel if its holder dies): runners of one
    node take turns per decode step, so they share the node's threads instead of oversubscribing them."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def decode_lock(path: str):
    """A factory of the context manager each decode step holds (none without a lock file)."""
    if not path:
        return nullcontext
    lock = DecodeLock(path)
    return lambda: lock


class RequestSink:
    """A sequence's output: to its Redis stream, and ``ended`` to the parent once it is over."""

    def __init__(self, stream: protocol.HubStream, control: Control, request_id: str) -> None:
        self._stream, self._control, self.request_id = stream, control, request_id

    def text(self, text: str) -> None:
        self._stream.token(text)

    def _end(self, **data: Any) -> None:
        self._control.send("ended", id=self.request_id, **data)

    def finish(self, finish_reason: str, usage: dict, timings: dict) -> None:
        self._stream.emit(protocol.EVENT_DONE, {"finish_reason": finish_reason, "usage": usage, "timings": timings},
                          final=True)
        self._end(completion_tokens=usage.get("completion_tokens", 0), decode_ms=timings.get("decode_ms", 0.0))

    def done(self, result: dict) -> None:
        self._stream.emit(protocol.EVENT_DONE, result, final=True)
        self._end()

    def fail(self, error: InferenceError) -> None:
        self._stream.emit(protocol.EVENT_ERROR, error.as_event(), final=True)
        self._end()

    def cancel(self, tokens_emitted: int) -> None:
        logger.info("request %s cancelled by its client after %d tokens", self.request_id, tokens_emitted)
        self._stream.emit(protocol.EVENT_CANCELLED, {"tokens_emitted": tokens_emitted, "at": time.time()}, final=True)
        self._end()

    def cancelled(self) -> bool:
        return self._stream.cancel_seen


class Runner:
    def __init__(self, config: RunnerConfig, control: Control) -> None:
        import redis

        from workers.engine.batch import BatchEngine
        from workers.engine.model import LoadedModel

        self.config, self.control = config, control
        self.hub = protocol.StreamHub(redis.Redis.from_url(config.redis_url), config.redis_prefix,
                                      interval_seconds=config.stream_interval_ms / 1000)
        self.model = LoadedModel(config.path, n_gpu_layers=config.n_gpu_layers)
        self.engine = BatchEngine(self.model, n_slots=config.n_slots, n_ctx_per_seq=config.n_ctx,
                                  n_threads=config.n_threads, n_batch=config.n_batch,
                                  step_lock=decode_lock(config.lock_path))
        self._embedding = None
        self._embedding_jobs: list = []
        self._stats_at = time.monotonic()

    def memory(self) -> dict:
        """Bytes held: weights (measured by llama.cpp), KV (all slots' positions, from the model's
        shape) and compute buffers (not reported through llama.cpp's API: estimated)."""
        import llama_cpp

        from workers.engine.memory import compute_bytes

        slots, per_position = len(self.engine.slots), self.model.kv_bytes_per_token()
        weights, kv = self.model.size_bytes, slots * self.engine.n_ctx_seq * per_position
        compute = compute_bytes(vocab_size=self.model.n_vocab, n_batch=self.config.n_batch,
                                embedding_length=llama_cpp.llama_model_n_embd(self.model.ptr))
        return {"weights_bytes": weights, "kv_bytes": kv, "compute_bytes": compute,
                "total_bytes": weights + kv + compute, "slots": slots, "compute_estimated": True}

    def serve(self) -> None:
        while True:
            busy = self.engine.busy() or bool(self._embedding_jobs)
            try:  # between steps take what has come; when idle, wait for it
                message = self.control.inbox.get_nowait() if busy else self.control.inbox.get(timeout=STATS_SECONDS)
            except queue.Empty:
                message = None
            while message is not None:
                if message.get("op") == "stop":
                    return
                if message.get("op") == "submit":
                    self.admit(message["request"], message.get("received", time.time()))
                try:
                    message = self.control.inbox.get_nowait()
                except queue.Empty:
                    message = None
            if self.engine.busy():
                self.engine.step()
            if self._embedding_jobs:
                self.embed_step()
            if time.monotonic() - self._stats_at > STATS_SECONDS:
                self._stats_at = time.monotonic()
                self.control.send("stats", active=self.engine.active(), engine=self.engine.stats.as_dict())

    def admit(self, wire: dict, received: float) -> None:
        from workers.engine.batch import Sequence
        from workers.messages import InferenceRequest
        from workers.prompts import chat_prompt_tokens, completion_prompt_tokens

        request_id = wire.get("request_id", "?")
        stream = self.hub.open(request_id)
        sink = RequestSink(stream, self.control, request_id)
        stream.emit(protocol.EVENT_START, {"node": self.config.node, "worker": self.config.incarnation,
                                           "runner": os.getpid()})
        self.control.send("started", id=request_id)
        submitted = time.monotonic() - max(0.0, time.time() - received)
        try:
            request = InferenceRequest.from_wire(wire)
            if request.kind == protocol.KIND_EMBEDDING:
                self._embedding_jobs.append((request, sink))
                return
            if request.kind == protocol.KIND_CHAT:
                tokens, stops = chat_prompt_tokens(self.model, list(request.messages), n_ctx=self.engine.n_ctx_seq)
            else:
                tokens, stops = completion_prompt_tokens(self.model, request.prompt, n_ctx=self.engine.n_ctx_seq), []
            self.engine.add(Sequence(prompt=tokens, sampling=request.sampling, sink=sink, stops=tuple(stops),
                                     submitted_at=submitted))
        except InferenceError as exc:
            sink.fail(exc)
        except Exception as exc:  # one request's fault never takes the model's other streams down
            logger.exception("request %s could not be admitted", request_id)
            sink.fail(InferenceError(f"the runner cannot serve this request ({type(exc).__name__})",
                                     code="internal_error", status=500, type="server_error"))

    def embed_step(self) -> None:
        """One decode's worth of the oldest embedding request."""
        from workers.engine.embedding import EmbeddingEngine, embedding_result

        request, sink = self._embedding_jobs[0]
        try:
            if self._embedding is None:
                self._embedding = EmbeddingEngine(self.model, n_ctx=self.config.n_ctx, n_threads=self.config.n_threads)
            job = getattr(sink, "job", None)
            if job is None:
                tokenized = self._embedding.tokenize(list(request.input))
                job = sink.job = {"tokenized": tokenized, "groups": list(self._embedding.batches(tokenized)),
                                  "vectors": []}
            if sink.cancelled():
                sink.cancel(0)
            elif job["groups"]:
                job["vectors"] += self._embedding.embed(job["tokenized"], job["groups"].pop(0))
                if job["groups"]:
                    return
                total = sum(len(t) for t in job["tokenized"])
                sink.done(embedding_result(job["vectors"], total, request.encoding_format))
        except InferenceError as exc:
            sink.fail(exc)
        except Exception as exc:
            logger.exception("embedding request %s failed", sink.request_id)
            sink.fail(InferenceError(f"the runner could not embed these inputs ({type(exc).__name__})",
                                     code="internal_error", status=500, type="server_error"))
        self._embedding_jobs.pop(0)


def main() -> int:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/runner %(process)d] %(message)s")
    config = RunnerConfig.from_json(os.environ[CONFIG_ENV])
    control = Control(socket.socket(fileno=int(os.environ["LLMP_RUNNER_FD"])))
    if os.getppid() == 1:
        return 1
    try:
        runner = Runner(config, control)
    except Exception as exc:
        error = exc if isinstance(exc, InferenceError) else InferenceError(
            f"model {config.model_id} could not be loaded: {exc}", code="model_unavailable", status=503,
            type="server_error")
        control.send("failed", error=error.as_event())
        return 1
    control.send("ready", memory=runner.memory(), pid=os.getpid())
    logger.info("model %s loaded: %d slots of %d positions", config.model_id, len(runner.engine.slots),
                runner.engine.n_ctx_seq)
    runner.serve()
    runner.hub.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
