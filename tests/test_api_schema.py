"""The management API keeps to its own OpenAPI schema: schemathesis sends every operation of
``/api/schema/`` generated requests, valid and invalid, over real HTTP as a staff user, and every
answer must be no 5xx and conform to the schema (a documented status code, content type and body).

* **Bounded and repeatable.** Each operation gets its examples, schemathesis's coverage cases (boundary
  and invalid values) and ``MAX_EXAMPLES`` fuzzed cases, derandomized from ``SEED``: under a minute
  on 2 cores. ``LLMP_SCHEMA_TEST_EXAMPLES=300`` fuzzes deeper, for a local hunt.
* **The SQLite pass only**: the views are the same on PostgreSQL, and once is enough time.
* **Nothing live is harmed.** Requests that change or delete an object are pointed at this test's own
  objects (``Throwaway``): a key, a job, an external model, and a node that is registered but has no
  worker (offline), so its maintenance and the jobs queued on it never run anywhere. Reads of a path
  object keep the coverage phase's ids (unknown ones, boundary values) and read real objects when
  fuzzing. What a request deleted is made again before the next one.
* The schema is made in this process to collect a test per operation;
  ``test_the_server_serves_the_schema_under_test`` checks that the server serves the same.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import schemathesis
from django.conf import settings
from django.utils import timezone
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llmplatform import devstack
from tests.environment import RUN
from tests.fakehub import FakeFile, FakeHub, FakeRepo

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"),
                       reason="the schema test runs on the SQLite pass only"),
]

MAX_EXAMPLES = int(os.environ.get("LLMP_SCHEMA_TEST_EXAMPLES", "25"))
SEED = 20261202
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# Operations left out, each with why.
EXCLUDED = {
    "v1_cache_clear_create": "unloads every model from every live node, the session's worker's included",
}

HUB_REPO = "acme/schema-gguf"


def _generated_schema() -> dict:
    """The schema as drf-spectacular makes it for /api/schema/."""
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    return json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


GENERATED = _generated_schema()
schema = schemathesis.openapi.from_dict(GENERATED, config=schemathesis.Config.from_dict({
    "seed": SEED,
    "suppress-health-check": ["all"],  # a loaded CI machine must not fail the run for slow generation
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none",
                   "with-security-parameters": False},
})).exclude(operation_id=list(EXCLUDED))


@pytest.fixture(scope="module")
def hub():
    repo = FakeRepo(HUB_REPO, [FakeFile("README.md", data=b"# schema\n"),
                               FakeFile("tiny.Q8_0.gguf", data=b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, lfs=True)])
    with FakeHub([repo]) as running:
        yield running


@pytest.fixture(scope="module")
def schema_server(platform, hub, tmp_path_factory) -> tuple[str, devstack.Process]:
    """An ASGI server like the session's, whose HF_ENDPOINT is the fake hub (the session's server has none)."""
    base_url, server = devstack.server_start_live(env=devstack.child_env(HF_ENDPOINT=hub.endpoint),
                                                  log_dir=Path(tmp_path_factory.mktemp("schema-server-logs")),
                                                  what="the schema test's server")
    yield base_url, server
    server.stop()


@dataclass
class Throwaway:
    """What the generated requests may change or delete: this test's own node, key, job and external model."""

    raw_key: str
    node: str
    key_id: int
    job_id: str
    external: str
    request_id: str
    live_node: str

    def restore(self) -> None:
        """Make again what an earlier request deleted."""
        from apps.models.models import RegisteredModel
        from apps.models.services import model_register_external
        from apps.nodes.models import Node, node_queue_name

        long_ago = timezone.now() - timedelta(days=1)  # offline: never placed, never live
        Node.objects.get_or_create(name=self.node, defaults={
            "hostname": "nowhere.invalid", "queue": node_queue_name(self.node), "started_at": long_ago,
            "last_heartbeat": long_ago})
        if not RegisteredModel.objects.filter(id=self.external).exists():
            model_register_external(name=self.external, base_url="http://127.0.0.1:9/v1")

    def pin(self, case) -> None:
        """Point what the case changes at these objects; jobs it starts go to the node without a worker."""
        path = case.operation.path
        if path in ("/api/v1/hf/register", "/api/v1/convert", "/api/v1/quantize") and isinstance(case.body, dict):
            case.body["node"] = self.node
        if case.method == "GET" and case.meta is not None and case.meta.phase.name != "fuzzing":
            return
        params = case.path_parameters if case.path_parameters is not None else {}
        if path.startswith("/api/v1/nodes/{id}/"):
            params["id"] = self.node
        elif path.startswith("/api/v1/nodes/{node}/cache/"):  # unload, delete a copy
            params["node"] = self.node
        elif path.startswith("/api/v1/nodes/{node}/"):  # reads: the node's cache, its fit
            params["node"] = self.live_node
        elif path.startswith("/api/v1/keys/{id}/"):
            params["id"] = self.key_id
        elif path.startswith("/api/v1/jobs/{id}/"):
            params["id"] = self.job_id
        elif path.startswith("/api/v1/external-models/{id}/"):
            params["id"] = self.external
        elif path.startswith("/api/v1/registry/{id}/"):
            params["id"] = settings.LLMP_DEFAULT_MODEL_ID
        elif path == "/api/v1/models/{name}":
            params["name"] = self.external
        elif path.startswith("/api/v1/requests/{id}/"):
            params["id"] = self.request_id


