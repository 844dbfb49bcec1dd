"""The Django admin covers users, keys, nodes, models and request history."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.gateway.models import ApiKey, RequestLog
from apps.gateway.services import api_key_hash


@pytest.fixture
def admin_client() -> Client:
    user = get_user_model().objects.create_superuser(f"admin-{uuid.uuid4().hex[:6]}", password="x")
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("url", [
    "/admin/auth/user/", "/admin/gateway/apikey/", "/admin/gateway/requestlog/", "/admin/nodes/node/",
    "/admin/llm_models/registeredmodel/", "/admin/gateway/apikey/add/",
])
def test_every_admin_page_opens(admin_client, url):
    assert admin_client.get(url).status_code == 200


def test_a_key_added_in_the_admin_is_shown_once_and_stored_hashed(admin_client):
    response = admin_client.post("/admin/gateway/apikey/add/", {"name": "from admin"}, follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"] if "shown once" in str(m)]
    assert len(shown) == 1
    raw_key = shown[0].rsplit(" ", 1)[-1]
    key = ApiKey.objects.get(key_hash=api_key_hash(raw_key))
    assert key.name == "from admin" and key.prefix == raw_key[:12]
    page = admin_client.get("/admin/gateway/apikey/").content.decode()
    assert raw_key not in page and key.prefix in page


def test_request_history_is_read_only_in_the_admin(admin_client):
    row = RequestLog.objects.create(path="/v1/models", status="succeeded")
    assert admin_client.get("/admin/gateway/requestlog/add/").status_code == 403
    assert admin_client.get(f"/admin/gateway/requestlog/{row.pk}/change/").status_code == 200
