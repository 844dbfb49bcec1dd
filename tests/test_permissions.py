"""Who may do what (llmplatform/permissions.py), cell by cell: one row per route, method and caller, with
the exact status, sent to a real server process on the session's database. A request that is not a 2xx
leaves the database and the models directory as they were.

A row is one line: ``(method, path, caller, status)``, or with a body after the status (a JSON value,
or ``GGUF`` / ``NOT_GGUF`` for an upload). Callers: ``anonymous``; ``keyless`` (an API key that belongs to
no user); ``alice`` and ``bob`` (users who are not staff, by API key); ``alice-session`` (alice signed
in, with her CSRF token); ``staff`` and ``staff-session``. Each row gets fresh objects, named in its path
and body: ``{node}``, ``{alices_model}`` and ``{bobs_model}`` (uploads with a file), ``{alices_job}``
(a failed job), ``{alices_spare_key}``, ``{alices_request}`` (a request-history row) and
``{external}`` (an external model). Where staff's write would do heavy work (a download, a conversion,
a quantization), its row sends a bad body: a 400 shows the request got past the permission check.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, URLResolver
from django.utils import timezone
from django.utils.crypto import get_random_string
from rest_framework.routers import APIRootView

from apps.gateway.models import ApiKey, RequestLog
from apps.gateway.services import api_key_create
from apps.jobs.models import Job, JobKind, JobStatus
from apps.models.models import ExternalEndpoint, ModelCopy, ModelSource, RegisteredModel
from apps.models.services import model_register_external
from apps.nodes.models import Node
from apps.nodes.services import node_register
from llmplatform import api_urls, devstack
from llmplatform.permissions import POLICY, PolicyPermission
from tests.fixtures.tiny_gguf import tiny_gguf

GGUF, NOT_GGUF = "upload: a valid GGUF under a fresh name", "upload: notes.txt"

ROWS = [
    # Outside the management API: liveness, /v1, the API's schema and docs, the login pages.
    ("GET", "/health", "anonymous", 200),
    ("GET", "/v1/models", "anonymous", 401),
    ("GET", "/v1/models", "keyless", 200),
    ("GET", "/v1/models", "alice", 200),
    ("GET", "/api/schema/", "anonymous", 200),
    ("GET", "/api/docs/", "anonymous", 200),
    ("GET", "/api-auth/login/", "anonymous", 200),
    ("GET", "/admin/", "anonymous", 302),
    ("GET", "/admin/", "alice-session", 302),
    ("GET", "/admin/", "staff-session", 200),
    # The management API's root and the local LLM API's health: any user.
    ("GET", "/api/v1/", "anonymous", 401),
    ("GET", "/api/v1/", "keyless", 403),
    ("GET", "/api/v1/", "alice", 200),
    ("GET", "/api/v1/health", "anonymous", 401),
    ("GET", "/api/v1/health", "keyless", 403),
    ("GET", "/api/v1/health", "alice", 200),
    # Nodes: users read, staff maintain.
    ("GET", "/api/v1/nodes/", "anonymous", 401),
    ("GET", "/api/v1/nodes/", "keyless", 403),
    ("GET", "/api/v1/nodes/", "alice", 200),
    ("GET", "/api/v1/nodes/", "alice-session", 200),
    ("GET", "/api/v1/nodes/{node}/", "alice", 200),
    ("GET", "/api/v1/nodes/{node}/metrics/", "alice", 200),
    ("POST", "/api/v1/nodes/{node}/cordon/", "anonymous", 401),
    ("POST", "/api/v1/nodes/{node}/cordon/", "keyless", 403),
    ("POST", "/api/v1/nodes/{node}/cordon/", "alice", 403),
    ("POST", "/api/v1/nodes/{node}/cordon/", "alice-session", 403),
    ("POST", "/api/v1/nodes/{node}/cordon/", "staff", 200),
    ("POST", "/api/v1/nodes/{node}/cordon/", "staff-session", 200),
    ("POST", "/api/v1/nodes/{node}/uncordon/", "alice", 403),
    ("POST", "/api/v1/nodes/{node}/uncordon/", "staff", 200),
    ("POST", "/api/v1/nodes/{node}/drain/", "alice", 403),
    ("POST", "/api/v1/nodes/{node}/drain/", "staff", 202),
    ("DELETE", "/api/v1/nodes/{node}/", "alice", 403),
    ("DELETE", "/api/v1/nodes/{node}/", "staff", 204),
    ("PUT", "/api/v1/nodes/{node}/", "alice", 405),
    # Fit analysis: users read.
    ("GET", "/api/v1/nodes/{node}/system", "keyless", 403),
    ("GET", "/api/v1/nodes/{node}/system", "alice", 200),
    ("GET", "/api/v1/nodes/{node}/models/top", "alice", 200),
    # A node's model cache: users read, staff unload and delete (a list body is a 400, past the check).
    ("GET", "/api/v1/nodes/{node}/cache", "alice", 200),
    ("POST", "/api/v1/nodes/{node}/cache/unload", "alice", 403, {}),
    ("POST", "/api/v1/nodes/{node}/cache/unload", "staff", 400, []),
    ("DELETE", "/api/v1/nodes/{node}/cache/{alices_model}", "alice", 403),
    ("DELETE", "/api/v1/nodes/{node}/cache/{alices_model}", "staff", 404),
    # The registry and the local LLM API's model list: users read.
    ("GET", "/api/v1/registry/", "anonymous", 401),
    ("GET", "/api/v1/registry/", "keyless", 403),
    ("GET", "/api/v1/registry/", "alice", 200),
    ("GET", "/api/v1/registry/{alices_model}/", "bob", 200),
    ("GET", "/api/v1/models", "anonymous", 401),
    ("GET", "/api/v1/models", "keyless", 403),
    ("GET", "/api/v1/models", "alice", 200),
    ("GET", "/api/v1/models", "alice-session", 200),
    # Uploads (LLMP_USERS_MAY_UPLOAD off) and external registrations: staff.
    ("POST", "/api/v1/models", "anonymous", 401, GGUF),
    ("POST", "/api/v1/models", "keyless", 403, GGUF),
    ("POST", "/api/v1/models", "alice", 403, GGUF),
    ("POST", "/api/v1/models", "staff", 400, NOT_GGUF),
    ("POST", "/api/v1/models", "alice", 403, {"name": "perm-ext", "endpoint": "http://127.0.0.1:9/v1"}),
    ("POST", "/api/v1/models", "staff", 400, {"endpoint": "http://127.0.0.1:9/v1"}),
    # Deleting a model: staff (LLMP_USERS_MAY_UPLOAD off: not even its owner).
    ("DELETE", "/api/v1/models/{alices_model}", "anonymous", 401),
    ("DELETE", "/api/v1/models/{alices_model}", "keyless", 403),
    ("DELETE", "/api/v1/models/{alices_model}", "alice", 403),
    ("DELETE", "/api/v1/models/{alices_model}", "alice-session", 403),
    ("DELETE", "/api/v1/models/{alices_model}", "bob", 403),
    ("DELETE", "/api/v1/models/{alices_model}", "staff", 200),
    ("DELETE", "/api/v1/models/{alices_model}", "staff-session", 200),
    ("DELETE", "/api/v1/models/perm-no-such-model", "alice", 403),
    ("DELETE", "/api/v1/models/perm-no-such-model", "staff", 404),
    # Sync and cache clear: staff (both are cheap with no worker behind the row's node).
    ("POST", "/api/v1/models/sync", "anonymous", 401),
    ("POST", "/api/v1/models/sync", "keyless", 403),
    ("POST", "/api/v1/models/sync", "alice", 403),
    ("POST", "/api/v1/models/sync", "alice-session", 403),
    ("POST", "/api/v1/models/sync", "staff", 200),
    ("POST", "/api/v1/cache/clear", "anonymous", 401),
    ("POST", "/api/v1/cache/clear", "keyless", 403),
    ("POST", "/api/v1/cache/clear", "alice", 403),
    ("POST", "/api/v1/cache/clear", "alice-session", 403),
    ("POST", "/api/v1/cache/clear", "staff", 200),
    ("GET", "/api/v1/cache/status", "keyless", 403),
    ("GET", "/api/v1/cache/status", "alice", 200),
    # Generate: any user, as /v1 (an empty body is a 400, past the check).
    ("POST", "/api/v1/generate", "anonymous", 401, {}),
    ("POST", "/api/v1/generate", "keyless", 403, {}),
    ("POST", "/api/v1/generate", "alice", 400, {}),
    # Hugging Face, conversion and quantization: staff (a bad request is a 400, past the check).
    ("GET", "/api/v1/hf/search", "alice", 403),
    ("GET", "/api/v1/hf/search", "staff", 400),
    ("GET", "/api/v1/hf/files", "alice", 403),
    ("GET", "/api/v1/hf/files", "staff", 400),
    ("POST", "/api/v1/hf/register", "anonymous", 401, {"repo_id": "acme/x", "filename": "x.gguf"}),
    ("POST", "/api/v1/hf/register", "keyless", 403, {"repo_id": "acme/x", "filename": "x.gguf"}),
    ("POST", "/api/v1/hf/register", "alice", 403, {"repo_id": "acme/x", "filename": "x.gguf"}),
    ("POST", "/api/v1/hf/register", "alice-session", 403, {"repo_id": "acme/x", "filename": "x.gguf"}),
    ("POST", "/api/v1/hf/register", "staff", 400, {"repo_id": "acme/x"}),
    ("POST", "/api/v1/hf/register", "staff-session", 400, {"repo_id": "acme/x"}),
    ("POST", "/api/v1/convert", "alice", 403, {"repo_id": "acme/x", "name": "perm-conv"}),
    ("POST", "/api/v1/convert", "staff", 400, {"repo_id": "acme/x"}),
    ("POST", "/api/v1/quantize", "alice", 403, {"model": "{alices_model}", "qtype": "Q8_0"}),
    ("POST", "/api/v1/quantize", "staff", 400, {"model": "{alices_model}", "qtype": "Q1_Z"}),
    # External models: users read, staff change.
    ("GET", "/api/v1/external-models/", "keyless", 403),
    ("GET", "/api/v1/external-models/", "alice", 200),
    ("GET", "/api/v1/external-models/{external}/", "alice", 200),
    ("POST", "/api/v1/external-models/", "alice", 403, {"name": "perm-ext", "endpoint": "http://127.0.0.1:9/v1"}),
    ("POST", "/api/v1/external-models/", "staff", 400, {"endpoint": "http://127.0.0.1:9/v1"}),
    ("PATCH", "/api/v1/external-models/{external}/", "alice", 403, {"is_active": False}),
    ("PATCH", "/api/v1/external-models/{external}/", "staff", 200, {"is_active": False}),
    ("DELETE", "/api/v1/external-models/{external}/", "alice", 403),
    ("DELETE", "/api/v1/external-models/{external}/", "staff", 204),
    # API keys: a user's own (others' are not found); a key without a user makes none.
    ("GET", "/api/v1/keys/", "anonymous", 401),
    ("GET", "/api/v1/keys/", "keyless", 403),
    ("GET", "/api/v1/keys/", "alice", 200),
    ("POST", "/api/v1/keys/", "keyless", 403, {"name": "perm"}),
    ("POST", "/api/v1/keys/", "alice", 201, {"name": "perm"}),
    ("POST", "/api/v1/keys/", "alice-session", 201, {"name": "perm"}),
    ("GET", "/api/v1/keys/{alices_spare_key}/", "bob", 404),
    ("POST", "/api/v1/keys/{alices_spare_key}/revoke/", "alice", 200),
    ("POST", "/api/v1/keys/{alices_spare_key}/revoke/", "bob", 404),
    ("POST", "/api/v1/keys/{alices_spare_key}/revoke/", "staff", 200),
    # Request history: a user's own.
    ("GET", "/api/v1/requests/", "keyless", 403),
    ("GET", "/api/v1/requests/", "alice", 200),
    ("GET", "/api/v1/requests/{alices_request}/", "alice", 200),
    ("GET", "/api/v1/requests/{alices_request}/", "bob", 404),
    ("GET", "/api/v1/requests/{alices_request}/", "staff", 200),
    # Jobs: a user reads their own; cancel and retry are staff's (retrying queues it, on a node with no worker).
    ("GET", "/api/v1/jobs/", "anonymous", 401),
    ("GET", "/api/v1/jobs/", "keyless", 403),
    ("GET", "/api/v1/jobs/", "alice", 200),
    ("GET", "/api/v1/jobs/{alices_job}/", "alice", 200),
    ("GET", "/api/v1/jobs/{alices_job}/", "bob", 404),
    ("GET", "/api/v1/jobs/{alices_job}/", "staff", 200),
    ("POST", "/api/v1/jobs/{alices_job}/cancel/", "alice", 403),
    ("POST", "/api/v1/jobs/{alices_job}/cancel/", "staff", 409),
    ("POST", "/api/v1/jobs/{alices_job}/retry/", "alice", 403),
    ("POST", "/api/v1/jobs/{alices_job}/retry/", "bob", 403),
    ("POST", "/api/v1/jobs/{alices_job}/retry/", "staff", 200),
    ("GET", "/api/v1/jobs/{alices_job}/events", "anonymous", 401),
    ("GET", "/api/v1/jobs/{alices_job}/events", "keyless", 401),
    ("GET", "/api/v1/jobs/{alices_job}/events", "alice", 200),
    ("GET", "/api/v1/jobs/{alices_job}/events", "bob", 404),
    ("GET", "/api/v1/jobs/{alices_job}/events", "staff", 200),
    # A model's file: its owner and staff (nodes pull with a blob token).
    ("GET", "/api/v1/blobs/{alices_model}", "anonymous", 401),
    ("GET", "/api/v1/blobs/{alices_model}", "keyless", 401),
    ("GET", "/api/v1/blobs/{alices_model}", "alice", 200),
    ("GET", "/api/v1/blobs/{alices_model}", "alice-session", 200),
    ("GET", "/api/v1/blobs/{alices_model}", "bob", 403),
    ("GET", "/api/v1/blobs/{alices_model}", "staff", 200),
]

# The same, on a server started with LLMP_USERS_MAY_UPLOAD=true.
UPLOAD_ROWS = [
    ("POST", "/api/v1/models", "anonymous", 401, GGUF),
    ("POST", "/api/v1/models", "keyless", 403, GGUF),
    ("POST", "/api/v1/models", "alice", 200, GGUF),
    ("POST", "/api/v1/models", "alice-session", 200, GGUF),
    ("POST", "/api/v1/models", "alice", 403, {"name": "perm-ext", "endpoint": "http://127.0.0.1:9/v1"}),
    ("DELETE", "/api/v1/models/{alices_model}", "keyless", 403),
    ("DELETE", "/api/v1/models/{alices_model}", "alice", 200),
    ("DELETE", "/api/v1/models/{alices_model}", "alice-session", 200),
    ("DELETE", "/api/v1/models/{alices_model}", "bob", 403),
    ("DELETE", "/api/v1/models/{alices_model}", "staff", 200),
    ("DELETE", "/api/v1/models/{bobs_model}", "alice", 403),
    ("POST", "/api/v1/models/sync", "alice", 403),
    ("POST", "/api/v1/cache/clear", "alice", 403),
    ("POST", "/api/v1/quantize", "alice", 403, {"model": "{alices_model}", "qtype": "Q8_0"}),
    ("GET", "/api/v1/blobs/{bobs_model}", "alice", 403),
]


# Cells whose status is wrong today for reasons outside the policy; strict, so a fix is noticed.
KNOWN_DEFECTS: dict[tuple, str] = {}


def _cells(rows: list[tuple]) -> list:
    cells = []
    for row in rows:
        defect = KNOWN_DEFECTS.get(row[:4])
        body = "" if len(row) < 5 else f" ({row[4] if isinstance(row[4], str) else json.dumps(row[4])})"
        cells.append(pytest.param(*(*row, None)[:5], id=f"{row[0]} {row[1]} as {row[2]}{body}",
                                  marks=[pytest.mark.xfail(reason=defect, strict=True)] if defect else []))
    return cells


class Servers:
    """Server processes on the session's database, started when a row first needs one."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.running = log_dir, {}

    def url(self, *, users_may_upload: bool) -> str:
        if users_may_upload not in self.running:
            port = devstack.free_port()
            env = devstack.child_env(LLMP_USERS_MAY_UPLOAD=str(users_may_upload).lower())
            server = devstack.start_server(port, env=env, log_dir=self.log_dir)
            self.running[users_may_upload] = (f"http://127.0.0.1:{port}", server)
            devstack.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200,
                                timeout=60, what="the permissions test server", processes=(server,))
        return self.running[users_may_upload][0]

    def stop(self) -> None:
        for _, server in self.running.values():
            server.stop()


