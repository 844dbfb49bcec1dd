"""The worker's side of its runner processes: start, feed, watch, evict.

A ``RunnerPool`` keeps at most one runner per model (each runner batches all of that model's
streams), at most ``max_models`` runners and at most ``memory_budget_bytes`` of estimated memory;
idle runners are stopped least recently used first to make room. Handing a request to a runner
returns at once: the runner writes the request's events itself, so no worker thread is held for
a stream's duration.

When a runner dies (a segfault, OOM, a kill), the requests it had started end with
``worker_lost`` at once; those it had not started yet go to a new runner (once). The next request
for the model starts a new runner.

A model that fails to load (llama.cpp refuses the file, or the runner crashes before it is ready,
or is killed before it is ready twice in a row) is not started again on this node while its file
stays the same (size and mtime): its requests end with ``model_unavailable`` at once.
``on_load_failed`` records the failure where the gateway sees it, ``load_failures_changed`` hands
back the ones whose file changed since, and ``load_still_failed`` lets an operator clear one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from workers import protocol
from workers.engine.process import CONFIG_ENV, RunnerConfig
from workers.generation import InferenceError

logger = logging.getLogger(__name__)



# How long llama.cpp's OpenMP threads spin for more work before they sleep (GNU OpenMP's
# GOMP_SPINCOUNT; its default, 300,000 spins, is several milliseconds). The same wait serves the
# barriers inside a decode step (hundreds per step) and the gap between two steps, when a runner's
# threads wait for Python (sampling, the stream writer) while the worker, Redis and the gateway need
# the same cores. Measured through the whole platform, one stream, on a 2-core node (tok/s):
#
#   spins                      300     3,000   30,000   300,000 (default)
#   idle node                   61      99       94      103
#   one other busy process      40      25       13        3
#
# Too short a spin puts every barrier to sleep and wakes it again (a slow IPI on a VM): a decode
# step slows by half. Too long a spin holds a core that other work needs, and collapses on a node
# where anything else runs. 3,000 (a fraction of a millisecond) keeps nearly all of the idle speed
# without the collapse. An operator's own GOMP_SPINCOUNT or OMP_WAIT_POLICY is kept.
RUNNER_OMP_SPINCOUNT = "3000"


def runner_environment(base: dict[str, str]) -> dict[str, str]:
    """The environment a runner process starts with: ``base`` plus the OpenMP wait that suits a runner."""
    env = dict(base)
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = RUNNER_OMP_SPINCOUNT
    return env

class PoolExhausted(RuntimeError):
    """The model cannot fit even after stopping every idle runner."""


class ModelLoadFailed(RuntimeError):
    """The model failed to load on this node, and its file has not changed since."""


def file_signature(path: str) -> dict:
    """What tells one version of a file from the next without reading it: its size and mtime (ns)."""
    try:
        stat = os.stat(path)
    except OSError:
        return {}
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass(eq=False)
class LoadFailure:
    """A model that failed to load on this node, and the file it failed with."""

    model_id: str
    path: str
    node: str
    reason: str  # no paths: it reaches clients
    file: dict  # file_signature(path) when it failed
    recorded: bool = False  # on_load_failed has stored it (so a cleared record means an operator cleared it)

    def message(self) -> str:
        return (f"Model {self.model_id} failed to load on node {self.node}: {self.reason}. It is not tried there "
                "again until its file changes or an operator clears the mark.")


# Signals a process gets from its own fault, not from someone killing it.
_CRASH_SIGNALS = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGSYS,
                  signal.SIGTRAP}


def _crashed(returncode: int) -> bool:
    """The process ended of its own fault: a crash signal, or an error exit (not a kill from outside)."""
    return returncode > 0 or -returncode in _CRASH_SIGNALS


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (killed: out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"{name}{hint}"
    return f"exit code {returncode}"


@dataclass(eq=False)
class RunnerHandle:
    """One runner process, as its worker sees it."""

    config: RunnerConfig
    size_bytes: int
    proc: subprocess.Popen | None = None
    sock: socket.socket | None = None
    state: str = "loading"  # loading -> ready -> stopping -> exited; or failed
    memory: dict | None = None
    unsent: dict[str, dict] = field(default_factory=dict)  # submitted before the runner was ready
    pending: dict[str, dict] = field(default_factory=dict)  # sent, not started: safe to run elsewhere
    started: set[str] = field(default_factory=set)  # started, not ended
    retried: set[str] = field(default_factory=set)
    unload_when_idle: bool = False
    started_at: float = field(default_factory=time.monotonic)
    stats: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def model_id(self) -> str:
        return self.config.model_id

    def in_flight(self) -> int:
        return len(self.unsent) + len(self.pending) + len(self.started)

    def send(self, op: str, **data) -> bool:
        line = (json.dumps({"op": op, **data}, separators=(",", ":")) + "\n").encode()
        try:
            self.sock.sendall(line)
            return True
        except OSError:
            return False


class RunnerPool:
    def __init__(self, *, runner_config: Callable[[str, str], RunnerConfig], size_of: Callable[[RunnerConfig], int],
                 redis, redis_prefix: str, max_models: int, memory_budget_bytes: int,
                 on_ready: Callable[[RunnerHandle], None] | None = None,
                 on_ended: Callable[[RunnerHandle, dict], None] | None = None,
                 on_load_failed: Callable[[LoadFailure], None] | None = None,
                 load_still_failed: Callable[[str], bool] | None = None) -> None:
        self._runner_config, self._size_of = runner_config, size_of
        self._redis, self._prefix = redis, redis_prefix
        self.max_models, self.memory_budget_bytes = max_models, memory_budget_bytes
        self._on_ready, self._on_ended = on_ready, on_ended
        # on_load_failed stores a failure (it may raise; recorded stays False then); load_still_failed
        # says whether a recorded one is still stored, i.e. no operator cleared it.
        self._on_load_failed, self._load_still_failed = on_load_failed, load_still_failed
        self._runners: OrderedDict[str, RunnerHandle] = OrderedDict()
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self.exits: list[dict] = []  # the last runner deaths, for the node's report
        self._load_failures: dict[str, LoadFailure] = {}
        self._retried_failures: list[LoadFailure] = []  # dropped because their file changed; not handed back yet

    # -- what the node asks ----------------------------------------------------------------------
    def submit(self, *, model_id: str, path: str, wire: dict) -> None:
        """Hand one request (``InferenceRequest.to_wire()``) to the model's runner, starting it if needed."""
        wire = {**wire}
        with self._lock:
            handle = self._runners.get(model_id)
            if handle is not None and handle.config.path != path and not handle.in_flight():
                self._stop(handle)  # the model's file moved (a re-registration): load the new one
                handle = None
            if handle is None:
                self._refuse_failed_load(model_id, path)  # ModelLoadFailed
                handle = self._start(model_id, path)
            self._runners.move_to_end(model_id)
            handle.unload_when_idle = False
            self._deliver(handle, wire)

    def in_flight(self) -> int:
        with self._lock:
            return sum(handle.in_flight() for handle in self._runners.values())

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(m for m, h in self._runners.items() if h.state in ("loading", "ready"))

    def runners(self) -> list[dict]:
        """What each runner holds and does, for the node's report."""
        with self._lock:
            return [{"model_id": h.model_id, "state": h.state, "pid": h.proc.pid if h.proc else None,
                     "in_flight": h.in_flight(), "memory": h.memory, "stats": h.stats} for h in self._runners.values()]

    def unload(self, model_ids: list[str] | None = None) -> list[str]:
        """Stop the runners of ``model_ids`` (all when None): now if idle, else as their last request ends."""
        unloaded = []
        with self._lock:
            for model_id, handle in list(self._runners.items()):
                if model_ids is not None and model_id not in model_ids:
                    continue
                if handle.in_flight():
                    handle.unload_when_idle = True
                else:
                    self._stop(handle)
                    unloaded.append(model_id)
        return sorted(unloaded)

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight (a warm shutdown); True if that happened in time."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.in_flight():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self) -> None:
        with self._lock:
            for handle in list(self._runners.values()):
                self._stop(handle)

    # -- models that failed to load ------------------------------------------------------------------
    def load_failures(self) -> list[LoadFailure]:
        with self._lock:
            return list(self._load_failures.values())

    def load_failures_restore(self, failures: list[LoadFailure]) -> None:
        """Take back failures recorded before this process started (their record exists)."""
        with self._lock:
            for failure in failures:
                failure.recorded = True
                self._load_failures.setdefault(failure.model_id, failure)

    def load_failures_changed(self) -> list[LoadFailure]:
        """Forget and return the failures whose file has changed since (a new file may load): their
        records can go. Cheap: one ``stat`` per failed model."""
        with self._lock:
            # A retried model that failed again since has a newer failure, whose record must stay.
            changed = [failure for failure in self._retried_failures if failure.model_id not in self._load_failures]
            self._retried_failures = []
            for model_id, failure in list(self._load_failures.items()):
                if file_signature(failure.path) != failure.file:
                    del self._load_failures[model_id]
                    changed.append(failure)
        for failure in changed:
            logger.info("model %s: its file changed since it failed to load; it will be tried again",
                        failure.model_id)
        return changed

    def _refuse_failed_load(self, model_id: str, path: str) -> None:
        """Raise ModelLoadFailed for a model that failed to load with this very file (caller holds the lock)."""
        failure = self._load_failures.get(model_id)
        if failure is None:
            return
        if failure.path != path or file_signature(path) != failure.file:
            del self._load_failures[model_id]
            self._retried_failures.append(failure)
            logger.info("model %s: its file changed since it failed to load; trying it again", model_id)
            return
        if failure.recorded and self._load_still_failed is not None and not self._load_still_failed(model_id):
            del self._load_failures[model_id]
            logger.info("model %s: its load failure was cleared; trying it again", model_id)
            return
        raise ModelLoadFailed(failure.message())

    def _load_failed(self, handle: RunnerHandle, reason: str) -> LoadFailure:
        """Remember that ``handle``'s model failed to load (caller holds the lock); ``_report_load_failure``
        stores it once the lock is released."""
        failure = LoadFailure(model_id=handle.model_id, path=handle.config.path, node=handle.config.node,
                              reason=reason, file=file_signature(handle.config.path))
        self._load_failures[handle.model_id] = failure
        logger.error("model %s failed to load on this node (%s); not trying it again until its file changes or "
                     "the mark is cleared", handle.model_id, reason)
        return failure

    def _report_load_failure(self, failure: LoadFailure) -> None:
        if self._on_load_failed is None:
            return
        try:
            self._on_load_failed(failure)
            failure.recorded = True
        except Exception:
            logger.exception("could not record that model %s failed to load", failure.model_id)

    # -- runners ------------------------------------------------------------------------------------
    def _used_bytes(self) -> int:
        return sum(h.size_bytes for h in self._runners.values())

    def _start(self, model_id: str, path: str) -> RunnerHandle:
        config = self._runner_config(model_id, path)
        size = self._size_of(config)
        if size > self.memory_budget_bytes:
            raise PoolExhausted(f"model {model_id} needs {size >> 20} MiB, more than this node's budget of "
                                f"{self.memory_budget_bytes >> 20} MiB")
        while len(self._runners) >= self.max_models or self._used_bytes() + size > self.memory_budget_bytes:
            victim = next((h for h in self._runners.values() if not h.in_flight()), None)
            if victim is None:
                raise PoolExhausted(f"model {model_id} does not fit beside the {len(self._runners)} models this "
                                    f"node is serving now")
            self._stop(victim)
        handle = RunnerHandle(config=config, size_bytes=size)
        parent, child = socket.socketpair()
        env = {**runner_environment(os.environ), CONFIG_ENV: config.to_json(), "LLMP_RUNNER_FD": str(child.fileno())}
        handle.proc = subprocess.Popen([sys.executable, "-m", "workers.engine.process"], env=env,
                                       pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        handle.sock = parent
        self._runners[model_id] = handle
        logger.info("runner %d started for model %s (%d slots of %d positions, %d threads)", handle.proc.pid,
                    model_id, config.n_slots, config.n_ctx, config.n_threads)
        threading.Thread(target=self._watch, args=(handle,), name=f"runner-{model_id}", daemon=True).start()
        return handle

    def _deliver(self, handle: RunnerHandle, wire: dict) -> None:
        request_id = wire["request_id"]
        if handle.state == "loading":
            handle.unsent[request_id] = wire
            return
        handle.pending[request_id] = wire
        if not handle.send("submit", request=wire, received=time.time()):
            pass  # the runner is dying; _watch will hand this request on

    def _stop(self, handle: RunnerHandle) -> None:
        """Ask a runner to end (caller holds the lock); it is forgotten now, its process reaped by _watch."""
        if self._runners.get(handle.model_id) is handle:
            del self._runners[handle.model_id]
        if handle.state in ("loading", "ready"):
            handle.state = "stopping"
            handle.send("stop")
            try:
                handle.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _watch(self, handle: RunnerHandle) -> None:
        """Read the runner's messages until its socket closes, then account for its exit."""
        reader = handle.sock.makefile("rb")
        for line in reader:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            self._on_message(handle, message)
        returncode = handle.proc.wait()
        self._exited(handle, returncode)

    def _on_message(self, handle: RunnerHandle, message: dict) -> None:
        op = message.get("op")
        failure = None
        with self._lock:
            if op == "ready":
                handle.memory = message.get("memory")
                if handle.memory and handle.memory.get("total_bytes"):
                    handle.size_bytes = int(handle.memory["total_bytes"])
                if handle.state == "loading":
                    handle.state = "ready"
                unsent, handle.unsent = handle.unsent, {}
                for wire in unsent.values():
                    self._deliver(handle, wire)
            elif op == "failed":
                handle.state = "failed"
                error = message.get("error") or {}
                logger.error("runner for model %s could not load it: %s", handle.model_id, error.get("message"))
                for request_id in list(handle.unsent) + list(handle.pending):
                    self._fail(request_id, error)
                handle.unsent.clear()
                handle.pending.clear()
                if self._runners.get(handle.model_id) is handle:
                    del self._runners[handle.model_id]
                failure = self._load_failed(handle, error.get("message") or "llama.cpp could not load it")
            elif op == "started":
                request_id = message.get("id")
                if handle.pending.pop(request_id, None) is not None:
                    handle.started.add(request_id)
            elif op == "ended":
                request_id = message.get("id")
                handle.started.discard(request_id)
                handle.pending.pop(request_id, None)
                if handle.unload_when_idle and not handle.in_flight():
                    self._stop(handle)
                self._idle.notify_all()
            elif op == "stats":
                handle.stats = {"active": message.get("active"), **(message.get("engine") or {})}
        if failure is not None:
            self._report_load_failure(failure)
        if op == "ready" and self._on_ready is not None:
            self._on_ready(handle)
        if op == "ended" and self._on_ended is not None:
            self._on_ended(handle, message)

    def _exited(self, handle: RunnerHandle, returncode: int) -> None:
        how = describe_exit(returncode)
        failure = None
        with self._lock:
            expected = handle.state == "stopping" and returncode == 0
            if handle.state == "loading" and (_crashed(returncode) or handle.retried):
                # It died before it was ready, of its own fault (an abort, a segfault, an error exit) or for
                # the second time running (a kill, e.g. out of memory): loading this file kills runners.
                failure = self._load_failed(handle, f"its runner died while loading it, {how}")
            handle.state = "exited" if handle.state != "failed" else "failed"
            if self._runners.get(handle.model_id) is handle:
                del self._runners[handle.model_id]
            lost, retry = sorted(handle.started), {**handle.unsent, **handle.pending}
            handle.started.clear()
            handle.unsent.clear()
            handle.pending.clear()
            if not expected:
                logger.error("runner %d of model %s died after %.0fs: %s; %d requests lost, %d handed on",
                             handle.proc.pid, handle.model_id, time.monotonic() - handle.started_at, how,
                             len(lost), len(retry))
                self.exits = (self.exits + [{"model_id": handle.model_id, "how": how, "at": time.time()}])[-10:]
            for request_id in lost:
                self._fail(request_id, InferenceError(
                    f"The runner of model {handle.model_id} on node {handle.config.node} died while serving the "
                    f"request ({how}).", code="worker_lost", status=502, type="server_error").as_event())
            for request_id, wire in retry.items():
                if failure is not None:
                    self._fail(request_id, InferenceError(failure.message(), code="model_unavailable", status=503,
                                                          type="server_error").as_event())
                    continue
                if request_id in handle.retried or handle.state == "failed":
                    self._fail(request_id, InferenceError(
                        f"The runner of model {handle.model_id} died twice before serving the request ({how}).",
                        code="worker_lost", status=502, type="server_error").as_event())
                    continue
                try:
                    self.submit(model_id=handle.model_id, path=handle.config.path, wire=wire)
                    replacement = self._runners.get(handle.model_id)
                    if replacement is not None:
                        replacement.retried.add(request_id)
                except (PoolExhausted, ModelLoadFailed) as exc:
                    self._fail(request_id, InferenceError(str(exc), code="model_unavailable", status=503,
                                                          type="server_error").as_event())
            self._idle.notify_all()
        try:
            handle.sock.close()
        except OSError:
            pass
        if failure is not None:
            self._report_load_failure(failure)

    def _fail(self, request_id: str, error: dict) -> None:
        try:
            protocol.request_event_append(self._redis, self._prefix, request_id, protocol.EVENT_ERROR, error)
        except Exception:
            logger.exception("could not fail request %s", request_id)
