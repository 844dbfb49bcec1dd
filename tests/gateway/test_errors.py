"""Every /v1 error comes in OpenAI's shape, with the right status and code (and the management API's
own shape when Redis is down)."""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import openai
import pytest

from apps.gateway.models import RequestLog
from apps.jobs.services import UNSENT_ERROR
from llmplatform import devstack


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_a_wrong_key_is_refused_with_invalid_api_key(platform, model_id):
    client = openai.OpenAI(base_url=f"{platform.base_url}/v1", api_key="llmp-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_a_missing_key_is_refused_everywhere_under_v1(platform):
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/x"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("POST", "/v1/embeddings")]:
        response = httpx.request(method, platform.base_url + path, json={})
        assert response.status_code == 401, path
        assert _error(response)["code"] == "invalid_api_key"
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_missing_model_is_a_400(client, http):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "missing_model"
    response = http.post("/v1/embeddings", json={"input": "x"})
    assert response.status_code == 400
    assert _error(response) | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                  "param": "model", "code": "missing_model"}


def test_a_body_that_is_not_json_is_a_400(http):
    response = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_json"
    response = http.post("/v1/completions", json=["a", "list"])
    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_json"


@pytest.mark.parametrize("field, value, param", [
    ("temperature", 3, "temperature"),
    ("temperature", "hot", "temperature"),
    ("top_p", 1.5, "top_p"),
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", True, "max_tokens"),
    ("stop", ["a", "b", "c", "d", "e"], "stop"),
    ("messages", [], "messages"),
    ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": {"name": "user"}, "content": "x"}], "messages[0].role"),
    ("messages", [{"role": ["user"], "content": "x"}], "messages[0].role"),
    ("stream", "yes", "stream"),
    ("stream_options", {"include_usage": True}, "stream_options"),
    ("n", 2, "n"),
])
def test_a_bad_parameter_is_named_in_a_400(http, model_id, field, value, param):
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], field: value}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert _error(response)["param"] == param


def test_a_body_nested_thousands_of_levels_deep_is_a_400(http, model_id):
    for nested in ("[" * 5000 + "]" * 5000, '{"a": ' * 5000 + "1" + "}" * 5000, "[" * 200 + "]" * 200):
        body = f'{{"model": "{model_id}", "messages": [{{"role": "user", "content": "hi"}}], "metadata": {nested}}}'
        response = http.post("/v1/chat/completions", content=body.encode(),
                             headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert _error(response)["code"] == "invalid_json"
        assert "nested" in _error(response)["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/chat/completions", '{"model": "MODEL", "messages": [{"role": "user", "content": "a\\udc00b"}]}',
     "messages[0].content"),
    ("/v1/chat/completions",
     '{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/embeddings", '{"model": "MODEL", "input": ["fine", "\\udfff"]}', "input[1]"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "hi", "user": "\\ud800"}', "user"),
])
def test_a_lone_surrogate_is_a_400_that_names_the_field_and_stays_on_record(http, model_id, path, body, param):
    response = http.post(path, content=body.replace("MODEL", model_id).encode(),
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert _error(response)["param"] == param and _error(response)["code"] == "invalid_value"
    row = RequestLog.objects.filter(pk=uuid.UUID(response.headers["X-Request-Id"]))
    devstack.wait_until(row.exists, timeout=10, what="the refused request's history row")
    assert (row.get().status_code, row.get().error_code) == (400, "invalid_value")


def test_a_prompt_longer_than_the_context_is_a_400(http, model_id):
    response = http.post("/v1/completions", json={"model": model_id, "prompt": "word " * 5000, "max_tokens": 4})
    assert response.status_code == 400
    assert _error(response)["code"] == "context_length_exceeded"


def test_the_wrong_method_is_a_405(http):
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405
    assert _error(response)["code"] == "method_not_allowed"


def _lone_gateway(root, setup: str = "", **env_overrides) -> tuple[str, str, devstack.Process]:
    """A gateway with its own fresh database, a key and the bundled model, and no worker process."""
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{root / 'bare.sqlite3'}", LLMP_DATA_DIR=str(root),
                             **env_overrides)
    key = devstack.database_prepare(env=env, key_name="bare")
    subprocess.run([sys.executable, "-c", "import django; django.setup(); "
                    "from apps.models.services import model_register_bundled as r; r(); " + setup],
                   cwd=devstack.ROOT, env=dict(env, DJANGO_SETTINGS_MODULE="llmplatform.settings"), check=True)
    port = devstack.free_port()
    server = devstack.start_server(port, env=env, log_dir=root)
    base_url = f"http://127.0.0.1:{port}"
    devstack.wait_until(lambda: httpx.get(f"{base_url}/health").status_code == 200, timeout=30,
                        what="bare gateway", processes=(server,))
    return base_url, key, server


