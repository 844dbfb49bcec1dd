"""Fixtures for the node registry: management-API clients and throwaway node rows."""

from __future__ import annotations

import uuid

import httpx
import pytest
from django.contrib.auth import get_user_model

from apps.gateway.services import api_key_create
from apps.nodes.models import Node
from apps.nodes.services import node_register


def _client(base_url: str, *, staff: bool) -> httpx.Client:
    user = get_user_model().objects.create_user(f"nodes-{uuid.uuid4().hex[:8]}", is_staff=staff)
    _, raw_key = api_key_create(name="nodes", user=user)
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {raw_key}"}, timeout=60)


@pytest.fixture
def staff(platform) -> httpx.Client:
    with _client(platform.base_url, staff=True) as client:
        yield client


@pytest.fixture
def member(platform) -> httpx.Client:
    with _client(platform.base_url, staff=False) as client:
        yield client


@pytest.fixture
def make_node():
    """Register node rows with no worker behind them; they are deleted after the test, so the
    gateway never routes a real request to one."""
    made: list[str] = []

    def make(prefix: str = "row", *, hardware: dict | None = None, gpu_index: int | None = None,
             health_error: str = "") -> Node:
        """``health_error``: registered as a worker whose start-up test decode failed with it."""
        health_detail = {"tested": True, "ok": False, "error": health_error} if health_error else None
        node = node_register(name=f"{prefix}-{uuid.uuid4().hex[:6]}", hostname="h", gpu_index=gpu_index,
                             hardware=hardware or {}, health_error=health_error, health_detail=health_detail)
        made.append(node.name)
        return node

    yield make
    Node.objects.filter(name__in=made).delete()
