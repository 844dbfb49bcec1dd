from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class NodeStatus(models.TextChoices):
    """Derived from the age of a node's last heartbeat and its start-up self-test (see ``node_status_of``)."""

    ONLINE = "online"
    DEGRADED = "degraded"
    # Heartbeating, but its worker's test decode failed at start-up: it gets no requests.
    UNHEALTHY = "unhealthy"
    OFFLINE = "offline"


def node_queue_name(node_name: str) -> str:
    """The Celery queue that exactly one node consumes."""
    return f"node.{node_name}"


def node_status_thresholds(now: datetime | None = None) -> tuple[datetime, datetime]:
    """The heartbeat times at or after which a node counts as online, and as not offline."""
    now = now or timezone.now()
    return (now - timedelta(seconds=settings.LLMP_NODE_DEGRADED_SECONDS),
            now - timedelta(seconds=settings.LLMP_NODE_OFFLINE_SECONDS))


def node_status_of(last_heartbeat: datetime, now: datetime | None = None, *, health_error: str = "") -> str:
    """Offline once the heartbeat is too old; else unhealthy if the self-test failed; else online or degraded."""
    online_after, live_after = node_status_thresholds(now)
    if last_heartbeat < live_after:
        return NodeStatus.OFFLINE
    if health_error:
        return NodeStatus.UNHEALTHY
    return NodeStatus.ONLINE if last_heartbeat >= online_after else NodeStatus.DEGRADED


class Node(models.Model):
    """A worker process pinned to one machine (and optionally one GPU), with its own queue."""

    name = models.SlugField(max_length=128, unique=True)
    hostname = models.CharField(max_length=255)
    queue = models.CharField(max_length=160)
    gpu_index = models.PositiveSmallIntegerField(null=True, blank=True)
    hardware = models.JSONField(default=dict, blank=True)
    loaded_models = models.JSONField(default=list, blank=True)
    runners = models.JSONField(default=dict, blank=True, help_text=(
        "From the last heartbeat: the worker's runner processes (model, state, pid, requests in flight, memory "
        "held, decode steps by how many sequences shared them) and its last runner deaths."))
    started_at = models.DateTimeField()
    last_heartbeat = models.DateTimeField(db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Maintenance: a cordoned node, or one using a cordoned GPU, gets no new requests.
    cordoned = models.BooleanField(default=False)
    cordoned_gpus = models.JSONField(default=list, blank=True, help_text="Indexes of this node's cordoned GPUs.")
    # The test decode its worker runs at start-up, before taking traffic (workers/selftest.py).
    health_error = models.TextField(blank=True, help_text="Why the start-up test decode failed; empty: it passed "
                                                         "or found no model to test. A node with an error gets "
                                                         "no requests.")
    health_checked_at = models.DateTimeField(null=True, blank=True)
    health_detail = models.JSONField(default=dict, blank=True, help_text="The self-test's result: model, elapsed "
                                     "seconds, signal or exit code, last stderr lines, llama.cpp system info.")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def status(self) -> str:
        return node_status_of(self.last_heartbeat, health_error=self.health_error)

    @property
    def gpu_indexes(self) -> list[int]:
        """The GPUs this node's worker computes on: its pinned GPU, or every GPU of the machine."""
        if self.gpu_index is not None:
            return [self.gpu_index]
        return [gpu["index"] for gpu in self.hardware.get("gpus", []) if isinstance(gpu, dict) and "index" in gpu]

    @property
    def is_cordoned(self) -> bool:
        """No new placements: the node is cordoned, or one of the GPUs it computes on is.

        llama.cpp spreads a model over every GPU its process sees, so a running worker cannot be
        kept off one of them: one cordoned GPU takes the whole node out of placement.
        """
        return self.cordoned or bool(set(self.cordoned_gpus) & set(self.gpu_indexes))


class NodeMetric(models.Model):
    """One sample of a node's load, taken with a heartbeat; kept LLMP_NODE_METRICS_RETENTION_HOURS."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="metrics")
    recorded_at = models.DateTimeField(db_index=True)
    cpu_pct = models.FloatField(null=True, blank=True)
    ram_used_bytes = models.BigIntegerField(null=True, blank=True)
    ram_available_bytes = models.BigIntegerField(null=True, blank=True)
    requests_in_flight = models.PositiveIntegerField(default=0)
    loaded_models = models.JSONField(default=list, blank=True)
    # [{"index", "vram_used_bytes", "utilization_pct", "temperature_c", "power_w"}], figures null when unknown.
    gpus = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["node_id", "recorded_at"]
        indexes = [models.Index(fields=["node", "recorded_at"], name="node_metric_node_time")]

    def __str__(self) -> str:
        return f"{self.node_id} @ {self.recorded_at:%Y-%m-%d %H:%M:%S}"
