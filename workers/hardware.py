"""What a worker's machine has: CPU, RAM, disk for models, and NVIDIA GPUs through NVML.

Plain Python (no Django), so it runs in a worker, in ``manage.py fit serve`` and in tests alike.
A machine without an NVIDIA driver is a CPU-only node, never an error: ``gpus`` is empty.

NVML is read in two steps: ``_nvml_readings`` asks the driver for raw values (bytes, milliwatts,
packed version integers) and ``gpu_from_nvml`` turns one GPU's raw readings into our snapshot
entry. The second step is pure, so it is tested with readings recorded from real GPUs. Both the
snapshot a worker registers with and the metrics sample of each heartbeat (``workers.metrics``)
read GPUs through ``gpus_read``.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
from functools import cache
from pathlib import Path

import psutil
import pynvml

# Peak memory bandwidth (GB/s) of common GPUs, from vendor datasheets. Token generation is
# bound by memory bandwidth, so this is the figure speed estimates rest on. Longest match wins,
# so "RTX 4090 D" and "H100 NVL" resolve before "RTX 4090" and "H100".
GPU_MEMORY_BANDWIDTH_GBPS: dict[str, float] = {
    # Datacentre
    "B200": 8000.0, "H200": 4800.0, "GH200": 4000.0, "H100 NVL": 3900.0, "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 2000.0, "H800": 3350.0, "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0, "A100-PCIE-80GB": 1935.0, "A100": 1555.0, "A800": 2039.0, "L40S": 864.0,
    "L40": 864.0, "L4": 300.0, "A40": 696.0, "A30": 933.0, "A10G": 600.0, "A10": 600.0, "A16": 200.0,
    "A2": 200.0, "T4": 320.0, "V100": 900.0, "P100": 732.0, "P40": 347.0, "P4": 192.0,
    "RTX 6000 Ada": 960.0, "RTX 5000 Ada": 576.0, "RTX 4000 Ada": 360.0, "RTX A6000": 768.0,
    "RTX A5000": 768.0, "RTX A4000": 448.0, "Quadro RTX 8000": 672.0, "Quadro RTX 6000": 672.0,
    # GeForce 50 / 40 / 30 / 20 series
    "RTX 5090": 1792.0, "RTX 5080": 960.0, "RTX 5070 Ti": 896.0, "RTX 5070": 672.0, "RTX 5060 Ti": 448.0,
    "RTX 4090 D": 1008.0, "RTX 4090": 1008.0, "RTX 4080 SUPER": 736.0, "RTX 4080": 717.0,
    "RTX 4070 Ti SUPER": 672.0, "RTX 4070 Ti": 504.0, "RTX 4070 SUPER": 504.0, "RTX 4070": 504.0,
    "RTX 4060 Ti": 288.0, "RTX 4060": 272.0, "RTX 3090 Ti": 1008.0, "RTX 3090": 936.0,
    "RTX 3080 Ti": 912.0, "RTX 3080": 760.0, "RTX 3070 Ti": 608.0, "RTX 3070": 448.0,
    "RTX 3060 Ti": 448.0, "RTX 3060": 360.0, "RTX 3050": 224.0, "TITAN RTX": 672.0,
    "RTX 2080 Ti": 616.0, "RTX 2080 SUPER": 496.0, "RTX 2080": 448.0, "RTX 2070": 448.0, "RTX 2060": 336.0,
    "GTX 1080 Ti": 484.0, "GTX 1080": 320.0, "GTX 1070": 256.0, "GTX 1660": 192.0,
}

# Typical sustained bandwidth (GB/s) of system RAM: a server socket with 8+ DDR5 channels, and a
# desktop or laptop with two channels. One core streams only about 12 GB/s, so a machine (or VM)
# with few cores reaches less.
RAM_BANDWIDTH_TYPICAL_SERVER_GBPS = 200.0
RAM_BANDWIDTH_TYPICAL_DESKTOP_GBPS = 60.0
RAM_BANDWIDTH_PER_CORE_GBPS = 12.0
_SERVER_CPU_MARKERS = ("EPYC", "Xeon", "Threadripper", "Neoverse", "Grace", "Ampere")


def gpu_memory_bandwidth_gbps(name: str) -> float | None:
    """Datasheet memory bandwidth of a GPU by its NVML name, or None for a GPU not in the table."""
    lowered = name.lower()
    matches = [key for key in GPU_MEMORY_BANDWIDTH_GBPS if key.lower() in lowered]
    return GPU_MEMORY_BANDWIDTH_GBPS[max(matches, key=len)] if matches else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cuda_version_text(packed: int | None) -> str | None:
    """NVML packs the CUDA driver version as 1000 * major + 10 * minor (12040 -> "12.4")."""
    if not packed:
        return None
    return f"{packed // 1000}.{(packed % 1000) // 10}"


# The figures of a GPU that change from moment to moment: what a metrics sample keeps of each GPU.
GPU_FIGURES = ("vram_used_bytes", "utilization_pct", "temperature_c", "power_w")


def gpu_from_nvml(readings: dict) -> dict:
    """One GPU's snapshot entry from raw NVML readings; a reading the GPU refused is None.

    ``readings`` holds what pynvml returned, unconverted: ``name`` and ``driver_version``
    (bytes or str), ``memory`` (total/free/used bytes), ``utilization_gpu`` (percent),
    ``temperature`` (degrees C), ``power_mw`` (milliwatts), ``cuda_driver_version`` (packed
    int) and ``compute_capability`` (a (major, minor) pair).
    """
    name = _text(readings["name"])
    memory = readings.get("memory")
    capability = readings.get("compute_capability")
    power_mw = readings.get("power_mw")
    bandwidth = gpu_memory_bandwidth_gbps(name)
    driver = readings.get("driver_version")
    return {
        "index": int(readings["index"]),
        "name": name,
        "vram_total_bytes": int(memory["total"]) if memory else 0,
        "vram_free_bytes": int(memory["free"]) if memory else None,
        "vram_used_bytes": int(memory["used"]) if memory else None,
        "utilization_pct": readings.get("utilization_gpu"),
        "temperature_c": readings.get("temperature"),
        "power_w": round(power_mw / 1000, 1) if power_mw is not None else None,
        "driver_version": _text(driver) if driver is not None else None,
        "cuda_version": cuda_version_text(readings.get("cuda_driver_version")),
        "compute_capability": f"{capability[0]}.{capability[1]}" if capability else None,
        "memory_bandwidth_gbps": bandwidth,
        "memory_bandwidth_source": "table" if bandwidth is not None else None,
    }


@cache
def _nvml_ready() -> bool:
    """Initialise NVML once per process (it stays up until the process ends); False without an NVIDIA driver."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    return True