@pytest.fixture(scope="module")
def servers(django_db_setup, tmp_path_factory):
    running = Servers(Path(tmp_path_factory.mktemp("permission-servers")))
    yield running
    running.stop()


def _session_headers(user) -> dict[str, str]:
    browser = Client()
    browser.force_login(user)
    csrf = get_random_string(32)  # a CSRF secret: the cookie, and the header that must match it
    return {"Cookie": f"sessionid={browser.cookies['sessionid'].value}; csrftoken={csrf}", "X-CSRFToken": csrf}


@dataclass
class Cast:
    users: dict
    headers: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def cast(django_db_setup, django_db_blocker) -> Cast:
    tag = uuid.uuid4().hex[:6]
    with django_db_blocker.unblock():
        make = get_user_model().objects.create_user
        users = {"alice": make(f"alice-{tag}"), "bob": make(f"bob-{tag}"),
                 "staff": make(f"staff-{tag}", is_staff=True)}
        headers = {name: {"Authorization": f"Bearer {api_key_create(name='perm', user=user)[1]}"}
                   for name, user in users.items()}
        headers |= {"anonymous": {}, "keyless": {"Authorization": f"Bearer {api_key_create(name='perm keyless')[1]}"},
                    "alice-session": _session_headers(users["alice"]),
                    "staff-session": _session_headers(users["staff"])}
    return Cast(users, headers)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> bytes:
    """A GGUF model that passes an upload's checks (llama.cpp loads it)."""
    return tiny_gguf(tmp_path_factory.mktemp("perm-gguf") / "tiny.gguf").read_bytes()


