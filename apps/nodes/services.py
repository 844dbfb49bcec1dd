from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from apps.nodes.models import Node, node_queue_name


def node_register(*, name: str, hostname: str, gpu_index: int | None, hardware: dict) -> Node:
    """Create or refresh a node as its worker starts; the node is live from this moment."""
    now = timezone.now()
    node, _ = Node.objects.update_or_create(
        name=name,
        defaults={
            "hostname": hostname,
            "queue": node_queue_name(name),
            "gpu_index": gpu_index,
            "hardware": hardware,
            "loaded_models": [],
            "started_at": now,
            "last_heartbeat": now,
        },
    )
    return node


def node_heartbeat_record(*, name: str, loaded_models: list[str]) -> None:
    """Mark a node alive now with the models it holds in memory.

    Re-creates nothing: a node deleted by an operator stays deleted until its worker restarts.
    """
    Node.objects.filter(name=name).update(last_heartbeat=timezone.now(), loaded_models=loaded_models)


def node_mark_offline(*, name: str) -> None:
    """A worker shutting down cleanly takes its node out of routing at once."""
    Node.objects.filter(name=name).update(last_heartbeat=timezone.now() - timedelta(days=1), loaded_models=[])
