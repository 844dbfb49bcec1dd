"""A bounded pool of loaded models, shared by every request a worker runs.

A request leases one instance of a model; several instances ("slots") of one model may be
loaded so that concurrent requests to it run side by side. Models are evicted least recently
used first when a new one would exceed the number of models or the memory budget; a model
with a request in flight is never evicted, and one asked to unload goes when its last request ends.
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
    unload_when_idle: bool = False

    @property
    def instances(self) -> int:
        return len(self.idle) + self.busy + self.loading

    @property
    def in_use(self) -> bool:
        return bool(self.busy or self.loading)


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

    def unload(self, model_ids: list[str] | None = None) -> list[str]:
        """Unload ``model_ids`` (every model when None) without waiting for their requests.

        A model with no request in flight is unloaded now; one still serving (or loading) is
        unloaded as its last lease ends. Returns the ids unloaded now.
        """
        unloaded = []
        with self._cond:
            for key in [k for k in self._entries if model_ids is None or k.model_id in model_ids]:
                entry = self._entries[key]
                if entry.in_use:
                    entry.unload_when_idle = True
                else:
                    self._drop(key)
                    unloaded.append(key.model_id)
            self._cond.notify_all()  # leases waiting for memory
        return sorted(unloaded)

    def _drop(self, key: ModelKey) -> None:
        """Forget ``key`` and unload its instances; caller holds the lock and has checked none is in use."""
        for instance in self._entries.pop(key).idle:
            self._unloader(instance)

    def _settle(self, key: ModelKey, entry: _Entry) -> None:
        """After a lease or a load ends: drop an entry left empty or waiting to be unloaded; caller holds the lock."""
        if not entry.in_use and (entry.unload_when_idle or not entry.idle):
            self._drop(key)
        self._cond.notify_all()  # leases waiting for an instance, a slot or memory

    def _used_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self._entries.values())

    def _evict_for(self, size: int) -> bool:
        """Evict idle models (oldest first) until one more of ``size`` fits; caller holds the lock."""
        while len(self._entries) >= self.max_models or self._used_bytes() + size > self.memory_budget_bytes:
            victim = next((k for k, e in self._entries.items() if not e.in_use), None)
            if victim is None:
                return False
            self._drop(victim)
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
                    self._settle(key, entry)
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
                self._settle(key, entry)
