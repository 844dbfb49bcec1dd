"""Metrics samples stored with heartbeats, their retention, and the downsampled history endpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from apps.nodes.models import NodeMetric
from apps.nodes.tasks import node_metrics_prune
from llmplatform import devstack
from workers import hardware
from workers.metrics import metrics_sample


def test_every_heartbeat_of_a_real_worker_stores_a_metrics_sample(platform, member):
    def samples():
        return NodeMetric.objects.filter(node__name=platform.node, ram_used_bytes__gt=0)

    before = samples().count()
    devstack.wait_until(lambda: samples().count() >= before + 2, timeout=30, what="two more metrics samples")
    sample = samples().latest("recorded_at")
    assert sample.ram_available_bytes > 0 and sample.cpu_pct is not None
    assert isinstance(sample.loaded_models, list) and isinstance(sample.gpus, list)
    history = member.get(f"/api/v1/nodes/{platform.node}/metrics/", params={"minutes": 5, "step": 60}).json()
    assert history["node"] == platform.node and history["buckets"]
    assert sum(bucket["samples"] for bucket in history["buckets"]) >= 2


def test_a_node_pinned_to_one_gpu_samples_only_that_gpu():
    every = [gpu["index"] for gpu in hardware.gpus_read()]
    assert [gpu["index"] for gpu in metrics_sample(requests_in_flight=0, gpu_index=None)["gpus"]] == every
    pinned = every[-1] if every else 0
    sample = metrics_sample(requests_in_flight=2, gpu_index=pinned)
    assert [gpu["index"] for gpu in sample["gpus"]] == ([pinned] if every else [])
    assert all(set(gpu) == {"index", *hardware.GPU_FIGURES} for gpu in sample["gpus"])
    assert sample["requests_in_flight"] == 2 and sample["ram_available_bytes"] > 0


def _at(moment: float) -> datetime:
    return datetime.fromtimestamp(moment, tz=UTC)


@pytest.fixture
def known_history(make_node):
    """Three samples in two minutes of one ten-minute span, and one sample too old to show."""
    node = make_node("metrics")
    base = (int(timezone.now().timestamp()) // 600 - 2) * 600  # a whole ten minutes, 20 to 30 minutes ago
    rows = [
        (base + 5, 10.0, 100, 900, 1, ["a"], [{"index": 0, "vram_used_bytes": 1000, "utilization_pct": 50.0,
                                               "temperature_c": 60.0, "power_w": 100.0}]),
        (base + 30, 30.0, 300, 700, 3, ["b"], [{"index": 0, "vram_used_bytes": 3000, "utilization_pct": None,
                                                "temperature_c": 70.0, "power_w": 200.0},
                                               {"index": 1, "vram_used_bytes": 10, "utilization_pct": 5.0,
                                                "temperature_c": None, "power_w": None}]),
        (base + 65, 50.0, 500, 500, 0, [], []),
        (base - 7200, 99.0, 9, 9, 9, ["old"], []),
    ]
    for moment, cpu, used, available, in_flight, models, gpus in rows:
        NodeMetric.objects.create(node=node, recorded_at=_at(moment), cpu_pct=cpu, ram_used_bytes=used,
                                  ram_available_bytes=available, requests_in_flight=in_flight, loaded_models=models,
                                  gpus=gpus)
    return node, base


def test_history_averages_each_step_wide_bucket(member, known_history):
    node, base = known_history
    reply = member.get(f"/api/v1/nodes/{node.name}/metrics/", params={"minutes": 40, "step": 60})
    assert reply.status_code == 200, reply.text
    assert reply.json()["minutes"] == 40 and reply.json()["step"] == 60
    first, second = reply.json()["buckets"]
    assert first == {
        "start": _at(base).isoformat().replace("+00:00", "Z"), "samples": 2, "cpu_pct": 20.0,
        "ram_used_bytes": 200, "ram_available_bytes": 800, "requests_in_flight": 2.0, "loaded_models": ["a", "b"],
        "gpus": [
            {"index": 0, "vram_used_bytes": 2000, "utilization_pct": 50.0, "temperature_c": 65.0, "power_w": 150.0},
            {"index": 1, "vram_used_bytes": 10, "utilization_pct": 5.0, "temperature_c": None, "power_w": None},
        ],
    }
    assert second["start"] == _at(base + 60).isoformat().replace("+00:00", "Z")
    assert (second["samples"], second["cpu_pct"], second["ram_used_bytes"], second["gpus"]) == (1, 50.0, 500, [])


def test_a_wider_step_folds_the_samples_into_one_bucket(member, known_history):
    node, base = known_history
    buckets = member.get(f"/api/v1/nodes/{node.id}/metrics/", params={"minutes": 40, "step": 600}).json()["buckets"]
    assert len(buckets) == 1
    assert (buckets[0]["samples"], buckets[0]["cpu_pct"], buckets[0]["requests_in_flight"]) == (3, 30.0, 1.333)
    assert buckets[0]["ram_available_bytes"] == 700


def test_history_leaves_out_samples_older_than_the_window(member, known_history):
    node, _ = known_history
    buckets = member.get(f"/api/v1/nodes/{node.name}/metrics/", params={"minutes": 5}).json()["buckets"]
    assert buckets == []


@pytest.mark.parametrize(("params", "field"), [
    ({"minutes": "abc"}, "minutes"),
    ({"minutes": 0}, "minutes"),
    ({"minutes": 10 ** 6}, "minutes"),
    ({"step": "1.5"}, "step"),
    ({"step": 0}, "step"),
    ({"minutes": 1, "step": 61}, "step"),
    ({"minutes": 60 * 24, "step": 1}, "step"),
])
def test_history_refuses_a_bad_parameter_with_a_400_naming_it(member, known_history, params, field):
    node, _ = known_history
    reply = member.get(f"/api/v1/nodes/{node.name}/metrics/", params=params)
    assert reply.status_code == 400
    assert reply.json()["error"].startswith(f"{field}: "), reply.json()
    assert field in reply.json()["detail"]


def test_history_of_an_unknown_node_is_a_404(member):
    reply = member.get("/api/v1/nodes/no-such-node/metrics/")
    assert reply.status_code == 404 and "no-such-node" in reply.json()["error"]


def test_the_prune_task_deletes_samples_older_than_the_retention(make_node):
    node = make_node("prune")
    now = timezone.now()
    old = NodeMetric.objects.create(node=node, recorded_at=now - timedelta(
        hours=settings.LLMP_NODE_METRICS_RETENTION_HOURS, minutes=1))
    kept = NodeMetric.objects.create(node=node, recorded_at=now - timedelta(minutes=1))
    assert node_metrics_prune() >= 1
    assert list(NodeMetric.objects.filter(pk__in=[old.pk, kept.pk])) == [kept]