def _uploaded(model_id: str, owner, content: bytes) -> RegisteredModel:
    model = RegisteredModel.objects.create(id=model_id, source=ModelSource.UPLOAD, file_name=f"{model_id}.gguf",
                                           size_bytes=len(content), created_by=owner)
    (settings.MODELS_DIR / model.file_name).write_bytes(content)
    return model


@pytest.fixture
def world(cast, gguf):
    """The row's own objects, by the names its path and body use; gone after the row."""
    tag, started = uuid.uuid4().hex[:8], timezone.now()
    settings.MODELS_DIR.mkdir(parents=True, exist_ok=True)
    alice = cast.users["alice"]
    node = node_register(name=f"perm-{tag}", hostname="h", gpu_index=None, hardware={})
    job = Job.objects.create(kind=JobKind.QUANTIZE, params={"model_id": f"perm-q-{tag}"}, node=node, created_by=alice,
                             status=JobStatus.FAILED, error="a failure of the past", finished_at=timezone.now())
    names = {
        "tag": tag, "node": node.name, "alices_job": str(job.pk),
        "alices_model": _uploaded(f"perm-alice-{tag}", alice, gguf).id,
        "bobs_model": _uploaded(f"perm-bob-{tag}", cast.users["bob"], gguf).id,
        "alices_spare_key": str(api_key_create(name="perm spare", user=alice)[0].pk),
        "alices_request": str(RequestLog.objects.create(path="/v1/completions", user=alice, model="m").pk),
        "external": model_register_external(name=f"perm-ext-{tag}", base_url="http://127.0.0.1:9/v1").id,
    }
    yield names
    Node.objects.filter(name=node.name).delete()
    Job.objects.filter(pk=job.pk).delete()
    RegisteredModel.objects.filter(id__contains=tag).delete()
    for path in settings.MODELS_DIR.glob(f"*{tag}*"):
        path.unlink()
    ApiKey.objects.filter(user=alice, created_at__gte=started).delete()  # the spare key, and keys the row made
    RequestLog.objects.filter(pk=names["alices_request"]).delete()


