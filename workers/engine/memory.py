"""What a runner will hold, estimated from the GGUF header before it loads: the pool's budget.

Weights once (the file's size), KV for every slot (F16 K and V per layer and position) and the
compute buffers of one micro-batch (logits and activations; llama.cpp sizes these itself and
reports them only in its log, so this is an estimate). A running runner replaces the estimate
with what it measured (``ready``'s ``memory``).
"""

from __future__ import annotations

import os

from workers.gguf import GGUFError, read_header, summarize

KV_BYTES_PER_VALUE = 2  # llama.cpp's default cache type, F16


def kv_bytes_per_position(meta: dict) -> int | None:
    layers, kv_heads = meta.get("block_count"), meta.get("head_count_kv") or meta.get("head_count")
    key_length, value_length = meta.get("key_length"), meta.get("value_length")
    if not (layers and kv_heads and key_length and value_length):
        return None
    return layers * kv_heads * (key_length + value_length) * KV_BYTES_PER_VALUE


def compute_bytes(*, vocab_size: int, embedding_length: int, n_batch: int) -> int:
    return n_batch * (vocab_size + 8 * embedding_length) * 4


def runner_memory_estimate(path: str, *, n_slots: int, n_ctx: int, n_batch: int) -> dict:
    """Bytes a runner of ``path`` will hold: weights, kv (all slots), compute and their total."""
    size = os.path.getsize(path)
    try:
        summary = summarize(read_header(path, file_size=size), file_size=size)
    except (GGUFError, OSError):
        return {"weights_bytes": size, "kv_bytes": 0, "compute_bytes": 0, "total_bytes": size, "estimated": True}
    meta = summary["metadata"]
    kv = (kv_bytes_per_position(meta) or 0) * n_slots * n_ctx
    compute = compute_bytes(vocab_size=meta.get("vocab_size") or 0, embedding_length=meta.get("embedding_length") or 0,
                            n_batch=n_batch)
    return {"weights_bytes": size, "kv_bytes": kv, "compute_bytes": compute, "total_bytes": size + kv + compute,
            "estimated": True}
