"""Two real worker nodes behind one gateway: cordon, drain, placement, and missed heartbeats."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from apps.fit.models import FitMeasurement
from apps.fit.selectors import fit_level
from apps.gateway.dispatch import _inflight_key
from apps.gateway.models import RequestLog
from apps.models.models import RegisteredModel
from apps.nodes.models import Node
from llmplatform import devstack
from tests.environment import RUN


@pytest.fixture(scope="module")
def second(platform, tmp_path_factory) -> devstack.Process:
    """A second worker node next to the session's; it stops (and goes offline) after this module."""
    worker = devstack.start_worker(f"second-{RUN}", env=devstack.child_env(),
                                   log_dir=Path(tmp_path_factory.mktemp("second")), extra=["--no-default-queue"])
    try:
        devstack.wait_ready(platform.base_url, nodes={platform.node, f"second-{RUN}"}, timeout=120,
                            processes=(worker, platform.worker, platform.server))
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def nodes(platform, second):
    """The two node names; both are uncordoned again after each test."""
    names = (platform.node, f"second-{RUN}")
    yield names
    Node.objects.filter(name__in=names).update(cordoned=False, cordoned_gpus=[])


def _served_by(http, model_id: str) -> str:
    reply = http.post("/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert reply.status_code == 200, reply.text
    request_id = uuid.UUID(reply.headers["X-Request-Id"])
    devstack.wait_until(lambda: RequestLog.objects.filter(pk=request_id).exists(), timeout=10, what="history row")
    return RequestLog.objects.get(pk=request_id).node


def _loaded(name: str) -> list[str]:
    return Node.objects.get(name=name).loaded_models


def test_a_cordoned_node_gets_no_new_requests(http, staff, nodes, model_id):
    first, second = nodes
    assert staff.post(f"/api/v1/nodes/{first}/cordon/").status_code == 200
    assert {_served_by(http, model_id) for _ in range(3)} == {second}
    assert staff.post(f"/api/v1/nodes/{first}/uncordon/").status_code == 200


def test_drain_unloads_the_loaded_model_as_the_heartbeat_then_reports(http, staff, nodes, model_id):
    first, second = nodes
    staff.post(f"/api/v1/nodes/{first}/cordon/")
    assert _served_by(http, model_id) == second
    devstack.wait_until(lambda: model_id in _loaded(second), timeout=15, what=f"{model_id} loaded on {second}")
    drained = staff.post(f"/api/v1/nodes/{second}/drain/")
    assert drained.status_code == 202 and drained.json()["cordoned"] is True
    devstack.wait_until(lambda: _loaded(second) == [], timeout=30, what=f"{second} drained")


def test_the_node_holding_the_model_is_chosen_though_busier_and_the_reason_is_logged(
        http, staff, nodes, model_id, platform):
    first, second = nodes
    staff.post(f"/api/v1/nodes/{first}/drain/")
    devstack.wait_until(lambda: _loaded(first) == [], timeout=30, what=f"{first} drained")
    assert _served_by(http, model_id) == second
    devstack.wait_until(lambda: model_id in _loaded(second), timeout=15, what=f"{model_id} loaded on {second}")
    staff.post(f"/api/v1/nodes/{first}/uncordon/")
    client = redis.Redis.from_url(settings.REDIS_URL)
    pretend = {f"pretend-{uuid.uuid4().hex}": time.time() for _ in range(2)}
    client.zadd(_inflight_key(second), pretend)
    try:
        assert _served_by(http, model_id) == second
    finally:
        client.zrem(_inflight_key(second), *pretend)
    placed = f"placement: {model_id} on {second}: model loaded, the only online node holding it"
    devstack.wait_until(lambda: placed in platform.server.log(), timeout=5, what="the placement log line")


def test_a_stopped_worker_turns_degraded_then_offline_and_back_online(member, nodes, second, settings):
    _, name = nodes
    second.popen.send_signal(signal.SIGSTOP)
    try:
        devstack.wait_until(lambda: member.get(f"/api/v1/nodes/{name}/").json()["status"] == "degraded", timeout=15,
                            what=f"{name} degraded")
        settings.LLMP_NODE_OFFLINE_SECONDS = settings.LLMP_NODE_DEGRADED_SECONDS + 2
        devstack.wait_until(lambda: Node.objects.get(name=name).status == "offline", timeout=15,
                            what=f"{name} offline")
    finally:
        second.popen.send_signal(signal.SIGCONT)
    devstack.wait_until(lambda: Node.objects.get(name=name).status == "online", timeout=15, what=f"{name} online")


def test_a_model_no_node_holds_goes_where_it_fits_not_where_it_is_too_tight(http, staff, nodes, model_id, platform):
    first, second = nodes
    for name in nodes:
        staff.post(f"/api/v1/nodes/{name}/drain/")
    devstack.wait_until(lambda: _loaded(first) == _loaded(second) == [], timeout=30, what="both nodes drained")
    for name in nodes:
        staff.post(f"/api/v1/nodes/{name}/uncordon/")
    # As if the first node's worker had measured the model needing a petabyte there.
    model, tight = RegisteredModel.objects.get(id=model_id), Node.objects.get(name=first)
    kept = list(FitMeasurement.objects.filter(node=tight, model_id=model_id).values())
    FitMeasurement.objects.update_or_create(node=tight, model_id=model_id,
                                            defaults={"memory_bytes": 2 ** 50, "measured_at": timezone.now()})
    try:
        assert fit_level(node=tight, model=model) == "too_tight"
        level = fit_level(node=Node.objects.get(name=second), model=model)
        assert level in ("perfect", "good", "marginal")
        assert _served_by(http, model_id) == second
        devstack.wait_until(lambda: f"placement: {model_id} on {second}: fit {level}" in platform.server.log(),
                            timeout=5, what="the placement log line")
        assert f"{first} too_tight" in platform.server.log()
    finally:
        FitMeasurement.objects.filter(node=tight, model_id=model_id).delete()
        FitMeasurement.objects.bulk_create([FitMeasurement(**row) for row in kept])


def test_the_fleet_matrix_shows_both_workers_as_nodes_with_their_real_hardware(http, nodes, model_id):
    matrix = http.get("/api/v1/fit/matrix", params={"nodes": ",".join(nodes), "search": "smollm2-135m"}).json()
    assert {node["name"] for node in matrix["nodes"]} == set(nodes)
    row = next(r for r in matrix["models"] if r["name"] == model_id)
    assert set(row["nodes"]) == set(nodes)
    for cell in row["nodes"].values():
        assert cell["fit_level"] in ("perfect", "good", "marginal") and cell["estimated_tps"] > 0
    for name in nodes:
        system = http.get(f"/api/v1/nodes/{name}/system").json()["system"]
        assert system["cpu_cores"] >= 1 and system["total_ram_gb"] > 1
