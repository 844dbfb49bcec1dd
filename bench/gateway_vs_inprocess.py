"""Benchmark: streaming through the gateway versus llama-cpp-python in process.

Same model, same prompts, same sampling, same threads, one run. The in-process baseline is
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
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PROMPTS, machine, measure, platform_prepare, summary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway_vs_inprocess.json"))
    args = parser.parse_args()
    data, key = platform_prepare(LLMP_POOL_SLOTS_PER_MODEL="1")
    import llama_cpp
    import openai
    from django.conf import settings

    from llmplatform import devstack
    from workers.bundled import bundled_model_path
    from workers.hardware import inference_threads

    stack = devstack.stack_start("bench", env=devstack.child_env(), log_dir=data / "logs")
    try:
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        # The same threads the worker uses, so that the ratio is the gateway's overhead alone
        # (bench/single_stream_vs_llama_server.py compares against llama.cpp's own server).
        threads = inference_threads(settings.LLMP_N_THREADS)
        llm = llama_cpp.Llama(model_path=str(bundled_model_path()), n_ctx=settings.LLMP_N_CTX, n_gpu_layers=0,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
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
            "machine": machine(),
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
