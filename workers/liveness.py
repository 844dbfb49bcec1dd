"""This worker process's liveness keys: how the gateway learns within seconds that a worker died.

A node's heartbeat (a database row) says whether the node is in service; it is too slow to tell a
request that the process serving it is gone. So every process run (an incarnation, with its own
random id) keeps ``worker_alive_key`` and ``node_incarnation_key`` set with a TTL of a couple of
seconds from a daemon thread. Nothing else has to happen when the process dies: the keys expire.
"""

from __future__ import annotations

import logging
import threading
import uuid

from workers import protocol

logger = logging.getLogger(__name__)

# Deletes the node's incarnation key only if it still names this incarnation (a newer worker
# for the same node may have replaced it).
_DELETE_IF_OURS = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class WorkerLiveness:
    """Keeps this incarnation's keys alive from start() until stop() or the process's end."""

    def __init__(self, redis, *, prefix: str, node: str) -> None:
        self.incarnation = uuid.uuid4().hex
        self._redis = redis
        self._alive_key = protocol.worker_alive_key(prefix, self.incarnation)
        self._node_key = protocol.node_incarnation_key(prefix, node)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Set the keys now (so they exist before any request runs) and keep refreshing them."""
        with self._lock:
            if self._thread is not None:
                return
            self._refresh()
            self._thread = threading.Thread(target=self._run, name="worker-liveness", daemon=True)
            self._thread.start()
        logger.info("worker incarnation %s is alive", self.incarnation)

    def stop(self) -> None:
        """Stop refreshing and delete the keys, so the gateway knows at once this incarnation is gone."""
        with self._lock:
            if self._thread is None:
                return
            self._stop.set()
            self._thread.join()
            self._thread = None
        try:
            self._redis.delete(self._alive_key)
            self._redis.eval(_DELETE_IF_OURS, 1, self._node_key, self.incarnation)
        except Exception:  # the keys expire on their own
            logger.warning("could not delete the liveness keys of incarnation %s", self.incarnation)

    def _refresh(self) -> None:
        ttl_ms = int(protocol.WORKER_ALIVE_TTL_SECONDS * 1000)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._alive_key, 1, px=ttl_ms)
        pipe.set(self._node_key, self.incarnation, px=ttl_ms)
        pipe.execute()

    def _run(self) -> None:
        failing = False  # log the first failure of a run of them, not one line every half second
        while not self._stop.wait(protocol.WORKER_ALIVE_REFRESH_SECONDS):
            try:
                self._refresh()
                failing = False
            except Exception:
                if not failing:
                    logger.exception("could not refresh the liveness of incarnation %s; retrying", self.incarnation)
                failing = True
