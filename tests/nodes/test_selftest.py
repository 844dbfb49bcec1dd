"""A node proves it can infer before it takes traffic: real workers, a real SIGSEGV in their test decode."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from apps.gateway.models import RequestLog
from apps.nodes.services import node_heartbeat_record
from llmplatform import devstack
from tests.environment import RUN
from workers.selftest import CRASH_ENV

SICK = f"sick-{RUN}"


@pytest.fixture(scope="module")
def sick(tmp_path_factory):
    """A gateway with its own database and Redis prefix, and one worker whose test decode segfaults."""
    root = Path(tmp_path_factory.mktemp("sick"))
    env = devstack.child_env(DATABASE_URL=f"sqlite:///{root / 'sick.sqlite3'}", LLMP_DATA_DIR=str(root),
                             LLMP_REDIS_PREFIX=f"llmptest-{RUN}-sick", **{CRASH_ENV: "SIGSEGV"})
    devstack.database_prepare(env=env, key_name="sick")
    # The management API needs a key that belongs to a user.
    key = subprocess.run([sys.executable, "-c", "import django; django.setup(); "
                          "from django.contrib.auth import get_user_model; "
                          "from apps.gateway.services import api_key_create; "
                          "print(api_key_create(name='ops', user=get_user_model().objects.create_user('ops'))[1])"],
                         cwd=devstack.ROOT, env=dict(env, DJANGO_SETTINGS_MODULE="llmplatform.settings"), check=True,
                         capture_output=True, text=True).stdout.split()[-1]
    port = devstack.free_port()
    server = devstack.start_server(port, env=env, log_dir=root)
    worker = devstack.start_worker(SICK, env=env, log_dir=root, extra=["--no-default-queue"])
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    try:
        devstack.wait_until(lambda: api.get(f"/api/v1/nodes/{SICK}/").json().get("status") == "unhealthy",
                            timeout=90, what=f"{SICK} registered as unhealthy", processes=(worker, server))
        yield api, worker
    finally:
        api.close()
        worker.stop()
        server.stop()


def test_a_worker_whose_test_decode_segfaults_registers_as_unhealthy_with_the_error(sick):
    api, worker = sick
    node = api.get(f"/api/v1/nodes/{SICK}/").json()
    assert (node["status"], node["placeable"]) == ("unhealthy", False)
    assert "crashed with SIGSEGV while decoding" in node["health_error"]
    detail = node["health_detail"]
    assert (detail["tested"], detail["ok"], detail["signal"], detail["stage"]) == (True, False, "SIGSEGV", "loaded")
    assert detail["model"].endswith(".gguf") and detail["elapsed_s"] > 0 and detail["system_info"]
    assert any("Fatal Python error" in line for line in detail["stderr_tail"])
    assert node["health_checked_at"]
    listed = api.get("/api/v1/nodes/", params={"status": "unhealthy"}).json()["results"]
    assert [row["name"] for row in listed] == [SICK]
    assert worker.popen.poll() is None, "the crash took the worker down"
    log = worker.log()
    assert "self-test FAILED: the test decode of" in log and "registers as unhealthy" in log


def test_an_unhealthy_node_keeps_heartbeating(sick):
    api, _ = sick
    first = api.get(f"/api/v1/nodes/{SICK}/").json()["last_heartbeat"]
    devstack.wait_until(lambda: api.get(f"/api/v1/nodes/{SICK}/").json()["last_heartbeat"] != first, timeout=15,
                        what=f"a heartbeat of {SICK}")
    assert api.get(f"/api/v1/nodes/{SICK}/").json()["status"] == "unhealthy"


def test_a_request_is_not_placed_on_an_unhealthy_node_and_the_503_names_it(sick, model_id):
    api, _ = sick
    reply = api.post("/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 2})
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "no_worker_available"
    assert f"node {SICK} is unhealthy" in error["message"]


def test_readiness_counts_only_healthy_nodes_and_lists_the_unhealthy_one(sick):
    api, _ = sick
    ready = api.get("/health/ready")
    assert ready.status_code == 503
    workers = ready.json()["checks"]["workers"]
    assert workers["live_nodes"] == [] and SICK in workers["error"]
    assert "crashed with SIGSEGV" in workers["unhealthy_nodes"][SICK]


def test_an_unhealthy_node_whose_worker_stops_is_offline(sick):
    api, worker = sick
    worker.stop()
    devstack.wait_until(lambda: api.get(f"/api/v1/nodes/{SICK}/").json()["status"] == "offline", timeout=15,
                        what=f"{SICK} offline")


def test_a_healthy_worker_passed_its_test_decode_and_is_online(member, platform):
    node = member.get(f"/api/v1/nodes/{platform.node}/").json()
    assert (node["status"], node["health_error"]) == ("online", "")
    detail = node["health_detail"]
    assert (detail["tested"], detail["ok"], detail["stage"]) == (True, True, "done")
    assert detail["completion_tokens"] >= 1 and 0 < detail["elapsed_s"] < 30
    assert f"self-test passed in {detail['elapsed_s']:.2f} s" in platform.worker.log()


def _served_by(http, model_id: str) -> str:
    reply = http.post("/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert reply.status_code == 200, reply.text
    request_id = uuid.UUID(reply.headers["X-Request-Id"])
    devstack.wait_until(lambda: RequestLog.objects.filter(pk=request_id).exists(), timeout=10, what="history row")
    return RequestLog.objects.get(pk=request_id).node


def test_an_unhealthy_node_is_passed_over_though_it_reports_the_model_loaded(http, make_node, model_id, platform):
    # Sorts before the session's node, so among two idle nodes with the model loaded it would win.
    sick = make_node("aaa-sick", health_error="the test decode of m.gguf crashed with SIGSEGV")
    node_heartbeat_record(name=sick.name, loaded_models=[model_id])
    # The first request loads the model on the session's node (if it was not yet), the others find it there.
    assert [_served_by(http, model_id) for _ in range(3)] == [platform.node] * 3
