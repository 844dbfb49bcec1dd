"""A light sample of a node's load, taken with every heartbeat: CPU, RAM and per-GPU figures.

Cheaper than ``workers.hardware.hardware_snapshot()``: NVML is initialised once per process and
only the figures that change are read. A figure a GPU or driver does not report is None.
"""

from __future__ import annotations

import logging
import threading

import psutil

logger = logging.getLogger(__name__)

_nvml_lock = threading.Lock()
_nvml_ready: bool | None = None  # None: not tried yet; False: no NVIDIA driver here


def _nvml():
    """The pynvml module, initialised, or None on a machine without an NVIDIA driver."""
    global _nvml_ready
    with _nvml_lock:
        if _nvml_ready is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_ready = True
            except Exception:
                _nvml_ready = False
        if not _nvml_ready:
            return None
        import pynvml

        return pynvml


def _read(reader, *args):
    try:
        return reader(*args)
    except Exception:  # NVML raises NotSupported for figures a GPU does not report
        return None


def gpu_samples() -> list[dict]:
    """One dict per GPU of the machine: index, vram_used_bytes, utilization_pct, temperature_c, power_w."""
    nvml = _nvml()
    if nvml is None:
        return []
    samples = []
    count = _read(nvml.nvmlDeviceGetCount) or 0
    for index in range(count):
        handle = _read(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            continue
        memory = _read(nvml.nvmlDeviceGetMemoryInfo, handle)
        rates = _read(nvml.nvmlDeviceGetUtilizationRates, handle)
        temperature = _read(nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        milliwatts = _read(nvml.nvmlDeviceGetPowerUsage, handle)
        samples.append({
            "index": index,
            "vram_used_bytes": int(memory.used) if memory is not None else None,
            "utilization_pct": float(rates.gpu) if rates is not None else None,
            "temperature_c": float(temperature) if temperature is not None else None,
            "power_w": milliwatts / 1000 if milliwatts is not None else None,
        })
    return samples


def metrics_sample(*, loaded_models: list[str], requests_in_flight: int) -> dict:
    """The figures one heartbeat stores; plain JSON values only."""
    memory = psutil.virtual_memory()
    return {
        # CPU use since the previous call (the first call of a process reads 0.0).
        "cpu_pct": psutil.cpu_percent(interval=None),
        "ram_used_bytes": int(memory.total - memory.available),
        "ram_available_bytes": int(memory.available),
        "requests_in_flight": requests_in_flight,
        "loaded_models": loaded_models,
        "gpus": gpu_samples(),
    }