def _state() -> dict:
    """What a management write could change: the rows of models, jobs, keys, nodes and copies, and the files."""
    return {
        "models": sorted(RegisteredModel.objects.values_list("id", "is_active", "created_by_id", "updated_at")),
        "external": sorted(ExternalEndpoint.objects.values_list("model_id", "base_url", "upstream_model",
                                                                "api_key_encrypted")),
        "jobs": sorted(Job.objects.values_list("id", "status", "cancel_requested", "attempts", "error")),
        "keys": sorted(ApiKey.objects.values_list("id", "user_id", "name", "revoked_at", "expires_at")),
        "nodes": sorted(Node.objects.values_list("id", "name", "cordoned", "cordoned_gpus")),
        "copies": sorted(ModelCopy.objects.values_list("id", "model_id", "node_id")),
        "files": sorted(str(path.relative_to(settings.MODELS_DIR)) for path in settings.MODELS_DIR.rglob("*")),
    }


def _fill(value, names: dict):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {key: _fill(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, names) for item in value]
    return value


def _send(base_url: str, headers: dict, method: str, path: str, body, names: dict, gguf: bytes) -> httpx.Response:
    options: dict = {}
    if body == GGUF:
        options["files"] = {"file": (f"perm-up-{names['tag']}.gguf", gguf, "application/octet-stream")}
    elif body == NOT_GGUF:
        options["files"] = {"file": ("notes.txt", b"GGUF" + b"\0" * 64, "application/octet-stream")}
    elif body is not None:
        options["json"] = _fill(body, names)
    return httpx.request(method, base_url + _fill(path, names), headers=headers, timeout=60, **options)


