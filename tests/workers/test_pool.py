"""The model pool: reuse, slots, LRU eviction, the memory budget, and failed loads."""

from __future__ import annotations

import threading

import pytest

from workers.pool import ModelKey, ModelPool, PoolExhausted


class Loaded:
    def __init__(self, key: ModelKey) -> None:
        self.key, self.closed = key, False


def make_pool(*, max_models=2, budget=1000, slots=1, sizes=None, fail=()):
    loads, unloads = [], []

    def loader(key):
        if key.model_id in fail:
            raise RuntimeError(f"cannot load {key.model_id}")
        instance = Loaded(key)
        loads.append(instance)
        return instance

    def unloader(instance):
        instance.closed = True
        unloads.append(instance.key.model_id)

    pool = ModelPool(loader=loader, size_of=lambda key: (sizes or {}).get(key.model_id, 100), unloader=unloader,
                     max_models=max_models, memory_budget_bytes=budget, slots_per_model=slots)
    return pool, loads, unloads


def key(name: str) -> ModelKey:
    return ModelKey(name, f"/models/{name}.gguf")


def test_a_second_request_reuses_the_loaded_model():
    pool, loads, _ = make_pool()
    with pool.lease(key("a")) as first:
        pass
    with pool.lease(key("a")) as second:
        assert second is first
    assert len(loads) == 1


def test_the_least_recently_used_model_is_evicted_first():
    pool, _, unloads = make_pool(max_models=2)
    for name in ("a", "b", "a", "c"):
        with pool.lease(key(name)):
            pass
    assert unloads == ["b"]
    assert {k.model_id for k in pool.loaded()} == {"a", "c"}


def test_the_memory_budget_evicts_before_the_model_count_does():
    pool, _, unloads = make_pool(max_models=5, budget=250, sizes={"a": 100, "b": 100, "c": 100})
    for name in ("a", "b", "c"):
        with pool.lease(key(name)):
            pass
    assert unloads == ["a"]


def test_a_model_larger_than_the_budget_is_refused():
    pool, loads, _ = make_pool(budget=50)
    with pytest.raises(PoolExhausted, match="more than the pool's budget"):
        with pool.lease(key("big")):
            pass
    assert loads == []


def test_a_busy_model_is_never_evicted_and_the_newcomer_waits():
    pool, _, unloads = make_pool(max_models=1)
    entered = threading.Event()
    got_b = threading.Event()

    def lease_b():
        entered.set()
        with pool.lease(key("b")):
            got_b.set()

    with pool.lease(key("a")) as a:
        thread = threading.Thread(target=lease_b)
        thread.start()
        entered.wait()
        assert not got_b.wait(0.3)
        assert not a.closed
    thread.join(5)
    assert got_b.is_set() and unloads == ["a"]


def test_slots_let_concurrent_requests_use_separate_instances():
    pool, loads, _ = make_pool(slots=2)
    with pool.lease(key("a")) as one, pool.lease(key("a")) as two:
        assert one is not two
    assert len(loads) == 2


def test_a_failed_load_leaves_no_entry_behind():
    pool, _, _ = make_pool(fail={"bad"})
    with pytest.raises(RuntimeError):
        with pool.lease(key("bad")):
            pass
    assert pool.loaded() == []
    with pool.lease(key("good")):
        pass
