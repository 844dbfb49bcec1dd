"""ModelPool.unload, which a drain runs on the worker: models go once their requests have finished."""

from __future__ import annotations

import threading

from workers.pool import ModelKey, ModelPool


class Loaded:
    def __init__(self, key: ModelKey) -> None:
        self.key, self.closed = key, False


def _pool() -> ModelPool:
    def unloader(instance: Loaded) -> None:
        instance.closed = True

    return ModelPool(loader=Loaded, size_of=lambda key: 1, unloader=unloader, max_models=3, memory_budget_bytes=10,
                     slots_per_model=1)


def _key(name: str) -> ModelKey:
    return ModelKey(name, f"/models/{name}.gguf")


def test_unload_without_ids_unloads_every_idle_model():
    pool = _pool()
    for name in ("a", "b"):
        with pool.lease(_key(name)):
            pass
    assert pool.unload() == ["a", "b"]
    assert pool.loaded() == [] and pool.in_flight() == 0


def test_unload_leaves_models_it_was_not_asked_about():
    pool = _pool()
    for name in ("a", "b"):
        with pool.lease(_key(name)):
            pass
    assert pool.unload(["a"]) == ["a"]
    assert [key.model_id for key in pool.loaded()] == ["b"]


def test_unload_waits_for_the_request_in_flight_to_finish():
    pool = _pool()
    leased, release = threading.Event(), threading.Event()
    instances = []

    def request() -> None:
        with pool.lease(_key("a")) as instance:
            instances.append(instance)
            leased.set()
            release.wait(10)

    thread = threading.Thread(target=request)
    thread.start()
    assert leased.wait(10)
    assert pool.in_flight() == 1
    assert pool.unload(["a"], timeout=0.05) == []  # still serving: stays loaded
    assert not instances[0].closed
    unloading = threading.Thread(target=lambda: instances.append(pool.unload(["a"], timeout=10)))
    unloading.start()
    release.set()
    thread.join(10)
    unloading.join(10)
    assert instances[1] == ["a"] and instances[0].closed and pool.loaded() == []
