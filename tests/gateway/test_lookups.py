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
