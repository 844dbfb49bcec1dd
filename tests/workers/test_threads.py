"""How many threads llama.cpp gets: the CPUs the worker may use, not llama-cpp-python's half."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.hardware import hardware_snapshot, inference_threads, usable_cpus


def _cgroup(tmp_path: Path, line: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(line + "\n")
    return proc, root


def test_without_a_quota_every_cpu_of_the_affinity_set_is_used(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/app", {"app/cpu.max": "max 100000\n"})
    assert usable_cpus(proc_cgroup=proc, cgroup_root=root) == len(os.sched_getaffinity(0))


def test_a_cgroup_v2_quota_caps_the_threads_at_whole_cpus(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/app", {"app/cpu.max": "150000 100000\n"})
    assert usable_cpus(proc_cgroup=proc, cgroup_root=root) == 1


def test_a_parent_cgroup_v2_quota_applies_to_its_children(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/slice/app",
                         {"slice/cpu.max": "100000 100000\n", "slice/app/cpu.max": "max 100000\n"})
    assert usable_cpus(proc_cgroup=proc, cgroup_root=root) == 1


def test_a_container_sees_its_own_cgroup_at_the_mount_root(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/not/mounted/here", {"cpu.max": "100000 100000\n"})
    assert usable_cpus(proc_cgroup=proc, cgroup_root=root) == 1


def test_a_cgroup_v1_cfs_quota_caps_the_threads(tmp_path):
    proc, root = _cgroup(tmp_path, "4:cpu,cpuacct:/docker/abc",
                         {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
                          "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert usable_cpus(proc_cgroup=proc, cgroup_root=root) == 1


def test_a_cgroup_v1_without_quota_leaves_the_affinity_set(tmp_path):
    proc, root = _cgroup(tmp_path, "4:cpu,cpuacct:/", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                                       "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert usable_cpus(proc_cgroup=proc, cgroup_root=root) == len(os.sched_getaffinity(0))


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two CPUs to narrow the affinity set")
def test_the_affinity_set_of_the_process_is_honoured():
    code = "import os; os.sched_setaffinity(0, {0}); from workers.hardware import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "1"


def test_llmp_n_threads_overrides_the_default():
    assert inference_threads(3) == 3
    assert inference_threads(0) == usable_cpus()


def test_the_hardware_snapshot_shows_the_usable_cpus_and_the_chosen_threads():
    assert hardware_snapshot()["cpu_usable"] == hardware_snapshot()["inference_threads"] == usable_cpus()
    assert hardware_snapshot(n_threads=5)["inference_threads"] == 5
