from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from apps.fit.models import FitMeasurement
from apps.nodes.models import Node

logger = logging.getLogger(__name__)

TPS_AVERAGE_WINDOW = 20


def measurement_record(*, node_name: str, model_id: str, memory_bytes: int | None = None,
                       tokens_per_second: float | None = None) -> FitMeasurement | None:
    """Fold one measurement into the node's row for the model; None when the node is unknown.

    Memory is the bytes llama.cpp held for the model's weights when the worker last loaded it;
    speed is a moving average that gives each new measurement a weight of at least
    1/``TPS_AVERAGE_WINDOW``.
    """
    node = Node.objects.filter(name=node_name).first()
    if node is None:
        return None
    with transaction.atomic():
        row, _ = FitMeasurement.objects.select_for_update().get_or_create(
            node=node, model_id=model_id, defaults={"measured_at": timezone.now()})
        if memory_bytes is not None and memory_bytes > 0:
            row.memory_bytes = int(memory_bytes)
        if tokens_per_second is not None and tokens_per_second > 0:
            samples = min(row.tps_samples, TPS_AVERAGE_WINDOW - 1)
            row.tokens_per_second = ((row.tokens_per_second or 0.0) * samples + tokens_per_second) / (samples + 1)
            row.tps_samples = samples + 1
        row.measured_at = timezone.now()
        row.save()
    return row
