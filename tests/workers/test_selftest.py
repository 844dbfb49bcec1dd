"""The start-up test decode, in a real child process: a pass, real signals, a hang, a bad file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from llmplatform import devstack
from node.config import node_config
from workers.bundled import bundled_model_path
from workers.runner import llama_options
from workers.selftest import CRASH_ENV, PROMPT, SelfTest, SelfTestResult, selftest_advice, selftest_model


def _run(model, *, timeout: float = 120) -> SelfTestResult:
    return SelfTest(model=model, options=llama_options(node_config()), timeout=timeout).result()


def test_the_bundled_model_passes_the_test_decode_in_a_child_process_and_records_its_time(monkeypatch):
    monkeypatch.delenv(CRASH_ENV, raising=False)
    assert selftest_model(node_config().models_dir) == bundled_model_path()
    result = _run(bundled_model_path())
    assert (result.tested, result.ok, result.error, result.exit_code, result.signal) == (True, True, "", 0, "")
    assert result.pid and result.pid != os.getpid()
    assert result.prompt_tokens > 3, f"{PROMPT!r} must be read as a multi-token prompt"
    assert result.completion_tokens >= 1 and result.stage == "done"
    assert 0 < result.load_s < result.elapsed_s and result.decode_s > 0
    assert "CPU" in result.system_info
    print(f"self-test of the bundled model: {result.elapsed_s:.2f} s in all (load {result.load_s:.2f} s, "
          f"decode {result.decode_s:.2f} s)")


@pytest.mark.parametrize("name", ["SIGSEGV", "SIGABRT"])
def test_a_child_killed_by_a_real_signal_is_reported_with_its_name_stage_and_stderr(monkeypatch, name):
    monkeypatch.setenv(CRASH_ENV, name)
    result = _run(bundled_model_path())
    assert (result.ok, result.signal, result.exit_code, result.stage) == (False, name, None, "loaded")
    assert f"crashed with {name} while decoding after" in result.error
    assert result.model == str(bundled_model_path()) and result.elapsed_s > 0
    # faulthandler's report, the child's last words on stderr
    assert any("Fatal Python error" in line for line in result.stderr_tail), result.stderr_tail
    assert "CPU" in result.system_info


def test_a_child_that_hangs_is_killed_at_the_timeout(monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "SIGSTOP")  # a real hang: the child stops itself
    result = _run(bundled_model_path(), timeout=4)
    assert (result.ok, result.timed_out, result.signal) == (False, True, "SIGKILL")
    assert "did not finish within 4 s (LLMP_SELFTEST_TIMEOUT), while decoding, and was killed" in result.error
    assert 4 <= result.elapsed_s < 30
    assert "LLMP_SELFTEST_TIMEOUT" in selftest_advice(result)


def test_a_hung_child_dies_with_the_worker_that_started_it(monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "SIGSTOP")
    worker = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from workers.bundled import bundled_model_path; "
         "from workers.selftest import SelfTest; "
         "test = SelfTest(model=bundled_model_path(), options={'n_ctx': 512}, timeout=600); "
         "print(test.pid, flush=True); time.sleep(600)"],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(worker.stdout.readline()))
        devstack.wait_until(lambda: child.status() == psutil.STATUS_STOPPED, timeout=60, what="the child hung")
    finally:
        worker.kill()
        worker.wait()
    devstack.wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=10,
                        what="the hung child gone with its worker")


def test_a_file_llama_cpp_cannot_load_fails_with_its_exit_code_and_error(tmp_path, monkeypatch):
    monkeypatch.delenv(CRASH_ENV, raising=False)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file\n" * 100)
    result = _run(broken)
    assert (result.ok, result.signal, result.exit_code, result.stage) == (False, "", 1, "failed")
    assert result.error.startswith("the test decode of broken.gguf failed: ")
    assert result.stderr_tail


def test_with_no_model_the_node_is_not_tested_and_says_so():
    result = SelfTest(model=None, options={}, timeout=1).result()
    assert (result.tested, result.ok, result.error) == (False, True, "")
    assert "not tested" in result.note


def test_the_advice_for_a_segfault_names_the_amx_bug_only_when_llama_cpp_has_amx():
    crashed = dict(tested=True, ok=False, signal="SIGSEGV", error="the test decode of m.gguf crashed with SIGSEGV")
    amx = selftest_advice(SelfTestResult(**crashed, system_info="CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |"))
    assert "llama.cpp#20824" in amx and "make clean && make install" in amx
    other = selftest_advice(SelfTestResult(**crashed, system_info="CPU : AVX2 = 1 | REPACK = 1 |"))
    assert "20824" not in other and "health_detail" in other