@pytest.fixture(scope="module")
def bare_platform(tmp_path_factory):
    base_url, key, server = _lone_gateway(tmp_path_factory.mktemp("bare"))
    yield base_url, key
    server.stop()


@pytest.fixture(scope="module")
def redis_down(tmp_path_factory):
    """A gateway whose Redis does not answer, with a node that stays live, a staff user's key and a model."""
    setup = ("from apps.nodes.services import node_register as n; "
             "n(name='ghost', hostname='h', gpu_index=None, hardware={}); "
             "from django.contrib.auth.models import User; from apps.gateway.models import ApiKey; "
             "ApiKey.objects.filter(name='bare').update(user=User.objects.create_user('owner', is_staff=True)); "
             "from apps.models.models import RegisteredModel as M; "
             "M.objects.create(id='doomed', source='upload', file_name='doomed.gguf'); "
             "M.objects.create(id='unquantized', source='upload', file_name='unquantized.gguf')")
    base_url, key, server = _lone_gateway(tmp_path_factory.mktemp("redis-down"), setup,
                                          REDIS_URL=f"redis://127.0.0.1:{devstack.free_port()}/0",
                                          LLMP_NODE_OFFLINE_SECONDS="3600")
    yield base_url, key
    server.stop()


def test_a_gateway_whose_redis_is_down_answers_503_broker_unavailable(redis_down, model_id):
    base_url, key = redis_down
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=model_id, prompt="hi")
    assert caught.value.status_code == 503 and caught.value.code == "broker_unavailable"
    ready = httpx.get(f"{base_url}/health/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["redis"]["ok"] is False


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/v1/generate", {"question": "hi", "max_tokens": 2}),
    ("POST", "/api/v1/cache/clear", None),
    ("DELETE", "/api/v1/models/doomed", None),
])
def test_the_management_api_answers_503_when_redis_is_down(redis_down, model_id, method, path, body):
    base_url, key = redis_down
    response = httpx.request(method, base_url + path, json=body and {**body, "model_name": model_id},
                             headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 503, response.text
    assert "Redis" in response.json()["error"]


def test_a_job_that_cannot_be_queued_while_redis_is_down_is_failed_saying_why(redis_down):
    base_url, key = redis_down
    api = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    started = api.post("/api/v1/quantize", json={"model": "unquantized", "qtype": "Q8_0", "node": "ghost"})
    assert started.status_code == 503 and started.json()["code"] == "broker_unavailable", started.text
    jobs = api.get("/api/v1/jobs/", params={"kind": "quantize"}).json()["results"]
    assert [(job["status"], job["error"]) for job in jobs] == [("failed", UNSENT_ERROR)]
    retried = api.post(f"/api/v1/jobs/{jobs[0]['id']}/retry/")
    assert retried.status_code == 503 and retried.json()["code"] == "broker_unavailable", retried.text
    job = api.get(f"/api/v1/jobs/{jobs[0]['id']}/").json()
    assert (job["status"], job["error"], job["finished_at"] is not None) == ("failed", UNSENT_ERROR, True)


def test_no_live_worker_is_a_clear_503(bare_platform, model_id):
    base_url, key = bare_platform
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert caught.value.code == "no_worker_available"
    assert "worker" in caught.value.message


def test_readiness_fails_without_a_worker_and_liveness_does_not(bare_platform):
    base_url, _ = bare_platform
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{base_url}/health/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["workers"]["ok"] is False
    assert ready.json()["checks"]["database"]["ok"] is True
    assert ready.json()["checks"]["redis"]["ok"] is True


def test_readiness_passes_with_a_live_worker(platform):
    ready = httpx.get(f"{platform.base_url}/health/ready")
    assert ready.status_code == 200
    assert platform.node in ready.json()["checks"]["workers"]["live_nodes"]


def test_an_unknown_v1_path_is_an_openai_404(http):
    response = http.post("/v1/chat/complete", json={})
    assert response.status_code == 404
    assert _error(response)["code"] == "unknown_url"


def test_an_oversized_body_is_a_413(http, model_id):
    from django.conf import settings

    content = "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10)
    response = http.post("/v1/completions", json={"model": model_id, "prompt": content})
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"


def test_a_model_whose_file_the_node_lacks_is_a_503_model_unavailable(client):
    from apps.models.models import RegisteredModel

    model = RegisteredModel.objects.create(id=f"missing-{uuid.uuid4().hex[:8]}", source="upload",
                                           file_name="not-here.gguf")
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert caught.value.code == "model_unavailable"
    assert "not-here.gguf" in caught.value.message
