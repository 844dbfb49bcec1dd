"""A trial load of a new GGUF file with llama.cpp, in a child process, before the model is registered.

The header validator (``workers.gguf``) bounds what it can see in the header, but llama.cpp
checks a great deal more while it loads a file (the vocabulary, every tensor's shape, the
compute graph), and some of those checks abort the process (``GGML_ASSERT``) instead of failing
the load. So a new file is loaded once in a child: its weights memory-mapped, its vocabulary, a
context of a few positions and one decoded token, on the CPU. A refusal, an abort, a crash, a
hang or a runaway allocation ends only the child; ``trial_load`` reports it as a reason fit for
the uploader (no server paths in it), never as an exception or a crash of the caller.

The child is ``python -m workers.trial_load PATH --address-space BYTES --cpu-seconds N``. It
limits its own CPU time (``RLIMIT_CPU``) and core dumps (none), loads llama.cpp's libraries, and
then, before it opens the file, its address space (``RLIMIT_AS``): what it holds at that moment
plus ``BYTES``, so the limit bounds what the file makes llama.cpp map and allocate whatever the
size of the build's libraries (a CUDA build's are large). The parent kills it at the wall-clock
limit, and it dies with its parent. It sees no GPU (``CUDA_VISIBLE_DEVICES`` is empty), so a trial
load never touches a GPU's memory. It writes one JSON object per line to stdout
as it gets further (``started``, ``loaded``, ``context``, ``done``, or ``failed``), so a child that
dies still says how far it got; llama.cpp's error lines and assertion messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from workers.selftest import child_report, signal_name

#: The time a trial load gets for every byte of the file on top of its base limit: llama.cpp reads
#: the whole mapping in (MAP_POPULATE), so a large file needs the time to come off a slow disk.
SECONDS_PER_BYTE = 1 / 100e6
#: Address space a trial load may use besides twice the file (its mapping, and the copy llama.cpp
#: makes of weights it repacks for the CPU) and besides the interpreter with llama.cpp's libraries:
#: the tiny context, its compute buffers and room to spare.
DEFAULT_EXTRA_MEMORY_BYTES = 1 << 30
CONTEXT_POSITIONS = 32
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_REASON_LINE = re.compile(r"GGML_ASSERT|GGML_ABORT|error loading model|what\(\)|fatal error|failed to|invalid|"
                          r"wrong|missing|unknown|error", re.IGNORECASE)
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\\/\s:'\"()]+)+[\\/]([^\\/\s:'\"()]+)")
_FUNCTION_PREFIX = re.compile(r"^[a-z_]+: (?=error)")  # "llama_model_load: error loading model: ..."
_OUT_OF_MEMORY = re.compile(r"bad_alloc|cannot allocate|failed to allocate|out of memory|MemoryError|"
                            r"failed to map segment|mem_buffer != NULL", re.IGNORECASE)
_STAGE_WORDS = {"": "starting", "started": "loading the model", "loaded": "creating a context",
                "context": "decoding a token", "done": "closing the model"}
MAX_REASON_CHARS = 400


@dataclass(frozen=True)
class TrialLoadResult:
    """How a trial load went. ``reason`` (empty when it passed) names no path on this machine."""

    ok: bool
    reason: str = ""
    stage: str = ""  # the last stage the child reported
    signal: str = ""  # the signal that ended the child (SIGABRT, SIGSEGV, SIGKILL, ...), if one did
    exit_code: int | None = None
    timed_out: bool = False
    elapsed_s: float = 0.0
    time_limit_s: float = 0.0
    address_space_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def trial_limits(*, file_size: int, timeout: float, extra_memory_bytes: int) -> tuple[float, int]:
    """The wall-clock seconds and the address-space bytes (on top of the loaded libraries) a trial load
    of a file this size gets."""
    return timeout + file_size * SECONDS_PER_BYTE, 2 * file_size + extra_memory_bytes


def trial_load(path: str | Path, *, timeout: float, extra_memory_bytes: int = DEFAULT_EXTRA_MEMORY_BYTES
               ) -> TrialLoadResult:
    """Load ``path`` with llama.cpp in a limited child process and decode one token; never raises for
    what the file does to llama.cpp (see the module docstring and ``trial_limits``)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return TrialLoadResult(ok=False, reason=f"the file cannot be read ({exc.strerror or exc})")
    time_limit, address_space = trial_limits(file_size=size, timeout=timeout, extra_memory_bytes=extra_memory_bytes)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GGML_NO_BACKTRACE": "1", "MALLOC_ARENA_MAX": "2",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.trial_load", str(path), "--address-space", str(address_space),
             "--cpu-seconds", str(int(time_limit) + 1), "--parent-pid", str(os.getpid())],
            cwd=_PACKAGE_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        return TrialLoadResult(ok=False, reason=f"the trial load could not start ({exc.strerror or exc})")
    try:
        out, err = process.communicate(timeout=time_limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        timed_out = True
    except BaseException:
        process.kill()
        process.wait()
        raise
    return _outcome(path=path, returncode=process.returncode, timed_out=timed_out, stdout=out, stderr=err,
                    elapsed=time.monotonic() - started, time_limit=time_limit, address_space=address_space)


def scrub_paths(text: str) -> str:
    """``text`` with every absolute file path reduced to its last component."""
    return _PATH.sub(r"\1", text)


def _detail(stderr: str, reported_error: str) -> str:
    """The most telling line llama.cpp (or the child) wrote: an assertion, a load error, an exception."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    chosen = next((line for line in lines if "GGML_ASSERT" in line or "GGML_ABORT" in line), "")
    chosen = chosen or next((line for line in lines if "error loading model" in line), "")
    chosen = chosen or reported_error or next((line for line in reversed(lines) if _REASON_LINE.search(line)), "")
    chosen = " ".join(_FUNCTION_PREFIX.sub("", scrub_paths(chosen)).split())
    return chosen if len(chosen) <= MAX_REASON_CHARS else chosen[: MAX_REASON_CHARS - 3] + "..."


def _outcome(*, path: Path, returncode: int, timed_out: bool, stdout: bytes, stderr: bytes, elapsed: float,
             time_limit: float, address_space: int) -> TrialLoadResult:
    reported = child_report(stdout)
    stage = str(reported.get("stage", ""))
    where = str(reported.get("during") or _STAGE_WORDS.get(stage, "starting"))
    err = stderr.decode("utf-8", errors="replace")
    detail = _detail(err, str(reported.get("error", "")))
    died_by = signal_name(-returncode) if returncode < 0 and not timed_out else ""
    ok = returncode == 0 and stage == "done" and not timed_out
    if ok:
        reason = ""
    elif timed_out:
        reason = f"loading it with llama.cpp took longer than {time_limit:.3g} s and was stopped ({where})"
    elif _OUT_OF_MEMORY.search(detail) or (died_by == "SIGKILL" and not detail):
        reason = (f"llama.cpp needed more memory than a trial load may use ({address_space >> 20} MiB of address "
                  f"space beyond its libraries) while {where}")
    elif died_by == "SIGXCPU":
        reason = f"llama.cpp used more than {int(time_limit) + 1} s of CPU time while {where}"
    elif died_by:
        reason = f"llama.cpp crashed ({died_by}) while {where}"
    elif stage == "failed" or returncode:
        reason = f"llama.cpp could not load it (while {where})"
    else:
        reason = f"the trial load ended before it finished ({where})"
    if detail and not ok and not timed_out:
        reason = f"{reason}: {detail}"
    reason = scrub_paths(reason).replace(str(path), path.name)
    return TrialLoadResult(ok=ok, reason=reason, stage=stage, signal=died_by,
                           exit_code=returncode if returncode >= 0 else None, timed_out=timed_out,
                           elapsed_s=round(elapsed, 3), time_limit_s=round(time_limit, 3),
                           address_space_bytes=address_space)


# --- the child ---------------------------------------------------------------------------------


def _report(**entry) -> None:
    print(json.dumps(entry), flush=True)


def _limit_self(*, cpu_seconds: int, parent_pid: int) -> None:
    import resource

    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent_pid and os.getppid() != parent_pid:  # the parent died before the line above ran
        os._exit(1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


def _address_space_now() -> int:
    """Bytes of address space this process holds (VmSize), 0 where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _limit_address_space(extra: int) -> None:
    import resource

    limit = _address_space_now() + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


_GGML_LOG_LEVEL_ERROR, _GGML_LOG_LEVEL_CONT = 4, 5  # ggml.h's enum ggml_log_level in the vendored llama.cpp
_MAX_LOG_BYTES = 64 << 10  # a hostile file must not make the parent read an endless log


def _log_to_stderr(llama_cpp) -> object:
    """Send llama.cpp's errors to stderr, where the parent looks for the reason (the first 64 KiB).

    Our own callback: llama-cpp-python's maps ggml's newer log levels wrongly and hides errors.
    """
    state = {"shown": False, "written": 0}

    @llama_cpp.llama_log_callback
    def callback(level, text, _user_data):
        if level != _GGML_LOG_LEVEL_CONT:
            state["shown"] = level == _GGML_LOG_LEVEL_ERROR
        if state["shown"] and state["written"] < _MAX_LOG_BYTES:
            line = text.decode("utf-8", errors="replace")
            state["written"] += len(line)
            sys.stderr.write(line)
            sys.stderr.flush()

    llama_cpp.llama_log_set(callback, None)
    return callback  # kept referenced for as long as llama.cpp may call it


def _load(llama_cpp, path: str) -> None:
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        _report(stage="failed", during="loading the model")
        sys.exit(2)
    _report(stage="loaded")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = CONTEXT_POSITIONS
    cparams.n_batch = cparams.n_ubatch = 1
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = 1
    context = llama_cpp.llama_init_from_model(model, cparams)
    if not context:
        _report(stage="failed", during="creating a context")
        sys.exit(2)
    _report(stage="context")
    vocab = llama_cpp.llama_model_get_vocab(model)
    if llama_cpp.llama_vocab_n_tokens(vocab) < 1:
        _report(stage="failed", during="reading the vocabulary", error="the vocabulary has no tokens")
        sys.exit(2)
    token = llama_cpp.llama_vocab_bos(vocab)
    tokens = (llama_cpp.llama_token * 1)(token if token >= 0 else 0)
    status = llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(tokens, 1))
    if status != 0:
        _report(stage="failed", during="decoding a token", error=f"llama_decode returned {status}")
        sys.exit(2)
    _report(stage="done")
    llama_cpp.llama_free(context)
    llama_cpp.llama_model_free(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.trial_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the GGUF file to load")
    parser.add_argument("--address-space", type=int, required=True,
                        help="bytes of address space the load may add (RLIMIT_AS, over the loaded libraries)")
    parser.add_argument("--cpu-seconds", type=int, required=True, help="RLIMIT_CPU in seconds")
    parser.add_argument("--parent-pid", type=int, default=0, help="die with this process")
    args = parser.parse_args(argv)
    _limit_self(cpu_seconds=args.cpu_seconds, parent_pid=args.parent_pid)
    import llama_cpp

    _callback = _log_to_stderr(llama_cpp)  # noqa: F841 (kept alive while llama.cpp runs)
    llama_cpp.llama_backend_init()
    _limit_address_space(args.address_space)  # from here on, only what the file makes llama.cpp take
    _report(stage="started")
    try:
        _load(llama_cpp, args.path)
    except MemoryError:
        _report(stage="failed", error="MemoryError")
        return 3
    except Exception as exc:
        _report(stage="failed", error=f"{type(exc).__name__}: {exc}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
