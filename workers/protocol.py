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


def request_event_append(redis, prefix: str, request_id: str, event: str, data: dict[str, Any]) -> None:
    """Append one event to a request's stream and refresh its expiry, in one round trip: for what ends a
    request outside a runner (a message no worker can read, a runner that died under it)."""
    key = stream_key(prefix, request_id)
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key, encode(event, data))
    pipe.expire(key, STREAM_TTL_SECONDS)
    pipe.execute()


class StreamHub:
    """One writer for every request stream of a runner process.

    The decode loop only queues events (it never waits on Redis). A writer thread appends
    everything queued since its last round in one pipelined round trip, refreshes the streams'
    expiry and, in the same round trip, reads the cancel flag of every open request; it goes
    round at least every ``poll_seconds`` while requests are open, so a cancel is seen promptly
    even while no token is produced (a long prompt being read).

    Rounds that carry only tokens in mid-stream are at least ``interval_seconds`` apart: the
    tokens of that time go out together, so Redis and the gateway wake once for several of them
    instead of once per token. A request's first token, its last event and every other kind of
    event go out at once, so time to first token does not wait. The interval is at most
    ``poll_seconds``, so holding tokens back never delays the reading of cancel flags.
    """

    def __init__(self, redis, prefix: str, *, poll_seconds: float = 0.1, interval_seconds: float = 0.0) -> None:
        self._redis, self._prefix, self._poll = redis, prefix, poll_seconds
        self._interval = min(max(0.0, interval_seconds), poll_seconds)
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

    def _put(self, stream: HubStream, fields: dict[str, str], final: bool, urgent: bool) -> None:
        self._queue.put((stream, fields, final, urgent))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued before this call is written."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    @staticmethod
    def _urgent(item) -> bool:
        return isinstance(item, threading.Event) or item[3]

    def _gather(self, items: list, last_round: float) -> None:
        """Add to ``items`` what comes until ``interval_seconds`` have passed since the last round, or
        until an urgent item comes."""
        while not any(self._urgent(item) for item in items):
            wait = last_round + self._interval - time.monotonic()
            if wait <= 0:
                return
            try:
                items.append(self._queue.get(timeout=wait))
            except queue.Empty:
                return

    def _run(self) -> None:
        last_round = float("-inf")
        while True:
            try:
                items = [self._queue.get(timeout=self._poll)]
            except queue.Empty:
                items = []
            if items and self._interval:
                self._gather(items, last_round)
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._lock:
                watching = list(self._open.values())
            if not items and not watching:
                continue
            last_round = time.monotonic()
            waiters = [item for item in items if isinstance(item, threading.Event)]
            events = [item for item in items if not isinstance(item, threading.Event)]
            try:
                self._write(events, watching)
            except Exception:  # Redis went away: keep going; the gateway sees the request stall and gives up
                logging.getLogger(__name__).exception("could not write request events")
            for stream, _, final, _ in events:
                if final:
                    with self._lock:
                        self._open.pop(stream.request_id, None)
            for waiter in waiters:
                waiter.set()

    def _write(self, events: list, watching: list[HubStream]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        now = time.monotonic()
        for stream, fields, final, _ in events:
            pipe.xadd(stream.key, fields)
            # The expiry is set with a stream's first event, renewed every minute and with its last.
            if final or now - stream.expiry_set_at > 60:
                stream.expiry_set_at = now
                pipe.expire(stream.key, STREAM_TTL_SECONDS)
        if watching:  # every open request's cancel flag, in one command
            pipe.mget([stream.cancel_key for stream in watching])
        replies = pipe.execute()
        if watching:
            for stream, flag in zip(watching, replies[-1]):
                if flag is not None:
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
        self.tokens = 0  # queued so far

    def emit(self, event: str, data: dict[str, Any], *, final: bool = False) -> None:
        if self.closed:
            return
        self.closed = final
        urgent = final or event != EVENT_TOKEN or self.tokens == 0
        if event == EVENT_TOKEN:
            self.tokens += 1
        self._hub._put(self, encode(event, data), final, urgent)

    def token(self, text: str) -> None:
        self.emit(EVENT_TOKEN, {"text": text})