@pytest.fixture(scope="module")
def throwaway(platform, django_db_blocker) -> Throwaway:
    from django.contrib.auth import get_user_model

    from apps.gateway.services import api_key_create
    from apps.jobs.models import Job, JobKind
    from apps.jobs.services import job_create
    from apps.models.models import RegisteredModel
    from apps.nodes.models import Node, node_queue_name
    from llmplatform.celery import app as celery_app

    with django_db_blocker.unblock():
        user = get_user_model().objects.create_user(f"schema-{RUN}", password=uuid.uuid4().hex, is_staff=True)
        _, raw_key = api_key_create(name="schema test", user=user)
        key, _ = api_key_create(name="schema test: the one its requests revoke", user=user)
        made = Throwaway(raw_key=raw_key, node=f"schema-throwaway-{RUN}", key_id=key.pk, job_id="",
                         external=f"schema-external-{RUN}", request_id="", live_node=platform.node)
        made.restore()
        made.job_id = str(job_create(kind=JobKind.DOWNLOAD, node=Node.objects.get(name=made.node), created_by=user,
                                     params={"repo_id": HUB_REPO, "filename": "tiny.Q8_0.gguf", "revision": "",
                                             "model_id": f"schema-job-{RUN}"}).pk)
    made.request_id = httpx.get(f"{platform.base_url}/v1/models",
                                headers={"Authorization": f"Bearer {raw_key}"}).headers["X-Request-Id"]
    yield made
    with django_db_blocker.unblock():
        Job.objects.filter(created_by=user).delete()  # queued on the throwaway node, holding the names they make
        RegisteredModel.objects.filter(created_by=user).delete()
        RegisteredModel.objects.filter(id=made.external).delete()
        Node.objects.filter(name=made.node).delete()
    with celery_app.connection_for_write() as connection:  # the tasks sent to the throwaway node
        connection.default_channel.queue_delete(node_queue_name(made.node))


def test_the_server_serves_the_schema_under_test(schema_server):
    base_url, _ = schema_server
    served = httpx.get(f"{base_url}/api/schema/", params={"format": "json"})
    assert served.status_code == 200
    assert served.json() == GENERATED


@schema.parametrize()
def test_the_management_api_keeps_to_its_schema(case, schema_server, throwaway):
    base_url, server = schema_server
    throwaway.restore()
    throwaway.pin(case)
    logged = server.log_path.stat().st_size
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {throwaway.raw_key}"})
    if response.status_code >= 500:  # the server's traceback, for the report
        with open(server.log_path, "rb") as log:
            log.seek(logged)
            print(log.read()[-6000:].decode(errors="replace"))
    case.validate_response(response, checks=CHECKS)
