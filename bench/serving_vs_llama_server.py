"""Benchmark: 1, 4, 8 and 16 concurrent streams through the platform versus llama-server -np 8.

In one run, on the same model and machine:

* llama.cpp's ``llama-server``, built from the llama.cpp sources the llama-cpp-python sdist
  vendors with our CPU flags (tools/llama_build.py, cached outside git), run as
  ``llama-server -m MODEL -np 8 -c <8 x LLMP_N_CTX> -t T``, at its best T: every thread count
  from 1 to the usable CPUs is tried on one stream and the fastest kept (on a machine where
  that is the node's own count, the two run alike);
* this gateway with the defaults ``make run`` uses (a real worker node, its runner process and the
  ASGI server), streamed to the official openai client;
* in-process single-sequence llama.cpp (llama-cpp-python's ``Llama``) at the same threads, one stream.

For each concurrency: aggregate completion tokens/s, TTFT p50/p95, inter-token latency p50/p99,
and for the gateway its own overhead: the client's TTFT minus the runner's (measured from the
moment the runner received the request, reported in the request's done event). Stream counts
alternate between the peer and the platform so drift in machine load hits both alike.

    .venv/bin/python bench/serving_vs_llama_server.py [--max-tokens 96] [--rounds 2]

Results go to bench/results/serving_vs_llama_server.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PROMPTS, llama_server_start, machine, measure, percentile, platform_prepare  # noqa: E402

STREAM_COUNTS = (1, 4, 8, 16)
PEER_SLOTS = 8
PEER_FULL_VOCABULARY = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}


def concurrency(run, streams: int, rounds: int) -> list[dict]:
    samples = []
    with ThreadPoolExecutor(streams) as pool:
        for round_index in range(rounds):
            started = time.perf_counter()
            batch = list(pool.map(run, [PROMPTS[(round_index * streams + i) % len(PROMPTS)] for i in range(streams)]))
            wall = time.perf_counter() - started
            samples.append({"wall_s": wall, "streams": batch})
    return samples


def summarise(rounds: list[dict]) -> dict:
    streams = [s for r in rounds for s in r["streams"]]
    ttfts = [s["ttft_ms"] for s in streams]
    itl = [gap for s in streams for gap in s["itl_ms"]]
    result = {"requests": len(streams),
              "aggregate_tokens_per_s": sum(s["tokens"] for s in streams) / sum(r["wall_s"] for r in rounds),
              "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p95_ms": percentile(ttfts, 0.95),
              "itl_p50_ms": percentile(itl, 0.5), "itl_p99_ms": percentile(itl, 0.99),
              "tokens_per_stream_per_s": sum(s["tokens_per_s"] for s in streams) / len(streams)}
    timed = [s for s in streams if s.get("runner_ttft_ms") is not None]
    if timed:
        overheads = [s["ttft_ms"] - s["runner_ttft_ms"] for s in timed]
        result["gateway_overhead_ttft_p50_ms"] = percentile(overheads, 0.5)
        result["gateway_overhead_ttft_p95_ms"] = percentile(overheads, 0.95)
        result["runner_ttft_p50_ms"] = percentile([s["runner_ttft_ms"] for s in timed], 0.5)
        result["runner_timings_found"] = len(timed)
    return result


def conversation_turns(client, model: str, sampling: dict, repeats: int = 3) -> dict:
    """TTFT of the first and the second turn of a conversation with a long system prompt (~1,500
    tokens): the second turn starts with everything the first one read, which a server can reuse."""
    first, second = [], []
    for repeat in range(repeats):
        system = f"Conversation {repeat} {time.time_ns()}. " + " ".join(
            f"Rule {i}: answer briefly, kindly and precisely, and never mention rule {i + 1}." for i in range(90))
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]
        answer: list[str] = []

        def stream(turn):
            def opened():
                for chunk in client.chat.completions.create(model=model, stream=True, messages=turn, **sampling):
                    if chunk.choices and chunk.choices[0].delta.content:
                        answer.append(chunk.choices[0].delta.content)
                    yield chunk
            return opened
        first.append(measure(stream(messages))["ttft_ms"])
        messages += [{"role": "assistant", "content": "".join(answer)}, {"role": "user", "content": "Another one."}]
        second.append(measure(stream(messages))["ttft_ms"])
    return {"turns": repeats, "first_turn_ttft_p50_ms": percentile(first, 0.5),
            "second_turn_ttft_p50_ms": percentile(second, 0.5), "first": first, "second": second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per stream count (1 stream: 6x as many)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_vs_llama_server.json"))
    args = parser.parse_args()
    data, key = platform_prepare()
    import llama_cpp
    import openai
    from django.conf import settings

    from llmplatform import devstack
    from tools import llama_build
    from workers.bundled import bundled_model_path
    from workers.engine.supervisor import RUNNER_OMP_SPINCOUNT
    from workers.hardware import inference_threads, usable_cpus

    threads = inference_threads(settings.LLMP_N_THREADS)
    bin_dir = llama_build.build_server()
    model_file = bundled_model_path()
    log_dir = data / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sampling = {"max_tokens": args.max_tokens, "temperature": 0.7, "seed": 7}
    model = settings.LLMP_DEFAULT_MODEL_ID

    def runner_ttft(response_id: str) -> float | None:
        """The runner's own TTFT for one of our requests, from its request history (written just after)."""
        from apps.gateway.models import RequestLog

        request_id = uuid.UUID(response_id.split("-", 1)[1])
        for _ in range(100):
            body = RequestLog.objects.filter(pk=request_id).values_list("response_body", flat=True).first()
            if body and body.get("timings"):
                return body["timings"].get("ttft_ms")
            time.sleep(0.02)
        return None

    def streamer(client: openai.OpenAI, *, ours: bool):
        # The same sampling on both sides: the OpenAI API's temperature sampling over the whole
        # vocabulary. llama-server would otherwise add its own defaults (top_k 40, top_p 0.95,
        # min_p 0.05), a different distribution that is also cheaper to sample.
        extra = {} if ours else {"extra_body": PEER_FULL_VOCABULARY}

        def run(prompt: str) -> dict:
            sample = measure(lambda: client.chat.completions.create(
                model=model, stream=True, messages=[{"role": "user", "content": prompt}], **sampling, **extra))
            if ours:
                sample["runner_ttft_ms"] = runner_ttft(sample["id"])
            return sample
        return run

    # The peer at its best: every thread count from 1 to the usable CPUs, with OpenMP's default wait and
    # with the short one our runners use (RUNNER_OMP_SPINCOUNT), the fastest single stream kept.
    tuning, settings_tried = {}, {}
    for candidate in range(1, usable_cpus() + 1):
        for wait in ("default", RUNNER_OMP_SPINCOUNT):
            env = {} if wait == "default" else {"GOMP_SPINCOUNT": wait}
            peer, peer_url = llama_server_start(bin_dir / "llama-server", model_file, threads=candidate,
                                                n_ctx=settings.LLMP_N_CTX, log_dir=log_dir, slots=PEER_SLOTS, env=env)
            try:
                run = streamer(openai.OpenAI(base_url=peer_url, api_key="none", max_retries=0), ours=False)
                run("warm up")
                name = f"t{candidate} spin {wait}"
                tuning[name] = summarise(concurrency(run, 1, 6))["aggregate_tokens_per_s"]
                settings_tried[name] = (candidate, env)
            finally:
                peer.terminate()
                peer.wait()
    best = max(tuning, key=tuning.get)
    peer_threads, peer_env = settings_tried[best]
    print(f"llama-server tokens/s by setting: {tuning}; using {best} (the node uses {threads} threads)", flush=True)
    peer, peer_url = llama_server_start(bin_dir / "llama-server", model_file, threads=peer_threads,
                                        n_ctx=settings.LLMP_N_CTX, log_dir=log_dir, slots=PEER_SLOTS, env=peer_env)
    stack = devstack.stack_start("bench", env=devstack.child_env(), log_dir=log_dir)
    results: dict = {"llama_server": {}, "platform": {}}
    raw: dict = {"llama_server": {}, "platform": {}}
    try:
        runs = {"llama_server": streamer(openai.OpenAI(base_url=peer_url, api_key="none", max_retries=0), ours=False),
                "platform": streamer(openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0),
                                     ours=True)}
        for run in runs.values():
            run("warm up")
        conversation = {}
        for name, url, api_key in (("llama_server", peer_url, "none"), ("platform", f"{stack.base_url}/v1", key)):
            extra = {} if name == "platform" else {"extra_body": PEER_FULL_VOCABULARY}
            conversation[name] = conversation_turns(openai.OpenAI(base_url=url, api_key=api_key, max_retries=0),
                                                    model, {**sampling, "max_tokens": 24, **extra})
            print(f"{name} conversation: {json.dumps(conversation[name])}", flush=True)
        for index, streams in enumerate(STREAM_COUNTS):
            order = list(runs.items()) if index % 2 == 0 else list(reversed(runs.items()))
            for name, run in order:
                rounds = args.rounds * (6 if streams == 1 else 1)
                raw[name][streams] = concurrency(run, streams, rounds)
                results[name][streams] = summarise(raw[name][streams])
                print(f"{name} x{streams}: {json.dumps(results[name][streams])}", flush=True)
    finally:
        stack.stop()
        peer.terminate()
        peer.wait()

    llm = llama_cpp.Llama(model_path=str(model_file), n_ctx=settings.LLMP_N_CTX, n_threads=threads,
                          n_threads_batch=threads, flash_attn=True, verbose=False)
    in_process = [{"wall_s": 0, "streams": []}]
    for prompt in PROMPTS * args.rounds:
        sample = measure(lambda: llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], stream=True, top_k=0, top_p=1.0, min_p=0.0,
            repeat_penalty=1.0, **sampling))
        in_process[0]["streams"].append(sample)
        in_process[0]["wall_s"] += sample["total_s"]
    results["in_process_single_sequence"] = {1: summarise(in_process)}

    ratios = {}
    for streams in STREAM_COUNTS:
        ours, peer_result = results["platform"][streams], results["llama_server"][streams]
        ratios[streams] = {
            "aggregate_tokens_per_s": ours["aggregate_tokens_per_s"] / peer_result["aggregate_tokens_per_s"],
            "ttft_p50": ours["ttft_p50_ms"] / peer_result["ttft_p50_ms"],
            "ttft_p50_added_ms": ours["ttft_p50_ms"] - peer_result["ttft_p50_ms"]}
    result = {
        "benchmark": "serving_vs_llama_server",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "build": {"id": llama_build.build_id(), "variant": llama_build.DEFAULT_VARIANT,
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()},
        "model": model, "sampling": sampling, "threads": threads, "n_ctx_per_sequence": settings.LLMP_N_CTX,
        "llama_server": {"sampling_added": PEER_FULL_VOCABULARY,
                         "command": f"llama-server -m MODEL -np {PEER_SLOTS} -c {PEER_SLOTS * settings.LLMP_N_CTX} "
                                    f"-t {peer_threads} -tb {peer_threads}", "environment": peer_env,
                         "tokens_per_s_by_setting": tuning},
        "platform": {"slots_per_model": settings.LLMP_POOL_SLOTS_PER_MODEL},
        "results": results, "ratios_platform_over_llama_server": ratios,
        "second_turn_of_a_long_conversation": conversation,
        "targets": {"1_stream_tokens_per_s_ratio_min": 0.95, "1_stream_ttft_p50_added_ms_max": 15,
                    "8_streams_aggregate_ratio_min": 0.95, "8_streams_ttft_p50_ratio_max": 1.5},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"results": results, "ratios": ratios}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
