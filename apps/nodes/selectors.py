from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from apps.nodes.models import Node


def node_list_live() -> QuerySet[Node]:
    """Nodes whose last heartbeat is recent enough for them to take work."""
    live_after = timezone.now() - timedelta(seconds=settings.LLMP_NODE_LIVE_SECONDS)
    return Node.objects.filter(last_heartbeat__gte=live_after)
