"""A bounded pool of loaded models, shared by every request a worker runs.

A request leases one instance of a model; several instances ("slots") of one model may be
loaded so that concurrent requests to it run side by side. Models are evicted least recently
used first when a new one would exceed the number of models or the memory budget; a model
with a request in flight is never evicted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelKey:
    model_id: str
    path: str
    embedding: bool = False


@dataclass
class _Entry:
    size_bytes: int
    idle: list[Any] = field(default_factory=list)
    busy: int = 0
    loading: int = 0

    @property
    def instances(self) -> int:
        return len(self.idle) + self.busy + self.loading


class PoolExhausted(RuntimeError):
    """The model cannot fit even after evicting everything idle."""


class ModelPool:
    def __init__(self, *, loader: Callable[[ModelKey], Any], size_of: Callable[[ModelKey], int],
                 max_models: int, memory_budget_bytes: int, slots_per_model: int,
                 unloader: Callable[[Any], None] = lambda instance: None) -> None:
        self._loader, self._size_of, self._unloader = loader, size_of, unloader
        self.max_models, self.memory_budget_bytes, self.slots_per_model = max_models, memory_budget_bytes, slots_per_model
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()
        self._cond = threading.Condition()

    def loaded(self) -> list[ModelKey]:
        with self._cond:
            return [key for key, entry in self._entries.items() if entry.idle or entry.busy]

    def in_flight(self) -> int:
        """Leases held or being loaded right now: the requests this pool is serving."""
        with self._cond:
            return sum(entry.busy + entry.loading for entry in self._entries.values())

    def unload(self, model_ids: list[str] | None = None, *, timeout: float = 600.0) -> list[str]:
        """Unload ``model_ids`` (every model when None) once their leases have ended.

        Waits up to ``timeout`` seconds for each model's requests in flight to finish; a model
        still busy after that stays loaded. Returns the ids that were unloaded.
        """
        deadline = time.monotonic() + timeout
        unloaded: set[str] = set()
        with self._cond:
            while True:
                wanted = [k for k in self._entries if model_ids is None or k.model_id in model_ids]
                for key in wanted:
                    entry = self._entries[key]
                    if entry.busy == 0 and entry.loading == 0:
                        for instance in self._entries.pop(key).idle:
                            self._unloader(instance)
                        unloaded.add(key.model_id)
                still_busy = [key for key in wanted if key in self._entries]
                remaining = deadline - time.monotonic()
                if not still_busy or remaining <= 0:
                    return sorted(unloaded)
                self._cond.wait(remaining)

    def _used_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self._entries.values())

    def _evict_for(self, size: int) -> bool:
        """Evict idle models (oldest first) until one more of ``size`` fits; caller holds the lock."""
        while len(self._entries) >= self.max_models or self._used_bytes() + size > self.memory_budget_bytes:
            victim = next((k for k, e in self._entries.items() if e.busy == 0 and e.loading == 0), None)
            if victim is None:
                return False
            for instance in self._entries.pop(victim).idle:
                self._unloader(instance)
        return True

    @contextmanager
    def lease(self, key: ModelKey, *, timeout: float = 600.0) -> Iterator[Any]:
        """Hold one loaded instance of ``key`` for the duration of the block."""
        deadline = time.monotonic() + timeout
        instance = None
        with self._cond:
            while True:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    if entry.idle:
                        instance = entry.idle.pop()
                        entry.busy += 1
                        break
                    if entry.instances < self.slots_per_model:
                        entry.loading += 1
                        break
                else:
                    size = self._size_of(key)
                    if size > self.memory_budget_bytes:
                        raise PoolExhausted(
                            f"model {key.model_id} needs {size >> 20} MiB, more than the pool's budget "
                            f"of {self.memory_budget_bytes >> 20} MiB")
                    if self._evict_for(size):
                        entry = self._entries[key] = _Entry(size_bytes=size, loading=1)
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolExhausted(f"timed out waiting for a free slot of model {key.model_id}")
                self._cond.wait(remaining)
        if instance is None:
            try:
                instance = self._loader(key)
            except BaseException:
                with self._cond:
                    entry.loading -= 1
                    if entry.instances == 0:
                        self._entries.pop(key, None)
                    self._cond.notify_all()
                raise
            with self._cond:
                entry.loading -= 1
                entry.busy += 1
        try:
            yield instance
        finally:
            with self._cond:
                entry.busy -= 1
                entry.idle.append(instance)
                self._cond.notify_all()
