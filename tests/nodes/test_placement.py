"""Placement of a request among live nodes: cordons, degraded nodes, fit, files already there, load."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from apps.fit.models import FitMeasurement
from apps.fit.selectors import fit_level, fit_levels
from apps.gateway.dispatch import Placement, _inflight_key, node_choose
from apps.gateway.errors import OpenAIError
from apps.models.models import ModelCopy, RegisteredModel
from apps.nodes.models import Node
from apps.nodes.services import node_cordon, node_heartbeat_record

GIB = 1024 ** 3
# The model below needs its 0.5 GiB file plus 0.5 GiB of runtime overhead (no KV cache: its
# header has no layer counts), 1 GiB in all. Hardware on which that fits at each level:
FITTING_HARDWARE = {
    "perfect": {"ram_total_bytes": 4 * GIB, "gpus": [{"index": 0, "name": "GPU", "vram_total_bytes": 2 * GIB}]},
    "good": {"ram_total_bytes": 2 * GIB},  # 50 % of RAM
    "marginal": {"ram_total_bytes": GIB * 5 // 4},  # 80 % of RAM
    "too_tight": {"ram_total_bytes": GIB},  # all of RAM
    None: {},  # no hardware reported: fit unknown
}


@pytest.fixture
def model() -> RegisteredModel:
    model = RegisteredModel.objects.create(id=f"place-{uuid.uuid4().hex[:8]}", source="upload", file_name="x.gguf",
                                           size_bytes=GIB // 2, file_type="Q4_K_M")
    yield model
    model.delete()


def _fit(node: Node, model: RegisteredModel, level: str | None) -> None:
    """Give the node hardware, as its worker would report it, on which ``model`` fits at ``level``."""
    Node.objects.filter(pk=node.pk).update(hardware=FITTING_HARDWARE[level])
    assert fit_level(node=Node.objects.get(pk=node.pk), model=model) == level


def _busy(node: Node, count: int) -> None:
    redis.Redis.from_url(settings.REDIS_URL).zadd(_inflight_key(node.name),
                                                   {uuid.uuid4().hex: time.time() for _ in range(count)})


def _choose(model: RegisteredModel, *nodes: Node) -> Placement:
    fresh = list(Node.objects.filter(pk__in=[node.pk for node in nodes]))  # as node_list_live reads them
    return asyncio.run(node_choose(model, fresh))


def test_a_cordoned_node_gets_no_request_even_with_the_model_loaded(model, make_node):
    warm, cold = make_node("warm"), make_node("cold")
    node_heartbeat_record(name=warm.name, loaded_models=[model.id])
    node_cordon(node=warm)
    chosen = _choose(model, warm, cold)
    assert chosen.node.name == cold.name
    assert f"{warm.name} cordoned" in chosen.reason


def test_a_node_computing_on_a_cordoned_gpu_gets_no_request(model, make_node):
    spans = make_node("spans", hardware={"gpus": [{"index": 0}, {"index": 1}]})
    other = make_node("other")
    node_heartbeat_record(name=spans.name, loaded_models=[model.id])
    node_cordon(node=spans, gpus=[1])
    assert _choose(model, spans, other).node.name == other.name


def test_when_every_live_node_is_cordoned_the_request_gets_no_worker(model, make_node):
    only = make_node("only")
    node_cordon(node=only)
    with pytest.raises(OpenAIError) as caught:
        _choose(model, only)
    assert (caught.value.status, caught.value.code) == (503, "no_worker_available")


def test_a_node_the_model_is_too_tight_on_is_skipped_even_when_idle(model, make_node):
    tight, roomy = make_node("tight"), make_node("roomy")
    _fit(tight, model, "too_tight")
    _fit(roomy, model, "marginal")
    _busy(roomy, 2)
    chosen = _choose(model, tight, roomy)
    assert chosen.node.name == roomy.name
    assert chosen.reason.startswith("fit marginal, file not on node, 2 in flight")
    assert f"{tight.name} too_tight" in chosen.reason


def test_when_the_model_is_too_tight_everywhere_the_least_busy_node_still_tries(model, make_node):
    first, second = make_node("tight1"), make_node("tight2")
    _fit(first, model, "too_tight")
    _fit(second, model, "too_tight")
    _busy(first, 1)
    chosen = _choose(model, first, second)
    assert chosen.node.name == second.name and "every node too_tight" in chosen.reason


def test_a_node_that_already_holds_the_file_is_preferred_over_a_less_busy_one(model, make_node):
    bare, holder = make_node("bare"), make_node("holder")
    _fit(bare, model, "perfect")
    _fit(holder, model, "good")
    ModelCopy.objects.create(model=model, node=holder)
    _busy(holder, 1)
    chosen = _choose(model, bare, holder)
    assert chosen.node.name == holder.name and chosen.reason.startswith("fit good, file on node, 1 in flight")


def test_a_known_fit_is_preferred_over_an_unknown_one(model, make_node):
    unknown, known = make_node("unknown"), make_node("known")
    _fit(unknown, model, None)
    _fit(known, model, "good")
    _busy(known, 3)
    assert _choose(model, unknown, known).node.name == known.name


def test_the_better_fit_breaks_a_tie_in_load(model, make_node):
    snug, perfect = make_node("snug"), make_node("perfect")
    _fit(snug, model, "marginal")
    _fit(perfect, model, "perfect")
    chosen = _choose(model, snug, perfect)
    assert chosen.node.name == perfect.name and chosen.reason.startswith("fit perfect, file not on node, 0 in flight")


def test_a_degraded_node_serves_only_when_no_online_node_can(model, make_node):
    degraded, online = make_node("degraded"), make_node("online")
    node_heartbeat_record(name=degraded.name, loaded_models=[model.id])
    Node.objects.filter(pk=degraded.pk).update(
        last_heartbeat=timezone.now() - timedelta(seconds=settings.LLMP_NODE_DEGRADED_SECONDS + 5))
    _fit(online, model, "good")
    assert _choose(model, degraded, online).node.name == online.name
    _fit(online, model, "too_tight")
    chosen = _choose(model, degraded, online)
    assert chosen.node.name == degraded.name and "no online node: using a degraded one" in chosen.reason


def test_the_choice_and_its_reason_are_logged(model, make_node, caplog):
    warm = make_node("logged")
    node_heartbeat_record(name=warm.name, loaded_models=[model.id])
    with caplog.at_level(logging.INFO, logger="apps.gateway.dispatch"):
        _choose(model, warm)
    assert f"placement: {model.id} on {warm.name}: model loaded, the only online node holding it" in caplog.text


def test_of_two_nodes_holding_the_model_the_one_with_fewer_requests_in_flight_is_chosen(model, make_node):
    busy, idle = make_node("busy"), make_node("idle")
    for node in (busy, idle):
        node_heartbeat_record(name=node.name, loaded_models=[model.id])
    _busy(busy, 2)
    chosen = _choose(model, busy, idle)
    assert chosen.node.name == idle.name and chosen.reason == "model loaded, 0 in flight"


def test_a_memory_need_measured_on_the_node_outweighs_the_modelled_fit(model, make_node):
    measured, modelled = make_node("measured"), make_node("modelled")
    _fit(measured, model, "perfect")
    _fit(modelled, model, "marginal")
    FitMeasurement.objects.create(node=measured, model_id=model.id, memory_bytes=8 * GIB, measured_at=timezone.now())
    assert fit_level(node=Node.objects.get(pk=measured.pk), model=model) == "too_tight"
    chosen = _choose(model, measured, modelled)
    assert chosen.node.name == modelled.name and f"{measured.name} too_tight" in chosen.reason


def test_fit_levels_of_many_nodes_are_each_nodes_own_fit(model, make_node):
    nodes = {level: make_node("many") for level in FITTING_HARDWARE}
    for level, node in nodes.items():
        _fit(node, model, level)
    fresh = list(Node.objects.filter(pk__in=[node.pk for node in nodes.values()]))
    assert fit_levels(model=model, nodes=fresh) == {node.pk: level for level, node in nodes.items()}


def test_a_real_worker_nodes_reported_hardware_fits_the_bundled_model(platform, model_id):
    node = Node.objects.get(name=platform.node)
    model = RegisteredModel.objects.get(id=model_id)
    assert fit_levels(model=model, nodes=[node]) == {node.pk: fit_level(node=node, model=model)}
    assert fit_level(node=node, model=model) in {"perfect", "good", "marginal"}, node.hardware
