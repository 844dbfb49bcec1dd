"""The gateway's copies of keys, models and nodes (apps/gateway/lookups.py): a write is seen by the next request."""

from __future__ import annotations

import httpx

from apps.models.models import RegisteredModel


def _chat(platform, api_key: str, model_id: str) -> httpx.Response:
    return httpx.post(f"{platform.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": model_id, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
                      timeout=60)


def test_a_model_deactivated_after_use_is_unknown_to_the_next_request(platform, api_key, model_id):
    assert _chat(platform, api_key, model_id).status_code == 200  # the gateway now keeps a copy of the model
    model = RegisteredModel.objects.get(pk=model_id)
    model.is_active = False
    model.save(update_fields=["is_active"])
    try:
        response = _chat(platform, api_key, model_id)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
    finally:
        model.is_active = True
        model.save(update_fields=["is_active"])
    assert _chat(platform, api_key, model_id).status_code == 200


def test_a_model_changed_behind_the_orms_back_is_seen_once_its_copy_ages_out(platform, api_key, model_id):
    from apps.gateway.lookups import MODELS, TIME_LIMITS
    from llmplatform import devstack

    assert _chat(platform, api_key, model_id).status_code == 200
    RegisteredModel.objects.filter(pk=model_id).update(is_active=False)  # no post_save: no epoch bump
    try:
        devstack.wait_until(lambda: _chat(platform, api_key, model_id).status_code == 404,
                            timeout=TIME_LIMITS[MODELS] + 5, interval=0.5, what="the copy to age out")
    finally:
        RegisteredModel.objects.filter(pk=model_id).update(is_active=True)
        RegisteredModel.objects.get(pk=model_id).save(update_fields=["is_active"])  # and bump, for the next tests


def test_one_request_reads_the_epochs_once_though_its_check_and_its_view_are_different_tasks(monkeypatch):
    import asyncio

    from apps.gateway import lookups
    from llmplatform.epochs import epochs_request

    reads = []
    real = lookups.epochs_read

    async def counted(*kinds):
        reads.append(kinds)
        return await real(*kinds)

    monkeypatch.setattr(lookups, "epochs_read", counted)

    async def one_request() -> None:
        before, ended = len(reads), asyncio.Event()

        async def left_behind() -> bool:  # a task of the request that runs on after it ends
            await ended.wait()
            return await lookups._epochs_refresh()

        with epochs_request():
            assert await lookups._epochs_refresh()  # the guard's key check
            assert await asyncio.create_task(lookups._epochs_refresh())  # the view, in a task of its own
            straggler = asyncio.create_task(left_behind())
        assert len(reads) == before + 1
        ended.set()
        assert await straggler
        assert len(reads) == before + 2  # once its request is over, a task trusts nothing it read

    asyncio.run(one_request())
    asyncio.run(one_request())  # every request reads them afresh
    assert len(reads) == 4


def test_a_burst_that_finds_a_row_missing_reads_it_from_the_database_once():
    import asyncio

    from apps.gateway import lookups
    from llmplatform.epochs import epochs_request

    copy, loads = lookups._Copy(lookups.NODES), []
    answered = None  # set once the whole burst is waiting: the database read ends only then

    async def load():
        loads.append(1)
        await answered.wait()
        return ["node"]

    async def one_request():
        with epochs_request():
            return await copy.get("live", load)

    async def burst():
        nonlocal answered
        answered = asyncio.Event()
        first = asyncio.create_task(one_request())
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(one_request())
        rest = [asyncio.create_task(one_request()) for _ in range(7)]
        await asyncio.sleep(0)  # every request of the burst is now waiting on the read
        cancelled.cancel()  # a client that leaves does not take the read away from the others
        answered.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(burst()) == [["node"]] * 8
    assert len(loads) == 1 and copy.loading == {}
    answered = asyncio.Event()  # a read now would wait for ever: the copy must answer
    assert asyncio.run(asyncio.wait_for(one_request(), 5)) == ["node"] and len(loads) == 1