def _check(response: httpx.Response, *, status: int, path: str, before: dict) -> None:
    assert response.status_code == status, response.text[:1000]
    if path.startswith("/api/v1/") and status in (401, 403, 404, 405):
        error = response.json()["error"]
        assert isinstance(error, str) and "CSRF" not in error
    if not 200 <= status < 300:
        assert _state() == before, "a refused request changed something"


@pytest.mark.parametrize("method, path, caller, status, body", _cells(ROWS))
def test_each_caller_gets_exactly_the_status_the_policy_gives(servers, cast, world, gguf, method, path, caller,
                                                              status, body):
    base_url = servers.url(users_may_upload=False)
    before = _state()
    response = _send(base_url, cast.headers[caller], method, path, body, world, gguf)
    _check(response, status=status, path=path, before=before)


@pytest.mark.parametrize("method, path, caller, status, body", _cells(UPLOAD_ROWS))
def test_with_users_may_upload_a_user_uploads_and_deletes_only_their_own(servers, cast, world, gguf, method, path,
                                                                         caller, status, body):
    base_url = servers.url(users_may_upload=True)
    before = _state()
    response = _send(base_url, cast.headers[caller], method, path, body, world, gguf)
    _check(response, status=status, path=path, before=before)


def test_a_users_upload_is_theirs_to_delete_and_no_one_elses(servers, cast, world, gguf):
    base_url = servers.url(users_may_upload=True)
    uploaded = _send(base_url, cast.headers["alice"], "POST", "/api/v1/models", GGUF, world, gguf)
    assert uploaded.status_code == 200, uploaded.text
    model_id = uploaded.json()["model_info"]["id"]
    assert RegisteredModel.objects.get(id=model_id).created_by == cast.users["alice"]
    refused = httpx.delete(f"{base_url}/api/v1/models/{model_id}", headers=cast.headers["bob"])
    assert refused.status_code == 403 and RegisteredModel.objects.filter(id=model_id).exists()
    assert refused.json() == {"error": "Only its owner or a staff user may do this"}
    deleted = httpx.delete(f"{base_url}/api/v1/models/{model_id}", headers=cast.headers["alice"])
    assert deleted.status_code == 200
    assert not RegisteredModel.objects.filter(id=model_id).exists()
    assert not (settings.MODELS_DIR / f"{model_id}.gguf").exists()


