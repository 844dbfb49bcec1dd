"""Basic facts about the machine a worker runs on: CPU, RAM, and NVIDIA GPUs through NVML."""

from __future__ import annotations

import os
import platform

import psutil


def _gpus() -> list[dict]:
    """GPUs visible through NVML; an empty list (a CPU-only node) when there is no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "vram_total_bytes": int(memory.total),
                "vram_free_bytes": int(memory.free),
            })
        return gpus
    finally:
        pynvml.nvmlShutdown()


def hardware_snapshot() -> dict:
    memory = psutil.virtual_memory()
    return {
        "cpu_model": platform.processor() or platform.machine(),
        "cpu_cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "cpu_threads": psutil.cpu_count(logical=True),
        "ram_total_bytes": int(memory.total),
        "ram_available_bytes": int(memory.available),
        "gpus": _gpus(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
