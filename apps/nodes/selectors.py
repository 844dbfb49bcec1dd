from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

from django.db.models import Case, CharField, Q, QuerySet, Value, When
from django.utils import timezone

from apps.nodes.models import Node, NodeMetric, NodeStatus, node_status_thresholds
from workers.hardware import GPU_FIGURES


def _heartbeating() -> QuerySet[Node]:
    _, live_after = node_status_thresholds()
    return Node.objects.filter(last_heartbeat__gte=live_after)


def node_list_live() -> QuerySet[Node]:
    """Nodes that can take work: online or degraded, i.e. heartbeating and not unhealthy."""
    return _heartbeating().filter(health_error="")


def node_list_unhealthy() -> QuerySet[Node]:
    """Nodes that heartbeat but failed their start-up test decode: present, and given no work."""
    return _heartbeating().exclude(health_error="")


def node_list_with_status() -> QuerySet[Node]:
    """Every node, annotated with ``current_status`` (a ``NodeStatus``) so it can be filtered on.

    The same rule as ``Node.status``: offline once the heartbeat is too old, else unhealthy
    after a failed self-test, else online or degraded by the heartbeat's age.
    """
    online_after, live_after = node_status_thresholds()
    return Node.objects.annotate(current_status=Case(
        When(last_heartbeat__lt=live_after, then=Value(NodeStatus.OFFLINE.value)),
        When(~Q(health_error=""), then=Value(NodeStatus.UNHEALTHY.value)),
        When(last_heartbeat__gte=online_after, then=Value(NodeStatus.ONLINE.value)),
        default=Value(NodeStatus.DEGRADED.value), output_field=CharField()))


def node_get(*, ref: str, queryset: QuerySet[Node] | None = None) -> Node | None:
    """The node whose numeric id is ``ref``, else the node named ``ref``; None when neither exists."""
    nodes = Node.objects.all() if queryset is None else queryset
    if ref.isascii() and ref.isdigit():  # int() refuses some digits isdigit() takes ("²")
        node = nodes.filter(pk=int(ref)).first()
        if node is not None:
            return node
    return nodes.filter(name=ref).first()


def _mean(values: list) -> float | None:
    known = [value for value in values if value is not None]
    return sum(known) / len(known) if known else None


def _rounded(value: float | None, *, whole: bool) -> float | int | None:
    if value is None:
        return None
    return round(value) if whole else round(value, 3)


def node_metrics_history(*, node: Node, minutes: int, step: int, now: datetime | None = None) -> list[dict]:
    """The node's metrics of the last ``minutes``, averaged over buckets of ``step`` seconds.

    Buckets start at whole multiples of ``step`` seconds since the Unix epoch, so the same query
    gives the same buckets whenever it runs; the first and the last may be partly outside the
    window. Buckets without a sample (the node was down) are left out.
    """
    now = now or timezone.now()
    rows = (NodeMetric.objects.filter(node=node, recorded_at__gt=now - timedelta(minutes=minutes), recorded_at__lte=now)
            .order_by("recorded_at")
            .values_list("recorded_at", "cpu_pct", "ram_used_bytes", "ram_available_bytes", "requests_in_flight",
                         "loaded_models", "gpus"))
    grouped: dict[int, list[tuple]] = defaultdict(list)
    for row in rows.iterator():
        grouped[int(row[0].timestamp() // step * step)].append(row)
    buckets = []
    for start, samples in sorted(grouped.items()):
        per_gpu: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for gpu in (gpu for sample in samples for gpu in sample[6] if isinstance(gpu, dict) and "index" in gpu):
            for figure in GPU_FIGURES:
                per_gpu[gpu["index"]][figure].append(gpu.get(figure))
        buckets.append({
            "start": datetime.fromtimestamp(start, tz=UTC).isoformat().replace("+00:00", "Z"),
            "samples": len(samples),
            "cpu_pct": _rounded(_mean([s[1] for s in samples]), whole=False),
            "ram_used_bytes": _rounded(_mean([s[2] for s in samples]), whole=True),
            "ram_available_bytes": _rounded(_mean([s[3] for s in samples]), whole=True),
            "requests_in_flight": _rounded(_mean([s[4] for s in samples]), whole=False),
            "loaded_models": sorted({model for s in samples for model in s[5]}),
            "gpus": [
                {"index": index, **{figure: _rounded(_mean(values[figure]), whole=figure == "vram_used_bytes")
                                    for figure in GPU_FIGURES}}
                for index, values in sorted(per_gpu.items())
            ],
        })
    return buckets
