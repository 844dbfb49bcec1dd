from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class NodeStatus(models.TextChoices):
    ONLINE = "online"
    OFFLINE = "offline"


def node_queue_name(node_name: str) -> str:
    """The Celery queue that exactly one node consumes."""
    return f"node.{node_name}"


class Node(models.Model):
    """A worker process pinned to one machine (and optionally one GPU), with its own queue."""

    name = models.SlugField(max_length=128, unique=True)
    hostname = models.CharField(max_length=255)
    queue = models.CharField(max_length=160)
    gpu_index = models.PositiveSmallIntegerField(null=True, blank=True)
    hardware = models.JSONField(default=dict, blank=True)
    loaded_models = models.JSONField(default=list, blank=True)
    started_at = models.DateTimeField()
    last_heartbeat = models.DateTimeField(db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def status(self) -> str:
        live_after = timezone.now() - timedelta(seconds=settings.LLMP_NODE_LIVE_SECONDS)
        return NodeStatus.ONLINE if self.last_heartbeat >= live_after else NodeStatus.OFFLINE
