"""API keys: stored only as a hash, expiring, revocable, created by a management command."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import httpx
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone

from apps.gateway.models import ApiKey
from apps.gateway.services import api_key_create, api_key_hash, api_key_revoke
from llmplatform import devstack


def _models_status(platform, raw_key: str) -> int:
    return httpx.get(f"{platform.base_url}/v1/models", headers={"Authorization": f"Bearer {raw_key}"}).status_code


def test_the_plain_key_is_nowhere_in_the_database():
    key, raw_key = api_key_create(name="hash check")
    dump = io.StringIO()
    call_command("dumpdata", stdout=dump)
    assert raw_key not in dump.getvalue()
    assert raw_key[12:] not in dump.getvalue()
    assert key.key_hash == api_key_hash(raw_key) in dump.getvalue()
    assert key.prefix == raw_key[:12]


def test_create_api_key_prints_a_working_key_on_its_last_line(platform):
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_key", "--name", "from the command", stdout=out, stderr=err)
    raw_key = out.getvalue().strip().splitlines()[-1]
    assert raw_key.startswith("llmp-")
    assert "shown only now" in err.getvalue()
    assert _models_status(platform, raw_key) == 200
    devstack.wait_until(lambda: ApiKey.objects.get(key_hash=api_key_hash(raw_key)).last_used_at is not None,
                        timeout=10, what="last_used_at")


def test_an_expired_key_is_refused(platform):
    key, raw_key = api_key_create(name="short-lived", expires_in=timedelta(hours=1))
    assert _models_status(platform, raw_key) == 200
    key.expires_at = timezone.now() - timedelta(seconds=1)
    key.save(update_fields=["expires_at"])
    response = httpx.get(f"{platform.base_url}/v1/models", headers={"Authorization": f"Bearer {raw_key}"})
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]


def test_a_key_revoked_after_use_is_refused_by_the_next_request(platform):
    key, raw_key = api_key_create(name="used, then revoked")
    assert _models_status(platform, raw_key) == 200  # the gateway now keeps a copy of the key
    api_key_revoke(key=key)
    assert _models_status(platform, raw_key) == 401


def test_a_key_whose_user_is_deactivated_after_use_is_refused_by_the_next_request(platform):
    user = get_user_model().objects.create_user(username=f"leaver-{uuid.uuid4().hex[:8]}", password="x")
    _, raw_key = api_key_create(name="a leaver's", user=user)
    assert _models_status(platform, raw_key) == 200
    user.is_active = False
    user.save(update_fields=["is_active"])
    assert _models_status(platform, raw_key) == 401


def test_a_revoked_key_is_refused(platform):
    key, raw_key = api_key_create(name="to revoke")
    api_key_revoke(key=key)
    response = httpx.get(f"{platform.base_url}/v1/models", headers={"Authorization": f"Bearer {raw_key}"})
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]


def test_create_api_key_refuses_an_unknown_user():
    import pytest
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no user named"):
        call_command("create_api_key", "--name", "x", "--user", "nobody-here")


def test_create_api_key_refuses_an_expiry_beyond_any_date():
    import pytest
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--expires-in must be"):
        call_command("create_api_key", "--name", "x", "--expires-in", str(10**14))
