from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.nodes.models import Node, NodeMetric, node_queue_name
from llmplatform.epochs import EPOCH_NODES, epoch_bump
from llmplatform.errors import ApplicationError
from workers.protocol import TASK_MODELS_UNLOAD

logger = logging.getLogger(__name__)


class NodeMaintenanceError(ApplicationError):
    """A maintenance request that does not apply to this node (e.g. a GPU it does not have): 400."""


def node_register(*, name: str, hostname: str, gpu_index: int | None, hardware: dict, health_error: str = "",
                  health_detail: dict | None = None) -> Node:
    """Create or refresh a node as its worker starts; the node heartbeats from this moment.

    ``health_error`` and ``health_detail`` are its worker's start-up test decode: with an error
    the node is unhealthy (it gets no work) until a restart passes the test. Without a
    ``health_detail`` nothing was checked. Cordons survive a restart: an operator's maintenance
    outlasts the worker process.
    """
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
            "health_error": health_error,
            "health_detail": health_detail or {},
            "health_checked_at": now if health_detail is not None else None,
        },
    )
    return node


def node_heartbeat_record(*, name: str, loaded_models: list[str], metrics: dict | None = None,
                          runners: dict | None = None) -> bool:
    """Mark a node alive now with the models it holds in memory (and its runners), and store its metrics sample.

    Returns False when there is no such node (an operator deleted it): its worker registers it again.
    """
    now = timezone.now()
    node_id = Node.objects.filter(name=name).values_list("pk", flat=True).first()
    fields = {"last_heartbeat": now, "loaded_models": loaded_models}
    if runners is not None:
        fields["runners"] = runners
    if node_id is None or not Node.objects.filter(pk=node_id).update(**fields):
        return False
    if metrics is not None:
        gpus = [gpu for gpu in metrics.get("gpus") or [] if isinstance(gpu, dict)]
        NodeMetric.objects.create(
            node_id=node_id, recorded_at=now, cpu_pct=metrics.get("cpu_pct"),
            ram_used_bytes=metrics.get("ram_used_bytes"), ram_available_bytes=metrics.get("ram_available_bytes"),
            requests_in_flight=metrics.get("requests_in_flight") or 0, loaded_models=loaded_models, gpus=gpus)
    return True


def node_mark_offline(*, name: str) -> None:
    """A worker shutting down cleanly takes its node out of routing at once."""
    Node.objects.filter(name=name).update(last_heartbeat=timezone.now() - timedelta(days=1), loaded_models=[])
    epoch_bump(EPOCH_NODES)  # an update() sends no post_save: tell the gateways' copies of the live nodes


def _checked_gpus(node: Node, gpus: list[int]) -> set[int]:
    unknown = sorted(set(gpus) - set(node.gpu_indexes))
    if unknown:
        raise NodeMaintenanceError(f"node {node.name} has no GPU {', '.join(map(str, unknown))} "
                                   f"(its GPUs: {node.gpu_indexes or 'none'})", param="gpus")
    return set(gpus)


def node_cordon(*, node: Node, gpus: list[int] | None = None) -> Node:
    """Stop placing new requests on the node, or on the given GPUs of it; requests in flight finish."""
    if gpus:
        node.cordoned_gpus = sorted(set(node.cordoned_gpus) | _checked_gpus(node, gpus))
    else:
        node.cordoned = True
    node.save(update_fields=["cordoned", "cordoned_gpus"])
    logger.info("node %s cordoned (node: %s, GPUs: %s)", node.name, node.cordoned, node.cordoned_gpus)
    return node


def node_uncordon(*, node: Node, gpus: list[int] | None = None) -> Node:
    """Let the node, or the given GPUs of it, take new requests again."""
    if gpus:
        node.cordoned_gpus = sorted(set(node.cordoned_gpus) - _checked_gpus(node, gpus))
    else:
        node.cordoned, node.cordoned_gpus = False, []
    node.save(update_fields=["cordoned", "cordoned_gpus"])
    logger.info("node %s uncordoned (node: %s, GPUs: %s)", node.name, node.cordoned, node.cordoned_gpus)
    return node


def node_models_unload(*, node: Node, model_ids: list[str] | None = None) -> None:
    """Ask the node's worker to unload ``model_ids`` (all when None) once their requests finish."""
    from llmplatform.celery import app

    transaction.on_commit(lambda: app.send_task(TASK_MODELS_UNLOAD, queue=node.queue, kwargs={"model_ids": model_ids}))


def node_drain(*, node: Node, gpus: list[int] | None = None) -> Node:
    """Cordon the node (or GPUs of it), then unload its models as their requests in flight finish."""
    with transaction.atomic():
        node = node_cordon(node=node, gpus=gpus)
        node_models_unload(node=node)
    logger.info("node %s draining its loaded models %s", node.name, node.loaded_models)
    return node


def node_delete(*, node: Node) -> None:
    """Forget a node with its metrics; a worker still running under that name comes back only on restart."""
    logger.info("node %s deleted", node.name)
    node.delete()


def node_metrics_prune() -> int:
    """Delete metrics samples older than LLMP_NODE_METRICS_RETENTION_HOURS; returns how many."""
    cutoff = timezone.now() - timedelta(hours=settings.LLMP_NODE_METRICS_RETENTION_HOURS)
    deleted, _ = NodeMetric.objects.filter(recorded_at__lt=cutoff).delete()
    return deleted
