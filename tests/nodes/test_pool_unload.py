"""ModelPool.unload, which a drain runs on the worker: models go once their requests have finished."""

from __future__ import annotations

from workers.pool import ModelKey, ModelPool


class Loaded:
    def __init__(self, key: ModelKey) -> None:
        self.key, self.closed = key, False


def _pool(*, loader=Loaded, slots: int = 1) -> ModelPool:
    def unloader(instance: Loaded) -> None:
        instance.closed = True

    return ModelPool(loader=loader, size_of=lambda key: 1, unloader=unloader, max_models=3, memory_budget_bytes=10,
                     slots_per_model=slots)


def _key(name: str) -> ModelKey:
    return ModelKey(name, f"/models/{name}.gguf")


def _loaded(pool: ModelPool) -> list[str]:
    return [key.model_id for key in pool.loaded()]


def test_unload_without_ids_unloads_every_idle_model():
    pool = _pool()
    instances = []
    for name in ("a", "b"):
        with pool.lease(_key(name)) as instance:
            instances.append(instance)
    assert pool.unload() == ["a", "b"]
    assert pool.loaded() == [] and pool.in_flight() == 0
    assert all(instance.closed for instance in instances)


def test_unload_leaves_models_it_was_not_asked_about():
    pool = _pool()
    for name in ("a", "b"):
        with pool.lease(_key(name)):
            pass
    assert pool.unload(["a"]) == ["a"]
    assert _loaded(pool) == ["b"]


def test_a_model_serving_a_request_is_unloaded_right_after_the_request_ends():
    pool = _pool()
    with pool.lease(_key("a")) as instance:
        assert pool.unload(["a"]) == []  # returns at once; the model is still serving
        assert not instance.closed and _loaded(pool) == ["a"] and pool.in_flight() == 1
    assert instance.closed and pool.loaded() == []


def test_a_model_goes_only_when_its_last_concurrent_request_ends():
    pool = _pool(slots=2)
    with pool.lease(_key("a")) as first:
        with pool.lease(_key("a")) as second:
            assert first is not second
            assert pool.unload(["a"]) == []
        assert not first.closed and not second.closed and _loaded(pool) == ["a"]
    assert first.closed and second.closed and pool.loaded() == []


def test_a_model_still_loading_is_unloaded_once_the_request_it_loads_for_ends():
    unloaded_during_load = []

    def loader(key: ModelKey) -> Loaded:
        unloaded_during_load.append(pool.unload([key.model_id]))  # a drain arriving mid-load
        return Loaded(key)

    pool = _pool(loader=loader)
    with pool.lease(_key("a")) as instance:
        assert unloaded_during_load == [[]] and not instance.closed and _loaded(pool) == ["a"]
    assert instance.closed and pool.loaded() == []


def test_a_model_unloaded_after_its_request_loads_afresh_for_the_next_one():
    pool = _pool()
    with pool.lease(_key("a")) as first:
        pool.unload(["a"])
    with pool.lease(_key("a")) as second:
        assert second is not first and not second.closed
    assert _loaded(pool) == ["a"]  # no unload asked for this time: it stays loaded
