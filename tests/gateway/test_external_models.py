"""External models: registry ids whose /v1 requests go to another OpenAI-compatible server.

The upstream is a real one: llama-cpp-python's own server on the bundled model, started as a
separate process with its own API key, reached through the real platform processes.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import openai
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.gateway.models import RequestLog
from apps.gateway.services import api_key_create
from apps.models.models import ExternalEndpoint, RegisteredModel
from apps.models.secrets import secret_decrypt
from llmplatform import devstack
from workers.bundled import bundled_model_path

UPSTREAM_KEY = f"sk-upstream-{uuid.uuid4().hex}"
UPSTREAM_CONTEXT = 512
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


class Upstream:
    def __init__(self, process: devstack.Process, base_url: str) -> None:
        self.process, self.base_url = process, base_url

    @property
    def host(self) -> str:
        return self.base_url.split("/")[2]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Upstream:
    """llama_cpp.server on the bundled model, with embeddings on and a small context."""
    port = devstack.free_port()
    process = devstack.start(
        "llama-cpp-server",
        ["-m", "llama_cpp.server", "--model", str(bundled_model_path()), "--host", "127.0.0.1", "--port", str(port),
         "--api_key", UPSTREAM_KEY, "--n_ctx", str(UPSTREAM_CONTEXT), "--embedding", "true"],
        env=devstack.child_env(), log_dir=Path(tmp_path_factory.mktemp("upstream")))
    base_url = f"http://127.0.0.1:{port}/v1"

    def serving() -> bool:
        reply = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=2)
        return reply.status_code == 200

    try:
        devstack.wait_until(serving, timeout=120, what="llama_cpp.server serving", processes=(process,))
        yield Upstream(process, base_url)
    finally:
        process.stop()


@pytest.fixture
def staff(platform) -> httpx.Client:
    """The management API as a staff user."""
    user = get_user_model().objects.create_user(f"ops-{uuid.uuid4().hex[:8]}", is_staff=True)
    _, raw_key = api_key_create(name="ops", user=user)
    with httpx.Client(base_url=platform.base_url, headers={"Authorization": f"Bearer {raw_key}"},
                      timeout=60) as session:
        yield session


def _register(staff: httpx.Client, endpoint: str, **fields) -> dict:
    body = {"name": f"ext-{uuid.uuid4().hex[:8]}", "endpoint": endpoint, "api_key": UPSTREAM_KEY,
            "upstream_model": "smollm2-upstream", **fields}
    reply = staff.post("/api/v1/external-models/", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()


@pytest.fixture
def external(staff, upstream) -> str:
    """A registered external model's id, forwarding to the upstream with the right key."""
    return _register(staff, upstream.base_url)["id"]


def _history(request_id: str, *, status: str) -> RequestLog:
    key = uuid.UUID(request_id)
    devstack.wait_until(lambda: RequestLog.objects.filter(pk=key, status=status).exists(), timeout=15,
                        what=f"history row {request_id} {status}")
    return RequestLog.objects.get(pk=key)


# --- registering ----------------------------------------------------------------------------------


def test_a_registered_external_model_is_listed_with_the_local_ones(client, external, model_id):
    assert {external, model_id} <= {m.id for m in client.models.list().data}
    assert client.models.retrieve(external).id == external


def test_registration_refuses_bad_names_taken_names_and_non_http_endpoints(staff, upstream, model_id):
    cases = [({"name": "no spaces allowed"}, 400), ({"name": model_id}, 409), ({"endpoint": "ftp://host/v1"}, 400),
             ({"endpoint": "not a url"}, 400), ({"endpoint": "http://user:pw@host/v1"}, 400)]
    for fields, status in cases:
        body = {"name": f"ext-{uuid.uuid4().hex[:8]}", "endpoint": upstream.base_url, **fields}
        reply = staff.post("/api/v1/external-models/", json=body)
        assert reply.status_code == status, (fields, reply.text)
        assert isinstance(reply.json()["error"], str)
    taken = _register(staff, upstream.base_url)["id"]
    again = staff.post("/api/v1/external-models/", json={"name": taken, "endpoint": upstream.base_url})
    assert again.status_code == 409 and taken in again.json()["error"]


def test_only_staff_may_register_but_anyone_signed_in_may_list(platform, staff, upstream, external):
    user = get_user_model().objects.create_user(f"u-{uuid.uuid4().hex[:8]}")
    _, raw_key = api_key_create(name="plain", user=user)
    plain = httpx.Client(base_url=platform.base_url, headers={"Authorization": f"Bearer {raw_key}"})
    refused = plain.post("/api/v1/external-models/", json={"name": "ext-x", "endpoint": upstream.base_url})
    assert refused.status_code == 403
    assert external in [row["id"] for row in plain.get("/api/v1/external-models/").json()["results"]]


