"""The DRF management API: nodes, registry, keys and request history, with its filters."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from apps.gateway.models import RequestLog
from apps.gateway.services import api_key_create, request_log_prune
from llmplatform import devstack


def _client(platform, *, staff: bool) -> tuple[httpx.Client, object]:
    user = get_user_model().objects.create_user(f"u-{uuid.uuid4().hex[:8]}", is_staff=staff)
    _, raw_key = api_key_create(name="mgmt", user=user)
    return httpx.Client(base_url=platform.base_url, headers={"Authorization": f"Bearer {raw_key}"}), user


def test_the_live_node_is_listed_online(platform):
    client, _ = _client(platform, staff=True)
    nodes = {n["name"]: n for n in client.get("/api/v1/nodes/").json()["results"]}
    assert nodes[platform.node]["status"] == "online"
    assert nodes[platform.node]["hardware"]["ram_total_bytes"] > 0


def test_request_history_is_filtered_and_private_to_its_owner(platform, model_id):
    alice, alice_user = _client(platform, staff=False)
    bob, _ = _client(platform, staff=False)
    reply = alice.post("/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 3})
    request_id = reply.headers["X-Request-Id"]
    devstack.wait_until(lambda: RequestLog.objects.filter(pk=uuid.UUID(request_id), status="succeeded").exists(),
                        timeout=10, what="history row")
    mine = alice.get("/api/v1/requests/", params={"model": model_id, "status": "succeeded"}).json()
    assert [row["id"] for row in mine["results"]] == [request_id]
    assert mine["results"][0]["user"] == alice_user.username
    assert alice.get("/api/v1/requests/", params={"model": "other-model"}).json()["results"] == []
    assert bob.get("/api/v1/requests/").json()["results"] == []


def test_a_key_created_through_the_api_is_shown_once(platform):
    client, user = _client(platform, staff=False)
    created = client.post("/api/v1/keys/", json={"name": "ci", "expires_in": 3600})
    assert created.status_code == 201
    raw_key = created.json()["key"]
    assert httpx.get(f"{platform.base_url}/v1/models", headers={"Authorization": f"Bearer {raw_key}"}).status_code == 200
    listed = client.get("/api/v1/keys/").json()["results"]
    assert all("key" not in row for row in listed)
    revoked = client.post(f"/api/v1/keys/{created.json()['id']}/revoke/")
    assert revoked.json()["revoked_at"]
    assert httpx.get(f"{platform.base_url}/v1/models", headers={"Authorization": f"Bearer {raw_key}"}).status_code == 401


def test_management_errors_have_one_shape(platform):
    anonymous = httpx.get(f"{platform.base_url}/api/v1/nodes/")
    assert anonymous.status_code in (401, 403)
    assert isinstance(anonymous.json()["error"], str)
    client, _ = _client(platform, staff=False)
    bad = client.post("/api/v1/keys/", json={"name": ""})
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("name:")


PAGINATED_LISTS = ["/api/v1/nodes/", "/api/v1/registry/", "/api/v1/external-models/", "/api/v1/keys/",
                   "/api/v1/requests/", "/api/v1/jobs/"]


@pytest.mark.parametrize("path", PAGINATED_LISTS)
def test_every_list_refuses_a_page_size_out_of_bounds_with_a_400(platform, path):
    client, _ = _client(platform, staff=True)
    for query in ({"limit": "9223372036854775808"}, {"limit": "1001"}, {"limit": "0"}, {"limit": "ten"},
                  {"offset": "-1"}, {"offset": "9" * 5000}):
        response = client.get(path, params=query)
        assert response.status_code == 400, (query, response.text)
        assert response.json()["error"].startswith(f"{next(iter(query))}:")
    assert client.get(path, params={"limit": "1000", "offset": "9223372036854775808"}).json()["results"] == []


def test_a_body_nested_thousands_of_levels_deep_is_a_400(platform):
    client, _ = _client(platform, staff=False)
    for path in ("/api/v1/keys/", "/api/v1/generate"):
        for nested in ("[" * 5000 + "]" * 5000, "[" * 200 + "]" * 200):
            response = client.post(path, content=f'{{"name": "deep", "extra": {nested}}}',
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == 400, response.text
            assert isinstance(response.json()["error"], str)


@pytest.mark.parametrize("path, body, field", [
    ("/api/v1/keys/", '{"name": "key \\ud800"}', "name"),
    ("/api/v1/generate", '{"question": "\\udc00?", "model_name": "MODEL"}', "question"),
])
def test_a_lone_surrogate_in_a_body_is_a_400_that_names_the_field(platform, model_id, path, body, field):
    client, _ = _client(platform, staff=False)
    response = client.post(path, content=body.replace("MODEL", model_id).encode(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:")


def test_an_expiry_too_far_away_for_a_date_is_a_400(platform):
    client, _ = _client(platform, staff=False)
    response = client.post("/api/v1/keys/", json={"name": "forever", "expires_in": 10**14})
    assert response.status_code == 400
    assert response.json()["error"].startswith("expires_in:")
    assert client.post("/api/v1/keys/", json={"name": "a century", "expires_in": 100 * 365 * 86400}).status_code == 201


@pytest.mark.parametrize("until", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"])
def test_a_history_time_outside_the_years_utc_can_hold_is_a_400(platform, until):
    client, _ = _client(platform, staff=True)
    response = client.get("/api/v1/requests/", params={"until": until})
    assert response.status_code == 400 and response.json()["error"].startswith("until:")


def test_a_history_time_with_an_offset_postgresql_cannot_hold_is_read_as_utc(platform):
    client, _ = _client(platform, staff=True)
    assert client.get("/api/v1/requests/", params={"since": "2020-01-01T00:00:00+22:16"}).status_code == 200


def test_an_unknown_management_path_is_a_json_404(platform):
    client, _ = _client(platform, staff=True)
    for path in ("/api/v1/nope", "/api/v1/nodes/a/b/c/d/", "/api/v2/", "/api/v1/keys/no-such-key/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["Content-Type"] == "application/json"
        assert isinstance(response.json()["error"], str)
    anonymous = httpx.get(f"{platform.base_url}/api/v1/nope")
    assert anonymous.status_code == 404 and isinstance(anonymous.json()["error"], str)
    assert client.get("/api/v1/keys").headers["Location"] == "/api/v1/keys/"  # a missing slash still redirects


def test_the_openapi_schema_and_browsable_api_are_served(platform):
    schema = httpx.get(f"{platform.base_url}/api/schema/")
    assert schema.status_code == 200 and "/api/v1/requests/" in schema.text
    client, _ = _client(platform, staff=True)
    page = client.get("/api/v1/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "Api Root" in page.text


def test_retention_deletes_only_old_history():
    old = RequestLog.objects.create(path="/v1/models", status="succeeded")
    fresh = RequestLog.objects.create(path="/v1/models", status="succeeded")
    RequestLog.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=8))
    assert request_log_prune() >= 1
    assert not RequestLog.objects.filter(pk=old.pk).exists()
    assert RequestLog.objects.filter(pk=fresh.pk).exists()


def test_the_prune_task_runs_on_the_real_worker(platform):
    from apps.gateway.tasks import request_log_prune as task

    old = RequestLog.objects.create(path="/v1/models", status="succeeded")
    RequestLog.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=30))
    task.delay()
    devstack.wait_until(lambda: not RequestLog.objects.filter(pk=old.pk).exists(), timeout=20,
                        what="the worker to prune old history")


def test_the_openapi_schema_is_valid_and_complete():
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", stdout=io.StringIO())


def test_the_schema_says_which_related_fields_can_be_null():
    """A key without a user, a request without a key, a job before a node takes it: null in the JSON."""
    from drf_spectacular.generators import SchemaGenerator

    components = SchemaGenerator().get_schema(request=None, public=True)["components"]["schemas"]
    for component, field in (("ApiKey", "user"), ("RequestLog", "user"), ("RequestLog", "api_key"),
                             ("Job", "node"), ("Job", "created_by")):
        assert components[component]["properties"][field].get("nullable") is True, (component, field)
