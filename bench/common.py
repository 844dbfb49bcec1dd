"""What the benchmarks share: timing one stream of chat chunks and summarising many."""

from __future__ import annotations

import os
import platform as host_platform
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "What are three tips for learning a new language?",
    "Describe how a bicycle works.",
    "Give me a recipe for pancakes.",
    "What is the difference between weather and climate?",
]


def platform_prepare(**env: str) -> tuple[Path, str]:
    """A throwaway data directory, SQLite database and Redis prefix for this run (plus ``env``),
    with Django set up and migrated; returns the directory and a new API key."""
    data = Path(tempfile.mkdtemp(prefix="llmp-bench-"))
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "llmplatform.settings",
        "LLMP_DATA_DIR": str(data),
        "DATABASE_URL": f"sqlite:///{data}/bench.sqlite3",
        "LLMP_REDIS_PREFIX": f"llmpbench-{uuid.uuid4().hex[:6]}",
        **env,
    })
    import django

    django.setup()
    from django.core.management import call_command

    from apps.gateway.services import api_key_create

    call_command("migrate", verbosity=0)
    _, key = api_key_create(name="bench")
    return data, key


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = (len(ordered) - 1) * q
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def measure(open_stream) -> dict:
    """Time to first token and decode rate of one stream of chat chunks (one chunk per token).

    The clock starts before the stream is opened: the openai client returns only once the
    response headers arrive, which the gateway sends with the first token.
    """
    started = time.perf_counter()
    stamps: list[float] = []
    response_id = None
    for chunk in open_stream():
        response_id = response_id or (chunk.get("id") if isinstance(chunk, dict) else chunk.id)
        choices = chunk["choices"] if isinstance(chunk, dict) else chunk.choices
        if not choices:
            continue
        delta = choices[0]["delta"] if isinstance(chunk, dict) else choices[0].delta.model_dump()
        if delta.get("content"):
            stamps.append(time.perf_counter())
    ttft = stamps[0] - started
    decode = stamps[-1] - stamps[0]
    return {"ttft_ms": ttft * 1000, "tokens": len(stamps),
            "tokens_per_s": (len(stamps) - 1) / decode if decode > 0 else 0.0,
            "total_s": stamps[-1] - started, "id": response_id,
            "itl_ms": [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]}


def summary(samples: list[dict]) -> dict:
    ttfts = [s["ttft_ms"] for s in samples]
    tokens = sum(s["tokens"] - 1 for s in samples)
    decode_time = sum((s["tokens"] - 1) / s["tokens_per_s"] for s in samples if s["tokens_per_s"])
    return {"runs": len(samples), "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p95_ms": percentile(ttfts, 0.95),
            "tokens_per_s": tokens / decode_time, "tokens_per_s_median": statistics.median(
                s["tokens_per_s"] for s in samples)}


def machine() -> dict:
    import llama_cpp

    return {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "python": host_platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip()}


def llama_server_start(binary: Path, model: Path, *, threads: int, n_ctx: int, log_dir: Path, slots: int = 1,
                       env: dict[str, str] | None = None):
    """Start llama.cpp's own server (``slots`` parallel sequences of ``n_ctx`` each, with ``env`` added to its
    environment); returns it and its /v1 URL."""
    import httpx

    from llmplatform import devstack

    port = devstack.free_port()
    log = open(log_dir / f"llama-server-t{threads}-np{slots}.log", "wb")
    process = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx * slots), "-np", str(slots),
                                "--no-webui"], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited ({process.returncode}); see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("llama-server did not become healthy")
