"""A light sample of a node's load, taken with every heartbeat: CPU, RAM and per-GPU figures.

GPUs are read through ``workers.hardware`` (NVML, initialised once per process); a figure a GPU
or driver does not report is None.
"""

from __future__ import annotations

import psutil

from workers.hardware import GPU_FIGURES, gpus_read


def gpu_samples(*, gpu_index: int | None) -> list[dict]:
    """Index and ``GPU_FIGURES`` of each GPU the node computes on: GPU ``gpu_index`` when pinned, else all."""
    return [{"index": gpu["index"], **{figure: gpu[figure] for figure in GPU_FIGURES}}
            for gpu in gpus_read(index=gpu_index)]


def metrics_sample(*, requests_in_flight: int, gpu_index: int | None) -> dict:
    """The figures one heartbeat stores; plain JSON values only.

    ``cpu_pct`` is the CPU use since the previous ``psutil.cpu_percent`` call of this process.
    """
    memory = psutil.virtual_memory()
    return {
        "cpu_pct": psutil.cpu_percent(interval=None),
        "ram_used_bytes": int(memory.total - memory.available),
        "ram_available_bytes": int(memory.available),
        "requests_in_flight": requests_in_flight,
        "gpus": gpu_samples(gpu_index=gpu_index),
    }
