"""Benchmark: one stream through the platform versus llama.cpp's own llama-server at its best.

The peer is ``llama-server`` built from the same llama.cpp sources and with the same build
configuration as our library (tools/llama_build.py), one slot, with its thread count tuned:
every count from 1 to the usable CPUs is tried and the fastest kept. The platform runs with
the defaults of ``make run`` (a real worker node and ASGI server), streamed to the official
openai client. Same model, prompts and sampling (temperature 0); runs alternate between the
two so drift in machine load hits both alike.

For the record it also times llama-cpp-python in process with its own default threads
(half the CPUs for decoding), the default the platform used before: not a peer.

Results go to bench/results/single_stream_vs_llama_server.json.

    .venv/bin/python bench/single_stream_vs_llama_server.py [--repeats 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PROMPTS, machine, measure, percentile, platform_prepare, summary  # noqa: E402


def llama_server_start(binary: Path, model: Path, *, threads: int, n_ctx: int, log_dir: Path, slots: int = 1):
    from llmplatform import devstack

    port = devstack.free_port()
    log = open(log_dir / f"llama-server-t{threads}-np{slots}.log", "wb")
    process = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx * slots), "-np", str(slots),
                                "--no-webui"], stdout=log, stderr=subprocess.STDOUT)
    import httpx

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


STREAMS = 8


def concurrent_streams(run, streams: int, rounds: int = 2) -> dict:
    """``streams`` requests at once, ``rounds`` times: aggregate completion tokens/s and TTFT."""
    from concurrent.futures import ThreadPoolExecutor

    samples, wall = [], 0.0
    with ThreadPoolExecutor(streams) as pool:
        for _ in range(rounds):
            started = time.perf_counter()
            samples += list(pool.map(run, [PROMPTS[i % len(PROMPTS)] for i in range(streams)]))
            wall += time.perf_counter() - started
    ttfts = [sample["ttft_ms"] for sample in samples]
    return {"streams": streams, "requests": len(samples),
            "aggregate_tokens_per_s": sum(sample["tokens"] for sample in samples) / wall,
            "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p95_ms": percentile(ttfts, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "single_stream_vs_llama_server.json"))
    args = parser.parse_args()
    data, key = platform_prepare()
    import llama_cpp
    import openai
    from django.conf import settings

    from llmplatform import devstack
    from tools import llama_build
    from workers.bundled import bundled_model_path
    from workers.hardware import inference_threads, usable_cpus

    bin_dir = llama_build.build_server()
    model_file = bundled_model_path()
    log_dir = data / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "seed": 1}
    model = settings.LLMP_DEFAULT_MODEL_ID

    def streamer(client: openai.OpenAI, name: str):
        return lambda prompt: measure(lambda: client.chat.completions.create(
            model=name, stream=True, messages=[{"role": "user", "content": prompt}], **sampling))

    # 1. Tune the peer: the fastest thread count on this machine.
    tuning = {}
    for threads in range(1, usable_cpus() + 1):
        process, url = llama_server_start(bin_dir / "llama-server", model_file, threads=threads,
                                          n_ctx=settings.LLMP_N_CTX, log_dir=log_dir)
        try:
            run = streamer(openai.OpenAI(base_url=url, api_key="none", max_retries=0), model)
            run("warm up")
            tuning[threads] = summary([run(prompt) for prompt in PROMPTS[:3]])["tokens_per_s"]
        finally:
            process.terminate()
            process.wait()
    best_threads = max(tuning, key=tuning.get)
    print(f"llama-server tokens/s by threads: {tuning}; using -t {best_threads}", flush=True)

    # 2. The peer at its best and the platform at its defaults, alternating.
    peer, peer_url = llama_server_start(bin_dir / "llama-server", model_file, threads=best_threads,
                                        n_ctx=settings.LLMP_N_CTX, log_dir=log_dir)
    stack = devstack.stack_start("bench", env=devstack.child_env(), log_dir=log_dir)
    try:
        runs = {"llama_server": streamer(openai.OpenAI(base_url=peer_url, api_key="none", max_retries=0), model),
                "platform": streamer(openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0),
                                     model)}
        for run in runs.values():
            run("warm up")
        samples: dict[str, list[dict]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for index, prompt in enumerate(PROMPTS):
                order = list(runs.items())
                if (repeat + index) % 2:
                    order.reverse()
                for name, run in order:
                    samples[name].append({"prompt": index, **run(prompt)})
        concurrent = {"platform": concurrent_streams(runs["platform"], STREAMS)}
    finally:
        stack.stop()
        peer.terminate()
        peer.wait()
    # 2b. STREAMS at once: llama-server with as many slots (its continuous batching), the platform as is.
    peer, peer_url = llama_server_start(bin_dir / "llama-server", model_file, threads=best_threads,
                                        n_ctx=settings.LLMP_N_CTX, log_dir=log_dir, slots=STREAMS)
    try:
        peer_run = streamer(openai.OpenAI(base_url=peer_url, api_key="none", max_retries=0), model)
        peer_run("warm up")
        concurrent["llama_server"] = concurrent_streams(peer_run, STREAMS)
    finally:
        peer.terminate()
        peer.wait()

    # 3. For the record: llama-cpp-python in process at its own default threads (the old default).
    llm = llama_cpp.Llama(model_path=str(model_file), n_ctx=settings.LLMP_N_CTX, n_gpu_layers=0, verbose=False)
    old_default_threads = llm.context_params.n_threads
    samples["in_process_llama_cpp_python_default_threads"] = [
        {"prompt": index, **measure(lambda: llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], stream=True, top_k=40, top_p=1.0, min_p=0.0,
            repeat_penalty=1.0, **sampling))}
        for index, prompt in enumerate(PROMPTS)]

    results = {name: summary(values) for name, values in samples.items()}
    peer_summary, ours = results["llama_server"], results["platform"]
    result = {
        "benchmark": "single_stream_vs_llama_server",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "build": {"id": llama_build.build_id(), "variant": llama_build.DEFAULT_VARIANT,
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()},
        "model": model, "prompts": len(PROMPTS), "repeats": args.repeats, "sampling": sampling,
        "llama_server": {"threads": best_threads, "tokens_per_s_by_threads": tuning, "slots": 1, **peer_summary},
        "platform": {"threads": inference_threads(settings.LLMP_N_THREADS), **ours},
        "in_process_llama_cpp_python_default_threads": {
            "threads": old_default_threads, **results["in_process_llama_cpp_python_default_threads"]},
        "concurrent": concurrent,
        "ratios": {f"aggregate_tokens_per_s_{STREAMS}_streams": concurrent["platform"]["aggregate_tokens_per_s"]
                   / concurrent["llama_server"]["aggregate_tokens_per_s"],
                   f"ttft_p50_{STREAMS}_streams": concurrent["platform"]["ttft_p50_ms"]
                   / concurrent["llama_server"]["ttft_p50_ms"],
                   "tokens_per_s": ours["tokens_per_s"] / peer_summary["tokens_per_s"],
                   "ttft_p50": ours["ttft_p50_ms"] / peer_summary["ttft_p50_ms"]},
        "samples": samples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
