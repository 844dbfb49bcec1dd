"""The test decode a worker runs at start-up, before its node takes traffic.

A llama.cpp build can crash on a machine the first time it reads a real prompt: on Intel Xeons
with AMX, llama.cpp's AMX kernel segfaults on the first multi-token prompt (llama.cpp#20824).
So before its node goes online, a worker loads one model with the options every model of the
node is loaded with (``workers.runner.llama_options``), reads a multi-token prompt and
generates a few tokens, in a child process: a crash, abort or hang there ends the child, not
the worker, and the worker registers its node as unhealthy with what happened.

The child is ``python -m workers.selftest --model PATH --options JSON``. It writes one JSON
object per line to stdout as it gets further (``started``, ``loaded``, ``done``, or ``failed``
for a Python exception), so a child that dies still leaves how far it got.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workers.bundled import BundledModelMissing, bundled_model_path

PROMPT = "Hello there, how are you"
GENERATE_TOKENS = 3  # the prompt batch, then two one-token decodes: both paths, kept short for start-up time
STDERR_TAIL_LINES = 20
# For tests only: the child kills itself with this signal (e.g. SIGSEGV) once the model is loaded.
CRASH_ENV = "LLMP_SELFTEST_CRASH"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_AMX_ON = re.compile(r"\bAMX_INT8\s*=\s*1\b")


@dataclass(frozen=True)
class SelfTestResult:
    """What the test decode found. ``error`` is empty when it passed or when nothing was tested."""

    tested: bool
    ok: bool
    model: str = ""
    pid: int | None = None  # the child's
    elapsed_s: float = 0.0
    error: str = ""
    signal: str = ""  # the signal that ended the child (SIGSEGV, SIGABRT, SIGKILL, ...), if one did
    exit_code: int | None = None
    timed_out: bool = False
    stage: str = ""  # the last stage the child reported: started, loaded, done or failed
    stderr_tail: list[str] = field(default_factory=list)
    system_info: str = ""
    load_s: float | None = None
    decode_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def selftest_model(models_dir: Path) -> Path | None:
    """The model to test: the bundled one, else the smallest ``.gguf`` in ``models_dir``, else None."""
    try:
        return bundled_model_path()
    except BundledModelMissing:
        pass
    try:
        files = [path for path in models_dir.glob("*.gguf") if path.is_file()]
    except OSError:
        return None
    return min(files, key=lambda path: (path.stat().st_size, path.name)) if files else None


class SelfTest:
    """A test decode running in a child process from construction on; ``result()`` waits for it.

    Starting it early lets the worker do its other start-up work meanwhile. The child gets at
    most ``timeout`` seconds from its start, then it is killed. It also dies with the thread
    that started it (Linux), so start it on one that outlives the test, e.g. the main thread.
    """

    def __init__(self, *, model: Path | None, options: dict, timeout: float) -> None:
        self.model, self.timeout = model, timeout
        self.pid: int | None = None  # the child's, while it runs
        self._result: SelfTestResult | None = None
        self._thread: threading.Thread | None = None
        if model is None:
            self._result = SelfTestResult(
                tested=False, ok=True, note="not tested: no bundled model and no .gguf file in the models "
                                            "directory, so the node is online without a test decode")
            return
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers.selftest", "--model", str(model), "--options", json.dumps(options),
                 "--parent-pid", str(os.getpid())],
                cwd=_PACKAGE_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            self._result = SelfTestResult(tested=True, ok=False, model=str(model),
                                          error=f"the test decode could not start: {exc}")
            return
        self.pid = process.pid
        self._thread = threading.Thread(target=self._wait, args=(process, started), name="node-selftest",
                                        daemon=True)
        self._thread.start()

    def _wait(self, process: subprocess.Popen, started: float) -> None:
        try:
            try:
                out, err = process.communicate(timeout=self.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
                timed_out = True
            self._result = _outcome(model=self.model, timeout=self.timeout, pid=process.pid,
                                    returncode=process.returncode, timed_out=timed_out,
                                    elapsed=time.monotonic() - started, stdout=out, stderr=err)
        except Exception as exc:  # never leave result() without an answer
            process.kill()
            self._result = SelfTestResult(tested=True, ok=False, model=str(self.model), pid=process.pid,
                                          error=f"the test decode could not be watched: {exc}")

    def result(self) -> SelfTestResult:
        if self._thread is not None:
            self._thread.join()
        assert self._result is not None
        return self._result


def signal_name(number: int) -> str:
    """A signal's name (``SIGSEGV``), for saying how a child process died."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def child_report(stdout: bytes) -> dict:
    """What a checking child process reported: every JSON object it printed, one per line, merged in order
    (a child that died part way reported the stages it reached)."""
    reported: dict = {}
    for line in stdout.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            reported.update(entry)
    return reported