def test_a_model_registered_inactive_is_stored_inactive_and_not_served(client, staff, upstream):
    created = _register(staff, upstream.base_url, is_active=False)

    assert created["is_active"] is False
    assert RegisteredModel.objects.get(id=created["id"]).is_active is False
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=created["id"], messages=CHAT, max_tokens=4)
    assert caught.value.code == "model_not_found"


def test_the_upstream_name_defaults_to_the_model_id(staff, upstream):
    name = f"ext-{uuid.uuid4().hex[:8]}"
    reply = staff.post("/api/v1/external-models/", json={"name": name, "endpoint": upstream.base_url + "/"})
    assert reply.status_code == 201, reply.text
    assert reply.json()["upstream_model"] == name
    assert reply.json()["endpoint"] == upstream.base_url
    assert reply.json()["api_key_set"] is False


# --- the upstream key -----------------------------------------------------------------------------


def test_the_upstream_key_is_stored_encrypted_and_never_shown(staff, external):
    row = ExternalEndpoint.objects.get(model_id=external)
    assert UPSTREAM_KEY not in row.api_key_encrypted
    assert UPSTREAM_KEY[-8:] not in row.api_key_encrypted
    assert secret_decrypt(row.api_key_encrypted) == UPSTREAM_KEY
    detail = staff.get(f"/api/v1/external-models/{external}/")
    listing = staff.get("/api/v1/external-models/")
    for reply in (detail, listing):
        assert reply.status_code == 200
        assert UPSTREAM_KEY not in reply.text and row.api_key_encrypted not in reply.text
    assert detail.json()["api_key_set"] is True
    assert detail.json()["api_key_last4"] == UPSTREAM_KEY[-4:]
    assert "api_key" not in detail.json()


def test_the_admin_takes_the_key_write_only_and_encrypts_it(upstream):
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser(f"admin-{uuid.uuid4().hex[:6]}", password="x"))
    name = f"ext-{uuid.uuid4().hex[:8]}"
    added = admin.post("/admin/llm_models/externalendpoint/add/",
                       {"name": name, "base_url": upstream.base_url, "upstream_model": "", "api_key": UPSTREAM_KEY})
    assert added.status_code == 302, added.content.decode()[-2000:]
    row = ExternalEndpoint.objects.select_related("model").get(model_id=name)
    assert row.model.source == "external" and row.upstream_model == name
    assert secret_decrypt(row.api_key_encrypted) == UPSTREAM_KEY
    for url in ("/admin/llm_models/externalendpoint/", f"/admin/llm_models/externalendpoint/{name}/change/"):
        page = admin.get(url)
        assert page.status_code == 200
        text = page.content.decode()
        assert UPSTREAM_KEY not in text and row.api_key_encrypted not in text
        assert UPSTREAM_KEY[-4:] in text
    kept = admin.post(f"/admin/llm_models/externalendpoint/{name}/change/",
                      {"base_url": upstream.base_url, "upstream_model": "renamed", "api_key": ""})
    assert kept.status_code == 302
    row.refresh_from_db()
    assert row.upstream_model == "renamed" and secret_decrypt(row.api_key_encrypted) == UPSTREAM_KEY
    admin.post(f"/admin/llm_models/externalendpoint/{name}/delete/", {"post": "yes"})
    assert not RegisteredModel.objects.filter(id=name).exists()


# --- serving ------------------------------------------------------------------------------------


