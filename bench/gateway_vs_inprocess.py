"""Benchmark: streaming through the gateway versus llama-cpp-python in process.

Same model, same prompts, same sampling, one run. The in-process baseline is
``Llama.create_chat_completion(stream=True)`` in this process; the gateway run starts a real
worker node and ASGI server (as ``make run`` does) and streams with the official openai
client. Runs alternate between the two so drift in machine load hits both alike.

Reports time to first token (p50/p95) and tokens/s, their ratios, and checks the targets:
gateway tokens/s >= 0.95x in-process, added time to first token <= 25 ms at p50.
Results go to bench/results/gateway_vs_inprocess.json.

    .venv/bin/python bench/gateway_vs_inprocess.py [--repeats 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_DATA = tempfile.mkdtemp(prefix="llmp-bench-")
os.environ.update({
    "DJANGO_SETTINGS_MODULE": "llmplatform.settings",
    "LLMP_DATA_DIR": _DATA,
    "DATABASE_URL": f"sqlite:///{_DATA}/bench.sqlite3",
    "LLMP_REDIS_PREFIX": f"llmpbench-{uuid.uuid4().hex[:6]}",
    "LLMP_POOL_SLOTS_PER_MODEL": "1",
})

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "What are three tips for learning a new language?",
    "Describe how a bicycle works.",
    "Give me a recipe for pancakes.",
    "What is the difference between weather and climate?",
]


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
    for chunk in open_stream():
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
            "total_s": stamps[-1] - started}


def summary(samples: list[dict]) -> dict:
    ttfts = [s["ttft_ms"] for s in samples]
    tokens = sum(s["tokens"] - 1 for s in samples)
    decode_time = sum((s["tokens"] - 1) / s["tokens_per_s"] for s in samples if s["tokens_per_s"])
    return {"runs": len(samples), "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p95_ms": percentile(ttfts, 0.95),
            "tokens_per_s": tokens / decode_time, "tokens_per_s_median": statistics.median(
                s["tokens_per_s"] for s in samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway_vs_inprocess.json"))
    args = parser.parse_args()

    import django

    django.setup()
    import llama_cpp
    import openai
    from django.conf import settings
    from django.core.management import call_command

    from apps.gateway.services import api_key_create
    from llmplatform import devstack
    from workers.bundled import bundled_model_path

    call_command("migrate", verbosity=0)
    _, key = api_key_create(name="bench")
    stack = devstack.stack_start("bench", env=devstack.child_env(), log_dir=Path(_DATA) / "logs")
    try:
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        llm = llama_cpp.Llama(model_path=str(bundled_model_path()), n_ctx=settings.LLMP_N_CTX, n_gpu_layers=0,
                              verbose=False)
        model = settings.LLMP_DEFAULT_MODEL_ID
        sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "seed": 1}

        def in_process(prompt: str) -> dict:
            return measure(lambda: llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], stream=True, top_k=40, top_p=1.0, min_p=0.0,
                repeat_penalty=1.0, **sampling))

        def gateway(prompt: str) -> dict:
            return measure(lambda: client.chat.completions.create(
                model=model, stream=True, messages=[{"role": "user", "content": prompt}], **sampling))

        in_process("warm up")
        gateway("warm up")
        samples: dict[str, list[dict]] = {"in_process": [], "gateway": []}
        for repeat in range(args.repeats):
            for index, prompt in enumerate(PROMPTS):
                order = [("in_process", in_process), ("gateway", gateway)]
                if (repeat + index) % 2:
                    order.reverse()
                for name, run in order:
                    samples[name].append({"prompt": index, **run(prompt)})
        base, ours = summary(samples["in_process"]), summary(samples["gateway"])
        result = {
            "benchmark": "gateway_vs_inprocess",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": host_platform.python_version(),
                        "llama_cpp_python": llama_cpp.__version__,
                        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                 capture_output=True, text=True).stdout.strip()},
            "model": model, "prompts": len(PROMPTS), "repeats": args.repeats, "sampling": sampling,
            "in_process": base, "gateway": ours,
            "ratios": {"tokens_per_s": ours["tokens_per_s"] / base["tokens_per_s"],
                       "ttft_p50": ours["ttft_p50_ms"] / base["ttft_p50_ms"],
                       "ttft_p95": ours["ttft_p95_ms"] / base["ttft_p95_ms"]},
            "added_ttft_ms": {"p50": ours["ttft_p50_ms"] - base["ttft_p50_ms"],
                              "p95": ours["ttft_p95_ms"] - base["ttft_p95_ms"],
                              # Each gateway run minus the in-process run of the same prompt and
                              # repeat, taken back to back: less exposed to drift in machine load.
                              "paired_p50": statistics.median(
                                  g["ttft_ms"] - i["ttft_ms"]
                                  for g, i in zip(samples["gateway"], samples["in_process"]))},
            "samples": samples,
        }
        result["targets"] = {
            "tokens_per_s_ratio_at_least_0.95": result["ratios"]["tokens_per_s"] >= 0.95,
            "added_ttft_p50_at_most_25ms": result["added_ttft_ms"]["p50"] <= 25.0,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("in_process", "gateway", "ratios", "added_ttft_ms", "targets")},
                         indent=2))
        print(f"saved {args.out}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
