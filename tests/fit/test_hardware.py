"""Hardware detection: NVML readings turned into snapshot entries, and this machine's snapshot."""

from __future__ import annotations

import platform
from pathlib import Path

import pynvml

from workers import hardware

# Raw readings in the forms pynvml returns them (bytes names from older bindings, milliwatts,
# packed CUDA versions, capability pairs), with the values typical of these boards.
H100_READINGS = {
    "index": 0, "name": b"NVIDIA H100 80GB HBM3",
    "memory": {"total": 85520809984, "free": 84920336384, "used": 600473600},
    "utilization_gpu": 0, "temperature": 31, "power_mw": 69419, "driver_version": b"535.129.03",
    "cuda_driver_version": 12020, "compute_capability": (9, 0),
}
RTX_4090_WITHOUT_POWER = {
    "index": 1, "name": "NVIDIA GeForce RTX 4090",
    "memory": {"total": 25757220864, "free": 25217466368, "used": 539754496},
    "utilization_gpu": 97, "temperature": None, "power_mw": None, "driver_version": "550.54.14",
    "cuda_driver_version": 12040, "compute_capability": (8, 9),
}


def test_nvml_readings_of_an_h100_become_a_snapshot_entry():
    assert hardware.gpu_from_nvml(H100_READINGS) == {
        "index": 0, "name": "NVIDIA H100 80GB HBM3",
        "vram_total_bytes": 85520809984, "vram_free_bytes": 84920336384, "vram_used_bytes": 600473600,
        "utilization_pct": 0, "temperature_c": 31, "power_w": 69.4, "driver_version": "535.129.03",
        "cuda_version": "12.2", "compute_capability": "9.0",
        "memory_bandwidth_gbps": 3350.0, "memory_bandwidth_source": "table",
    }


def test_a_reading_the_board_refuses_stays_empty_instead_of_failing():
    entry = hardware.gpu_from_nvml(RTX_4090_WITHOUT_POWER)
    assert (entry["power_w"], entry["temperature_c"]) == (None, None)
    assert (entry["cuda_version"], entry["compute_capability"], entry["memory_bandwidth_gbps"]) == ("12.4", "8.9", 1008.0)


def test_the_longest_known_gpu_name_sets_the_bandwidth():
    assert hardware.gpu_memory_bandwidth_gbps("NVIDIA H100 NVL") == 3900.0
    assert hardware.gpu_memory_bandwidth_gbps("NVIDIA L40S") == 864.0
    assert hardware.gpu_memory_bandwidth_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert hardware.gpu_memory_bandwidth_gbps("Some Future GPU") is None


def test_the_cpu_model_comes_from_cpuinfo_on_x86_and_arm():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 97\nmodel name\t: AMD Ryzen 9 7950X 16-Core Processor\n"
    arm = "processor\t: 0\nBogoMIPS\t: 108.00\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    assert hardware.cpu_model_from_cpuinfo(x86) == "AMD Ryzen 9 7950X 16-Core Processor"
    assert hardware.cpu_model_from_cpuinfo(arm) == "BCM2835"
    assert hardware.cpu_model_from_cpuinfo("") is None


def _nvml_gpu_count() -> int | None:
    """How many GPUs the NVIDIA driver reports; None on a machine without one."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def test_this_machines_snapshot_lists_its_gpus_or_none_without_an_nvidia_driver(tmp_path):
    snapshot = hardware.hardware_snapshot(models_dir=tmp_path)
    count = _nvml_gpu_count()
    if count is None:
        assert snapshot["gpus"] == []
    else:
        assert len(snapshot["gpus"]) == count
        for gpu in snapshot["gpus"]:
            assert gpu["name"] and gpu["vram_total_bytes"] > 0, gpu
    assert snapshot["arch"] == platform.machine() and snapshot["os"] == platform.system().lower()
    assert snapshot["ram_total_bytes"] >= snapshot["ram_available_bytes"] > 0
    assert snapshot["cpu_threads"] >= snapshot["cpu_cores"] >= 1
    assert snapshot["models_dir"] == str(tmp_path) and 0 < snapshot["disk_free_bytes"] <= snapshot["disk_total_bytes"]
    assert snapshot["ram_bandwidth_source"] == "typical" and snapshot["ram_bandwidth_gbps"] > 0
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert snapshot["cpu_model"] == hardware.cpu_model_from_cpuinfo(cpuinfo.read_text())

