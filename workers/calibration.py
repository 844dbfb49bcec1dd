"""What this worker measured of its models, held in memory until the next heartbeat records it.

Loading a model notes the bytes llama.cpp holds for its weights; a generation notes its decode
speed. Nothing here touches the database, so no token waits on it; the heartbeat thread drains
the notes (``drain``) and writes them through ``apps.fit.services.measurement_record``.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_weights: dict[str, int] = {}
_speeds: dict[str, tuple[float, int]] = {}  # model id -> (sum of tokens/s, generations)


def weights_measured(model_id: str, size_bytes: int) -> None:
    with _lock:
        _weights[model_id] = size_bytes


def speed_measured(model_id: str, tokens_per_second: float) -> None:
    with _lock:
        total, count = _speeds.get(model_id, (0.0, 0))
        _speeds[model_id] = (total + tokens_per_second, count + 1)


def drain() -> list[dict]:
    """Every model's notes since the last drain: weight bytes and the mean decode speed."""
    with _lock:
        weights, speeds = dict(_weights), dict(_speeds)
        _weights.clear()
        _speeds.clear()
    return [{"model_id": model_id, "memory_bytes": weights.get(model_id),
             "tokens_per_second": speeds[model_id][0] / speeds[model_id][1] if model_id in speeds else None}
            for model_id in sorted(set(weights) | set(speeds))]
