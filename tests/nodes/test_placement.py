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

from apps.gateway.dispatch import _inflight_key, node_choose
from apps.gateway.errors import OpenAIError
from apps.models.models import ModelCopy, RegisteredModel
from apps.nodes.models import Node
from apps.nodes.services import node_cordon, node_heartbeat_record
from llmplatform import devstack


@pytest.fixture
def model() -> RegisteredModel:
    model = RegisteredModel.objects.create(id=f"place-{uuid.uuid4().hex[:8]}", source="upload", file_name="x.gguf")
    yield model
    model.delete()


def _fit(node: Node, model: RegisteredModel, level: str | None) -> None:
    """What the node's heartbeat would have cached from the fit analysis."""
    Node.objects.filter(pk=node.pk).update(fit_levels={model.id: level}, fit_levels_at=timezone.now())


def _busy(node: Node, count: int) -> None:
    redis.Redis.from_url(settings.REDIS_URL).zadd(_inflight_key(node.name),
                                                   {uuid.uuid4().hex: time.time() for _ in range(count)})


def _choose(model: RegisteredModel, *nodes: Node) -> Node:
    fresh = list(Node.objects.filter(pk__in=[node.pk for node in nodes]))  # as node_list_live reads them
    return asyncio.run(node_choose(model, fresh))


def test_a_cordoned_node_gets_no_request_even_with_the_model_loaded(model, make_node):
    warm, cold = make_node("warm"), make_node("cold")
    node_heartbeat_record(name=warm.name, loaded_models=[model.id])
    node_cordon(node=warm)
    chosen = _choose(model, warm, cold)
    assert chosen.name == cold.name
    assert f"{warm.name} cordoned" in chosen.placement_reason


def test_a_node_computing_on_a_cordoned_gpu_gets_no_request(model, make_node):
    spans = make_node("spans", hardware={"gpus": [{"index": 0}, {"index": 1}]})
    other = make_node("other")
    node_heartbeat_record(name=spans.name, loaded_models=[model.id])
    node_cordon(node=spans, gpus=[1])
    assert _choose(model, spans, other).name == other.name


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
    assert chosen.name == roomy.name
    assert chosen.placement_reason.startswith("fit marginal, file not on node, 2 in flight")
    assert f"{tight.name} too_tight" in chosen.placement_reason


def test_when_the_model_is_too_tight_everywhere_the_least_busy_node_still_tries(model, make_node):
    first, second = make_node("tight1"), make_node("tight2")
    _fit(first, model, "too_tight")
    _fit(second, model, "too_tight")
    _busy(first, 1)
    chosen = _choose(model, first, second)
    assert chosen.name == second.name and "every node too_tight" in chosen.placement_reason


def test_a_node_that_already_holds_the_file_is_preferred_over_a_less_busy_one(model, make_node):
    bare, holder = make_node("bare"), make_node("holder")
    _fit(bare, model, "perfect")
    _fit(holder, model, "good")
    ModelCopy.objects.create(model=model, node=holder)
    _busy(holder, 1)
    chosen = _choose(model, bare, holder)
    assert chosen.name == holder.name and chosen.placement_reason.startswith("fit good, file on node, 1 in flight")


def test_a_known_fit_is_preferred_over_an_unknown_one(model, make_node):
    unknown, known = make_node("unknown"), make_node("known")
    _fit(unknown, model, None)
    _fit(known, model, "good")
    _busy(known, 3)
    assert _choose(model, unknown, known).name == known.name


def test_the_better_fit_breaks_a_tie_in_load(model, make_node):
    snug, perfect = make_node("snug"), make_node("perfect")
    _fit(snug, model, "marginal")
    _fit(perfect, model, "perfect")
    assert _choose(model, snug, perfect).name == perfect.name


def test_a_degraded_node_serves_only_when_no_online_node_can(model, make_node):
    degraded, online = make_node("degraded"), make_node("online")
    node_heartbeat_record(name=degraded.name, loaded_models=[model.id])
    Node.objects.filter(pk=degraded.pk).update(
        last_heartbeat=timezone.now() - timedelta(seconds=settings.LLMP_NODE_DEGRADED_SECONDS + 5))
    _fit(online, model, "good")
    assert _choose(model, degraded, online).name == online.name
    _fit(online, model, "too_tight")
    chosen = _choose(model, degraded, online)
    assert chosen.name == degraded.name and "no online node: using a degraded one" in chosen.placement_reason


def test_the_choice_and_its_reason_are_logged(model, make_node, caplog):
    warm = make_node("logged")
    node_heartbeat_record(name=warm.name, loaded_models=[model.id])
    with caplog.at_level(logging.INFO, logger="apps.gateway.dispatch"):
        _choose(model, warm)
    assert f"placement: {model.id} on {warm.name}: model loaded, 0 in flight" in caplog.text


def test_heartbeats_cache_the_nodes_fit_for_each_registered_model(platform, model_id):
    devstack.wait_until(lambda: model_id in Node.objects.get(name=platform.node).fit_levels, timeout=15,
                        what="the fit levels cached by a heartbeat")
    node = Node.objects.get(name=platform.node)
    assert node.fit_levels[model_id] in {"perfect", "good", "marginal"}, node.fit_levels
    assert node.fit_levels_at is not None
