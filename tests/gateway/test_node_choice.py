"""Which live node the gateway sends a request to."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
from django.conf import settings

from apps.gateway.dispatch import _inflight_key, node_choose
from apps.models.models import RegisteredModel
from apps.nodes.models import Node
from apps.nodes.services import node_heartbeat_record, node_register


@pytest.fixture
def model() -> RegisteredModel:
    return RegisteredModel.objects.create(id=f"choice-{uuid.uuid4().hex[:8]}", source="upload", file_name="x.gguf")


def _node(name: str) -> str:
    return node_register(name=f"{name}-{uuid.uuid4().hex[:6]}", hostname="h", gpu_index=None, hardware={}).name


def _busy(node: str, *request_ages: float) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.zadd(_inflight_key(node), {uuid.uuid4().hex: time.time() - age for age in request_ages})


def _pick(model, *names: str) -> str:
    nodes = list(Node.objects.filter(name__in=names))  # fresh rows: loaded models as last reported
    return asyncio.run(node_choose(model, nodes)).node.name


def test_a_node_that_has_the_model_loaded_is_preferred_even_when_busier(model):
    idle, warm = _node("idle"), _node("warm")
    node_heartbeat_record(name=warm, loaded_models=[model.id])
    _busy(warm, 1, 2)
    assert _pick(model, idle, warm) == warm


def test_among_equals_the_least_busy_node_is_chosen(model):
    busy, quiet = _node("busy"), _node("quiet")
    _busy(busy, 1)
    assert _pick(model, busy, quiet) == quiet
    _busy(quiet, 1, 2)
    assert _pick(model, busy, quiet) == busy


def test_requests_too_old_to_be_in_flight_no_longer_count(model):
    stale, fresh = _node("stale"), _node("fresh")
    too_old = settings.LLMP_QUEUE_TIMEOUT + settings.LLMP_FIRST_TOKEN_TIMEOUT + 60
    _busy(stale, too_old, too_old, too_old)
    _busy(fresh, 1)
    assert _pick(model, stale, fresh) == stale