def test_a_key_without_a_user_is_told_it_works_for_v1_only(servers, cast):
    refused = httpx.get(f"{servers.url(users_may_upload=False)}/api/v1/nodes/", headers=cast.headers["keyless"])
    assert refused.status_code == 403
    assert refused.json() == {"error": "This API key belongs to no user: it works for /v1 only, not for the "
                                       "management API"}


def _routes(patterns, prefix: str = "/api/v1/"):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern


def test_every_management_route_has_a_rule_for_every_action_it_takes():
    used, missing = set(), []
    for route, pattern in _routes(api_urls.urlpatterns):
        view_class = getattr(pattern.callback, "cls", None)
        if view_class is None:  # a plain Django view: it asks access_refusal under its route's name
            used.add(pattern.name)
            missing += [] if pattern.name in POLICY else [f"{route}: no rules named {pattern.name!r}"]
            continue
        if issubclass(view_class, APIRootView):  # the router's list of links: any user (DRF's default)
            continue
        declared = [p for p in view_class.permission_classes if issubclass(p, PolicyPermission)]
        if len(declared) != 1:
            missing.append(f"{route}: {view_class.__name__} declares no access(...)")
            continue
        used.add(declared[0].policy)
        actions = getattr(pattern.callback, "actions", None) or {
            method: method for method in view_class.http_method_names
            if method not in ("head", "options") and hasattr(view_class, method)}
        rules = POLICY[declared[0].policy]
        missing += [f"{route}: {method.upper()} ({action}) has no rule in {declared[0].policy!r}"
                    for method, action in actions.items() if action not in rules]
    assert not missing, "\n".join(missing)
    assert used == set(POLICY), f"rules no route uses: {sorted(set(POLICY) - used)}"
