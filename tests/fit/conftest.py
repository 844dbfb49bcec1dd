"""Hardware snapshots of three kinds of machine, as their workers would report them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def snapshot(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def make_node():
    """A node row with a fixture's hardware under a unique name (tests share one database)."""
    from datetime import timedelta

    from django.utils import timezone

    from apps.nodes.models import Node

    # Offline (no worker behind it), so that the running platform never places a request on it.
    def make(fixture: str, *, gpu_index: int | None = None) -> Node:
        name = f"{fixture}-{uuid.uuid4().hex[:8]}"
        now = timezone.now()
        return Node.objects.create(name=name, hostname=name, queue=f"node.{name}", gpu_index=gpu_index,
                                   hardware=snapshot(fixture), started_at=now, last_heartbeat=now - timedelta(days=1))

    return make