def _read(call, *args):
    try:
        return call(*args)
    except pynvml.NVMLError:  # e.g. power or temperature not supported by this board
        return None


def _nvml_readings(index: int | None = None) -> list[dict]:
    """Raw readings of every GPU NVML sees, or only of GPU ``index``; [] when there is no NVIDIA driver.

    NVML numbers GPUs as the machine does and ignores CUDA_VISIBLE_DEVICES.
    """
    if not _nvml_ready():
        return []
    driver = _read(pynvml.nvmlSystemGetDriverVersion)
    cuda = _read(pynvml.nvmlSystemGetCudaDriverVersion)
    readings = []
    for number in range(_read(pynvml.nvmlDeviceGetCount) or 0):
        if index is not None and number != index:
            continue
        handle = _read(pynvml.nvmlDeviceGetHandleByIndex, number)
        if handle is None:  # a GPU the driver lost: leave it out rather than fail the whole reading
            continue
        memory = _read(pynvml.nvmlDeviceGetMemoryInfo, handle)
        utilization = _read(pynvml.nvmlDeviceGetUtilizationRates, handle)
        readings.append({
            "index": number,
            "name": _read(pynvml.nvmlDeviceGetName, handle) or "NVIDIA GPU",
            "memory": {"total": memory.total, "free": memory.free, "used": memory.used} if memory else None,
            "utilization_gpu": utilization.gpu if utilization else None,
            "temperature": _read(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
            "power_mw": _read(pynvml.nvmlDeviceGetPowerUsage, handle),
            "driver_version": driver,
            "cuda_driver_version": cuda,
            "compute_capability": _read(pynvml.nvmlDeviceGetCudaComputeCapability, handle),
        })
    return readings


def gpus_read(*, index: int | None = None) -> list[dict]:
    """This machine's NVIDIA GPUs as snapshot entries (see ``gpu_from_nvml``), or only GPU ``index``."""
    return [gpu_from_nvml(readings) for readings in _nvml_readings(index)]


def cpu_model_from_cpuinfo(text: str) -> str | None:
    """The "model name" line of /proc/cpuinfo (x86), or "Model"/"Hardware" on some ARM boards."""
    fallback = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "model name" and value:
            return value
        if key in ("model", "hardware") and value and not value.isdigit() and fallback is None:
            fallback = value
    return fallback


def cpu_model_name() -> str:
    try:
        name = cpu_model_from_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        name = None
    return name or platform.processor() or platform.machine()


def ram_bandwidth_typical_gbps(cpu_model: str, cores: int) -> float:
    server = any(marker.lower() in cpu_model.lower() for marker in _SERVER_CPU_MARKERS)
    platform_figure = RAM_BANDWIDTH_TYPICAL_SERVER_GBPS if server else RAM_BANDWIDTH_TYPICAL_DESKTOP_GBPS
    return min(platform_figure, RAM_BANDWIDTH_PER_CORE_GBPS * max(cores, 1))


def disk_usage(path: str | os.PathLike | None) -> dict:
    """Free and total bytes of the filesystem holding ``path`` (None where it cannot be read)."""
    if path is None:
        return {"models_dir": None, "disk_total_bytes": None, "disk_free_bytes": None}
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return {"models_dir": str(path), "disk_total_bytes": None, "disk_free_bytes": None}
    return {"models_dir": str(path), "disk_total_bytes": int(usage.total), "disk_free_bytes": int(usage.free)}


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(lines: list[str], root: Path) -> float | None:
    """CPUs allowed by the CPU quota of the cgroup that ``lines`` (/proc/self/cgroup) names, if any.

    cgroup v2 (``0::/path``): every level's ``cpu.max`` ("max 100000" or "200000 100000") applies,
    so the smallest wins. cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the cpu
    controller (-1: no quota). In a container the cgroup path may not be mounted as named; then the
    mount's root is the container's own cgroup.
    """
    limits = []
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2
            here = root / path.lstrip("/")
            levels = [here, *here.parents] if here.is_dir() else [root]
            for level in levels:
                if not str(level).startswith(str(root)):
                    break
                try:
                    quota, period = (level / "cpu.max").read_text().split()[:2]
                except (OSError, ValueError):
                    continue
                if quota != "max" and int(period) > 0:
                    limits.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                for base in (mount / path.lstrip("/"), mount):
                    try:
                        quota = int((base / "cpu.cfs_quota_us").read_text())
                        period = int((base / "cpu.cfs_period_us").read_text())
                    except (OSError, ValueError):
                        continue
                    if quota > 0 and period > 0:
                        limits.append(quota / period)
                    break
                else:
                    continue
                break
    return min(limits) if limits else None


def usable_cpus(*, proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on: its affinity set, capped by a cgroup CPU quota (whole CPUs, at least 1)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    try:
        quota = _cgroup_quota(proc_cgroup.read_text().splitlines(), cgroup_root)
    except OSError:
        quota = None
    if quota is not None:
        allowed = min(allowed, math.floor(quota))
    return max(1, allowed)


def inference_threads(configured: int = 0) -> int:
    """Threads llama.cpp decodes and reads prompts with: ``configured`` (LLMP_N_THREADS) when set,
    else every CPU this process may use. (llama-cpp-python's own default, half the CPUs for
    decoding, halves the speed of a small machine.)"""
    return configured if configured > 0 else usable_cpus()


def hardware_snapshot(*, models_dir: str | os.PathLike | None = None, n_threads: int = 0) -> dict:
    """This machine's hardware as plain JSON values (the ``Node.hardware`` of its worker).

    Keys: os, arch (e.g. x86_64, aarch64), cpu_model, cpu_cores, cpu_threads, cpu_usable (see
    ``usable_cpus``), inference_threads (llama.cpp's threads, from ``n_threads``), ram_total_bytes,
    ram_available_bytes, ram_bandwidth_gbps with ram_bandwidth_source ("typical"), models_dir,
    disk_total_bytes, disk_free_bytes, gpus (see ``gpu_from_nvml``), cuda_visible_devices.
    """
    memory = psutil.virtual_memory()
    cpu_model = cpu_model_name()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return {
        "os": platform.system().lower(),
        "arch": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_cores": cores,
        "cpu_threads": psutil.cpu_count(logical=True),
        "cpu_usable": usable_cpus(),
        "inference_threads": inference_threads(n_threads),
        "ram_total_bytes": int(memory.total),
        "ram_available_bytes": int(memory.available),
        "ram_bandwidth_gbps": ram_bandwidth_typical_gbps(cpu_model, cores),
        "ram_bandwidth_source": "typical",
        **disk_usage(models_dir),
        "gpus": gpus_read(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
