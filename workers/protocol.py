"""The wire between gateway and worker: one Redis stream per request, plus a cancel flag.

Why Redis Streams: a stream is an append-only log with ids, so the gateway can start
reading after the worker has written (it reads from id 0), every entry arrives exactly once
and in order, and nothing is lost if the reader is briefly slow. Pub/sub would drop tokens
published before the gateway subscribes; a list would need one BLPOP per token and could
not be re-read. The stream expires on its own, so an abandoned request leaves nothing.

Entries carry two fields: ``t`` (the event type) and ``d`` (JSON).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

STREAM_TTL_SECONDS = 600

# What a request asks the worker to do.
KIND_CHAT = "chat"
KIND_COMPLETION = "completion"
KIND_EMBEDDING = "embedding"

# Celery task names, declared by ``node.tasks`` and sent by the apps and the beat schedule. They are
# wire names: they keep the module path the tasks were first defined at, and renaming one would strand
# the messages already queued under the old name.
TASK_INFERENCE_RUN = "workers.tasks.inference_run"
TASK_JOB_RUN = "workers.tasks.job_run"
TASK_JOB_REAP = "workers.tasks.job_reap"
TASK_MODELS_UNLOAD = "workers.tasks.models_unload"
TASK_MODEL_COPY_DELETE = "workers.tasks.model_copy_delete"

EVENT_START = "start"  # the worker picked the request up: {"node": name, "worker": its incarnation}
EVENT_TOKEN = "token"  # one piece of generated text: {"text": str}
EVENT_DONE = "done"  # generation ended: {"finish_reason", "usage", and "data" for embeddings}
EVENT_ERROR = "error"  # the request failed: {"message", "code", "type", "status"}
# The worker stopped because the client left: {"tokens_emitted", "at" (unix time)}. Nobody
# waits for it; it records when and where generation stopped, for operators and tests.
EVENT_CANCELLED = "cancelled"


# Liveness of one worker process. Each run of a worker (an incarnation) keeps two keys set, with a
# short expiry it refreshes: ``worker_alive_key`` while it runs, and ``node_incarnation_key``
# naming the node's current incarnation. A worker that dies (SIGKILL, a segfault, a lost machine)
# stops refreshing them, so the gateway learns of it within the TTL instead of the heartbeat window.
WORKER_ALIVE_TTL_SECONDS = 2.0
WORKER_ALIVE_REFRESH_SECONDS = 0.5


def worker_alive_key(prefix: str, incarnation: str) -> str:
    return f"{prefix}:worker:{incarnation}:alive"


def node_incarnation_key(prefix: str, node: str) -> str:
    return f"{prefix}:node:{node}:incarnation"


def stream_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:req:{request_id}:events"


def cancel_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:req:{request_id}:cancel"


def encode(event: str, data: dict[str, Any]) -> dict[str, str]:
    return {"t": event, "d": json.dumps(data, separators=(",", ":"))}


def decode(fields: dict) -> tuple[str, dict[str, Any]]:
    event = fields[b"t"] if b"t" in fields else fields["t"]
    data = fields[b"d"] if b"d" in fields else fields["d"]
    if isinstance(event, bytes):
        event = event.decode()
    return event, json.loads(data)


class RequestCancelled(Exception):
    """The client went away; the worker stops generating for it."""


class RequestStream:
    """The worker's side of one request's stream (synchronous Redis client).

    Tokens are handed to a writer thread, so the token loop never waits on Redis: while the
    model computes the next token, the writer appends what is pending in one pipelined round
    trip and, in the same round trip, learns whether the client has left. Every event goes
    through the same writer, so the order of events is the order of the calls.
    """

    _STOP = object()

    def __init__(self, redis, prefix: str, request_id: str) -> None:
        self._redis = redis
        self._key = stream_key(prefix, request_id)
        self._cancel_key = cancel_key(prefix, request_id)
        self.tokens_emitted = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._failure: BaseException | None = None
        self._writer: threading.Thread | None = None

    def cancelled(self) -> bool:
        if not self._cancelled.is_set() and self._redis.exists(self._cancel_key):
            self._cancelled.set()
        return self._cancelled.is_set()

    def _append(self, entries: list[dict[str, str]]) -> None:
        """Append entries, refresh the expiry and look for the cancel flag: one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(self._key, fields)
        pipe.expire(self._key, STREAM_TTL_SECONDS)
        pipe.exists(self._cancel_key)
        if pipe.execute()[-1]:
            self._cancelled.set()

    def emit_token(self, text: str) -> None:
        """Queue one token; raises RequestCancelled once the writer has seen the client leave."""
        self._raise_pending()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name=f"stream-{self._key}", daemon=True)
            self._writer.start()
        self._queue.put(encode(EVENT_TOKEN, {"text": text}))
        self.tokens_emitted += 1

    def emit(self, event: str, data: dict[str, Any]) -> bool:
        """Append one event after every token queued before it, and wait until it is written.

        Returns whether the client had left by then (learned in the same round trip).
        """
        self._drain()
        self._append([encode(event, data)])
        return self._cancelled.is_set()

    def close(self) -> None:
        """Stop the writer once it has written everything queued."""
        self._drain()

    def _drain(self) -> None:
        if self._writer is not None:
            self._queue.put(self._STOP)
            self._writer.join()
            self._writer = None
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _raise_pending(self) -> None:
        self._raise_failure()
        if self._cancelled.is_set():
            raise RequestCancelled()

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is self._STOP:
                batch.pop()
                stop = True
            if not batch:
                continue
            try:
                self._append(batch)
            except BaseException as exc:  # surfaced to the token loop on its next call
                self._failure = exc
                return