def test_a_chat_completion_is_answered_by_the_upstream_under_our_model_id(client, external, upstream):
    raw = client.chat.completions.with_raw_response.create(model=external, messages=CHAT, max_tokens=16,
                                                           temperature=0)
    reply = raw.parse()
    assert reply.model == external
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 16
    row = _history(raw.headers["X-Request-Id"], status="succeeded")
    assert (row.model, row.node, row.stream, row.status_code) == (external, f"external:{upstream.host}", False, 200)
    assert (row.prompt_tokens, row.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert row.response_body["model"] == external


def test_a_streamed_chat_is_relayed_chunk_by_chunk_and_equals_the_unstreamed_answer(client, external):
    args = dict(model=external, messages=CHAT, max_tokens=24, temperature=0, seed=3)
    whole = client.chat.completions.create(**args).choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(**args, stream=True)
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3
    assert {c.model for c in chunks} == {external}
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert text == whole
    row = _history(raw.headers["X-Request-Id"], status="succeeded")
    assert row.stream is True and row.response_body["text"] == text and row.ttft_ms is not None


def test_completions_are_forwarded_streamed_or_not(client, external):
    reply = client.completions.create(model=external, prompt="The three primary colours are", max_tokens=8,
                                      temperature=0)
    assert reply.model == external and reply.choices[0].text and reply.usage.completion_tokens > 0
    streamed = list(client.completions.create(model=external, prompt="The three primary colours are",
                                              max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_embeddings_are_forwarded(client, external):
    # llama_cpp.server serves embeddings only when started with --embedding; for a model without a
    # pooling layer (SmolLM2 is a plain causal LM) each input's "embedding" is its per-token
    # vectors. The gateway relays whatever the upstream answers, under our model id.
    raw = client.embeddings.with_raw_response.create(model=external, input=["hello there", "the sea"])
    reply = raw.parse()
    assert reply.model == external
    assert [item.index for item in reply.data] == [0, 1]
    assert all(item.embedding for item in reply.data)
    assert reply.usage.prompt_tokens > 0
    row = _history(raw.headers["X-Request-Id"], status="succeeded")
    assert row.response_body["count"] == 2 and row.path == "/v1/embeddings"


def test_the_local_generate_endpoint_answers_from_an_external_model_registered_through_the_local_api(staff, upstream):
    name = f"ext-{uuid.uuid4().hex[:8]}"
    registered = staff.post("/api/v1/models", json={"name": name, "endpoint": upstream.base_url, "api_key": UPSTREAM_KEY,
                                                    "upstream_model": "smollm2-upstream"})
    assert registered.status_code == 200, registered.text
    assert registered.json()["message"] == "External model registered successfully"

    reply = staff.post("/api/v1/generate", json={"question": CHAT[0]["content"], "model_name": name, "max_tokens": 8,
                                                 "temperature": 0})

    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["success"] is True and body["response"].strip() and body["model_used"] == name
    assert 0 < body["token_count"] <= 8
    row = _history(reply.headers["X-Request-Id"], status="succeeded")
    assert (row.model, row.node, row.path, row.stream, row.status_code) == (
        name, f"external:{upstream.host}", "/api/v1/generate", False, 200)
    assert row.completion_tokens == body["token_count"] and row.prompt_tokens > 0
    assert row.response_body["model"] == name


def test_a_client_that_goes_away_mid_stream_closes_the_upstream_request(platform, api_key, external, upstream):
    body = {"model": external, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 400, "temperature": 0, "stream": True}
    disconnects_before = upstream.process.log().count("Disconnected from client")
    with httpx.Client(base_url=platform.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            request_id = reply.headers["X-Request-Id"]
            lines = reply.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
    devstack.wait_until(lambda: upstream.process.log().count("Disconnected from client") > disconnects_before,
                        timeout=30, what="the upstream to see the request closed", processes=(upstream.process,))
    row = _history(request_id, status="cancelled")
    assert row.status_code == 499 and row.response_body["text"]


# --- errors ---------------------------------------------------------------------------------------


def test_a_wrong_upstream_key_is_an_upstream_auth_failure_until_the_key_is_updated(client, staff, upstream):
    name = _register(staff, upstream.base_url, api_key="sk-not-the-right-key-0000")["id"]
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=name, messages=CHAT, max_tokens=4, stream=stream)
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_auth_failed"
        assert "401" in caught.value.body["message"] and "Invalid API key" in caught.value.body["message"]
        assert "sk-not-the-right-key" not in caught.value.body["message"]
    row = _history(caught.value.response.headers["X-Request-Id"], status="failed")
    assert (row.error_code, row.status_code, row.node) == ("upstream_auth_failed", 502, f"external:{upstream.host}")
    updated = staff.patch(f"/api/v1/external-models/{name}/", json={"api_key": UPSTREAM_KEY})
    assert updated.status_code == 200 and updated.json()["api_key_last4"] == UPSTREAM_KEY[-4:]
    assert client.chat.completions.create(model=name, messages=CHAT, max_tokens=4).model == name


def test_an_unreachable_upstream_is_a_502_upstream_unavailable(client, staff):
    name = _register(staff, f"http://127.0.0.1:{devstack.free_port()}/v1")["id"]
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=name, messages=CHAT, max_tokens=4, stream=stream)
        assert caught.value.status_code == 502 and caught.value.code == "upstream_unavailable"
    row = _history(caught.value.response.headers["X-Request-Id"], status="failed")
    assert row.error_code == "upstream_unavailable"


def test_an_upstream_client_error_passes_through_with_its_message(client, external):
    too_long = [{"role": "user", "content": "sea " * (UPSTREAM_CONTEXT * 2)}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=external, messages=too_long, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    assert f"maximum context length is {UPSTREAM_CONTEXT} tokens" in caught.value.body["message"]


def test_a_wrong_upstream_path_passes_its_404_through(client, staff, upstream):
    name = _register(staff, upstream.base_url + "/v1")["id"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=name, messages=CHAT, max_tokens=4)
    assert caught.value.code == "upstream_error" and caught.value.body["message"] == "Not Found"


def test_an_inactive_external_model_is_not_found(client, staff, external):
    assert staff.patch(f"/api/v1/external-models/{external}/", json={"is_active": False}).status_code == 200
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=external, messages=CHAT, max_tokens=4)
    assert caught.value.code == "model_not_found"
    assert staff.delete(f"/api/v1/external-models/{external}/").status_code == 204
    assert not RegisteredModel.objects.filter(id=external).exists()