def _outcome(*, model: Path, timeout: float, pid: int, returncode: int, timed_out: bool, elapsed: float,
             stdout: bytes, stderr: bytes) -> SelfTestResult:
    reported = child_report(stdout)
    stage = reported.get("stage", "")
    tail = [line for line in stderr.decode("utf-8", errors="replace").splitlines() if line.strip()]
    tail = tail[-STDERR_TAIL_LINES:]
    ok = returncode == 0 and stage == "done" and not timed_out
    died_by = signal_name(-returncode) if returncode < 0 else ""
    where = {"": "before it reported anything", "started": "while loading the model",
             "loaded": "while decoding", "done": "after decoding, while closing the model"}.get(stage, "")
    subject = f"the test decode of {model.name}"
    if ok:
        error = ""
    elif timed_out:
        error = f"{subject} did not finish within {timeout:g} s (LLMP_SELFTEST_TIMEOUT), {where}, and was killed"
    elif died_by:
        error = f"{subject} crashed with {died_by} {where} after {elapsed:.1f} s"
    elif stage == "failed":
        error = f"{subject} failed: {reported.get('error', 'unknown error')} (exit code {returncode})"
    else:
        error = f"{subject} exited with code {returncode} {where} after {elapsed:.1f} s"
    error = " ".join(error.split())
    return SelfTestResult(
        tested=True, ok=ok, model=str(model), pid=pid, elapsed_s=round(elapsed, 3), error=error, signal=died_by,
        exit_code=returncode if returncode >= 0 else None, timed_out=timed_out, stage=stage,
        stderr_tail=[] if ok else tail, system_info=reported.get("system_info", ""),
        load_s=reported.get("load_s"), decode_s=reported.get("decode_s"),
        prompt_tokens=reported.get("prompt_tokens", 0), completion_tokens=reported.get("completion_tokens", 0),
        text=reported.get("text", ""))


def selftest_advice(result: SelfTestResult) -> str:
    """What an operator can do about a failed test decode; empty when it did not fail."""
    if result.ok:
        return ""
    if result.signal == "SIGSEGV" and _AMX_ON.search(result.system_info):
        return ("llama.cpp's system info lists AMX_INT8 = 1, and llama.cpp's AMX kernel crashes with SIGSEGV on "
                "the first multi-token prompt (llama.cpp#20824): rebuild with `make clean && make install` "
                "(tools/llama_build.py builds without AMX), then restart the worker")
    if result.signal == "SIGKILL" and not result.timed_out:
        return ("something outside the worker killed the test decode, often the kernel's out-of-memory killer "
                "(see dmesg); lower LLMP_N_CTX or free memory, then restart the worker")
    if result.timed_out:
        return ("raise LLMP_SELFTEST_TIMEOUT if this machine is only slow to load the model, then restart the "
                "worker")
    return "see the node's health_detail (last stderr lines, llama.cpp system info), then restart the worker"


# --- the child ---------------------------------------------------------------------------------


def _report(**entry) -> None:
    print(json.dumps(entry), flush=True)


def _system_info(llama_cpp) -> str:
    return " ".join(llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").split())


def _die_with_parent(parent_pid: int) -> None:
    """A worker killed mid-test must not leave its test decode running (perhaps hung) behind it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent_pid and os.getppid() != parent_pid:  # the worker died before the line above ran
        os._exit(1)


class _Collect:
    """The test decode's output, kept in memory."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.usage: dict = {}
        self.error = None

    def text(self, text: str) -> None:
        self.pieces.append(text)

    def finish(self, finish_reason: str, usage: dict, timings: dict) -> None:
        self.usage = usage

    def fail(self, error) -> None:
        self.error = error

    def cancel(self, tokens_emitted: int) -> None:
        pass

    def cancelled(self) -> bool:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the GGUF file to load")
    parser.add_argument("--options", default="{}", help="n_ctx, n_gpu_layers, n_threads as JSON")
    parser.add_argument("--parent-pid", type=int, default=0, help="die with this process (the worker)")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    faulthandler.enable()  # a crash writes the Python stack to stderr before the process dies of it
    started = time.monotonic()
    import llama_cpp
    from llama_cpp import _logger

    from workers.engine.batch import BatchEngine, Sequence
    from workers.engine.model import LoadedModel, backend_init
    from workers.messages import SamplingParams

    _report(stage="started", system_info=_system_info(llama_cpp))
    try:
        options = json.loads(args.options)
        backend_init()
        _logger.set_verbose(True)  # llama.cpp's own log lines end up in the stderr tail of a failure
        model = LoadedModel(args.model, n_gpu_layers=options.get("n_gpu_layers", 0))
        engine = BatchEngine(model, n_slots=1, n_ctx_per_seq=options.get("n_ctx", 512),
                             n_threads=options.get("n_threads", 1))
        loaded = time.monotonic()
        _report(stage="loaded", load_s=round(loaded - started, 3), system_info=_system_info(llama_cpp))
        if crash := os.environ.get(CRASH_ENV):
            os.kill(os.getpid(), signal.Signals[crash])
        tokens = model.tokenize(PROMPT, add_special=True, parse_special=False)
        sink = _Collect()
        engine.add(Sequence(prompt=tokens, sampling=SamplingParams(max_tokens=GENERATE_TOKENS, temperature=0.0),
                            sink=sink))
        while engine.busy():
            engine.step()
        if sink.error is not None:
            raise RuntimeError(sink.error.message)
        _report(stage="done", decode_s=round(time.monotonic() - loaded, 3), prompt_tokens=len(tokens),
                completion_tokens=sink.usage.get("completion_tokens", 0), text="".join(sink.pieces))
        engine.close()
        model.close()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        _report(stage="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