class StreamHub:
    """One writer for every request stream of a runner process.

    The decode loop only queues events (it never waits on Redis). A writer thread appends
    everything queued since its last round in one pipelined round trip, refreshes the streams'
    expiry and, in the same round trip, reads the cancel flag of every open request; it goes
    round at least every ``poll_seconds`` while requests are open, so a cancel is seen promptly
    even while no token is produced (a long prompt being read).
    """

    def __init__(self, redis, prefix: str, *, poll_seconds: float = 0.1) -> None:
        self._redis, self._prefix, self._poll = redis, prefix, poll_seconds
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._open: dict[str, HubStream] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="stream-hub", daemon=True)
        self._thread.start()

    def open(self, request_id: str) -> HubStream:
        stream = HubStream(self, request_id)
        with self._lock:
            self._open[request_id] = stream
        return stream

    def _put(self, stream: HubStream, fields: dict[str, str], final: bool) -> None:
        self._queue.put((stream, fields, final))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued before this call is written."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def _run(self) -> None:
        while True:
            try:
                items = [self._queue.get(timeout=self._poll)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._lock:
                watching = list(self._open.values())
            if not items and not watching:
                continue
            waiters = [item for item in items if isinstance(item, threading.Event)]
            events = [item for item in items if not isinstance(item, threading.Event)]
            try:
                self._write(events, watching)
            except Exception:  # Redis went away: keep going; the gateway sees the request stall and gives up
                logging.getLogger(__name__).exception("could not write request events")
            for stream, _, final in events:
                if final:
                    with self._lock:
                        self._open.pop(stream.request_id, None)
            for waiter in waiters:
                waiter.set()

    def _write(self, events: list, watching: list[HubStream]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        now = time.monotonic()
        for stream, fields, final in events:
            pipe.xadd(stream.key, fields)
            # The expiry is set with a stream's first event, renewed every minute and with its last.
            if final or now - stream.expiry_set_at > 60:
                stream.expiry_set_at = now
                pipe.expire(stream.key, STREAM_TTL_SECONDS)
        for stream in watching:
            pipe.exists(stream.cancel_key)
        replies = pipe.execute()
        for stream, flag in zip(watching, replies[len(replies) - len(watching):]):
            if flag:
                stream.cancel_seen = True


class HubStream:
    """One request's stream in a ``StreamHub``: events are queued in call order."""

    def __init__(self, hub: StreamHub, request_id: str) -> None:
        self._hub = hub
        self.request_id = request_id
        self.key = stream_key(hub._prefix, request_id)
        self.cancel_key = cancel_key(hub._prefix, request_id)
        self.cancel_seen = False
        self.closed = False
        self.expiry_set_at = float("-inf")

    def emit(self, event: str, data: dict[str, Any], *, final: bool = False) -> None:
        if self.closed:
            return
        self.closed = final
        self._hub._put(self, encode(event, data), final)

    def token(self, text: str) -> None:
        self.emit(EVENT_TOKEN, {"text": text})
