"""Fit analysis on three machines, checked against numbers worked out by hand.

Conventions of the arithmetic below: 1 GiB = 2**30 bytes; KV cache = 2 (K, V) x layers x
kv_heads x head_dim x context x 2 bytes (f16); runtime overhead = 0.5 GiB = 536,870,912 bytes.
Catalog file sizes marked estimated are parameters x bits per weight / 8.
"""

from __future__ import annotations

import pytest

from apps.fit import engine
from tests.fit.conftest import snapshot

GIB = 2 ** 30
OVERHEAD = 536_870_912


def machine(fixture: str, **options) -> engine.Machine:
    return engine.machine_from_hardware(name=fixture, hardware=snapshot(fixture), **options)


def model(name: str) -> engine.ModelSpec:
    return next(spec for spec in engine.catalog_models() if spec.name == name)


def test_the_catalog_holds_at_least_150_real_models_with_what_fit_analysis_needs():
    models = engine.catalog_models()
    assert len(models) >= 150
    assert len({spec.name for spec in models}) == len(models)
    for spec in models:
        assert spec.layers and spec.kv_heads and spec.head_dim, spec.name
        assert spec.quantizations and all(q.size_bytes > 0 for q in spec.quantizations), spec.name
        assert set(spec.use_cases) <= set(engine.USE_CASES), spec.name
    moe = model("Qwen/Qwen3-30B-A3B")
    assert moe.is_moe and moe.active_parameters == 3_300_000_000


def test_every_sequence_a_runner_batches_holds_its_own_kv_and_the_weights_count_once():
    fit = engine.model_fit(model("meta-llama/Llama-3.1-8B-Instruct"), machine("rtx4090"), context_limit=8192,
                           sequences=4)
    # 4 sequences x 1 GiB of KV each, beside one copy of the Q8_0 weights
    assert fit["memory_required_bytes"] == 8_540_000_000 + 4 * 1_073_741_824 + OVERHEAD
    assert (fit["estimate_sequences"], fit["kv_cache_gb"], fit["best_quant"]) == (4, 4.0, "Q8_0")


def test_llama_3_1_8b_is_a_perfect_fit_at_q8_on_an_rtx_4090():
    fit = engine.model_fit(model("meta-llama/Llama-3.1-8B-Instruct"), machine("rtx4090"), context_limit=8192)
    # KV = 2 x 32 layers x 8 kv heads x 128 x 8192 x 2 B = 1,073,741,824 (1 GiB)
    # Q8_0 file = 8,540,000,000 (published size); required = 8,540,000,000 + 1,073,741,824 + 536,870,912
    required = 8_540_000_000 + 1_073_741_824 + OVERHEAD
    assert fit["memory_required_bytes"] == required == 10_150_612_736
    assert fit["memory_required_gb"] == round(required / GIB, 2) == 9.45
    # 10,150,612,736 / 25,757,220,864 VRAM = 39.4 % <= 80 %: perfect, on the GPU
    assert (fit["fit_level"], fit["run_mode"], fit["best_quant"]) == ("perfect", "gpu", "Q8_0")
    assert fit["utilization_pct"] == 39.4
    # 0.6 x 1008 GB/s / 8.54 GB read per token = 70.8 tokens/s
    assert fit["estimated_tps"] == 70.8
    assert fit["estimate_source"] == "modelled"


def test_llama_3_3_70b_spills_to_ram_on_an_rtx_4090_at_the_best_quant_that_stays_good():
    fit = engine.model_fit(model("meta-llama/Llama-3.3-70B-Instruct"), machine("rtx4090"), context_limit=8192)
    # Even Q2_K (70.6e9 x 3.0 / 8 = 26,475,000,000) exceeds 25,757,220,864 of VRAM: offload to RAM.
    # KV = 2 x 80 x 8 x 128 x 8192 x 2 = 2,684,354,560; capacity V + R = 25,757,220,864 + 68,719,476,736
    #    = 94,476,697,600.  Q8_0: 75,012,500,000 + 2,684,354,560 + 536,870,912 = 78,233,725,472 -> 82.8 %: marginal.
    #    Q6_K: 70.6e9 x 6.56 / 8 = 57,892,000,000 -> 61,113,225,472 -> 64.7 % <= 70 %: good.
    assert (fit["fit_level"], fit["run_mode"], fit["best_quant"]) == ("good", "cpu_offload", "Q6_K")
    assert fit["memory_required_bytes"] == 57_892_000_000 + 2_684_354_560 + OVERHEAD
    assert fit["utilization_pct"] == 64.7
    # GPU holds (25,757,220,864 - 2,684,354,560 - 536,870,912) / 57,892,000,000 = 38.93 % of the weights.
    # seconds/token = 57.892e9 x (0.3893 / (0.6 x 1008e9) + 0.6107 / (0.5 x 60e9)) = 0.03727 + 1.17847 -> 0.8 tok/s
    assert fit["estimated_tps"] == 0.8


def test_llama_3_3_70b_is_a_perfect_q8_fit_on_two_h100s():
    fit = engine.model_fit(model("meta-llama/Llama-3.3-70B-Instruct"), machine("h100x2"), context_limit=8192)
    # 78,233,725,472 / (2 x 85,520,809,984 = 171,041,619,968) = 45.7 %: perfect
    assert (fit["fit_level"], fit["run_mode"], fit["best_quant"]) == ("perfect", "gpu", "Q8_0")
    assert fit["memory_required_bytes"] == 78_233_725_472
    assert fit["memory_available_gb"] == round(171_041_619_968 / GIB, 2) == 159.29
    # Layers split evenly over two 3350 GB/s GPUs run in turn: 0.6 x 3350e9 / 75.0125e9 = 26.8 tok/s
    assert fit["estimated_tps"] == 26.8


def test_a_node_pinned_to_one_h100_counts_only_that_gpu():
    fit = engine.model_fit(model("meta-llama/Llama-3.3-70B-Instruct"), machine("h100x2", gpu_index=1),
                           context_limit=8192)
    # Q8_0: 78,233,725,472 / 85,520,809,984 = 91.5 %: marginal; Q6_K: 61,113,225,472 / 85,520,809,984 = 71.5 %:
    # perfect, and a GPU fit at good or better beats a higher quant at marginal.
    assert (fit["fit_level"], fit["run_mode"], fit["best_quant"]) == ("perfect", "gpu", "Q6_K")
    assert fit["utilization_pct"] == 71.5


def test_a_16_gb_laptop_runs_an_8b_model_on_cpu_at_most_good():
    fit = engine.model_fit(model("meta-llama/Llama-3.1-8B-Instruct"), machine("laptop16"), context_limit=8192)
    # 10,150,612,736 / 17,179,869,184 = 59.1 % <= 70 %: good (only a GPU fit can be perfect)
    assert (fit["fit_level"], fit["run_mode"], fit["best_quant"]) == ("good", "cpu_only", "Q8_0")
    # 0.5 x 48 GB/s / 8.54 GB = 2.8 tok/s
    assert fit["estimated_tps"] == 2.8


def test_the_laptop_takes_a_lower_quant_that_stays_good_over_a_higher_one_that_is_marginal():
    fit = engine.model_fit(model("mistralai/Mistral-Small-24B-Instruct-2501"), machine("laptop16"), context_limit=8192)
    # KV = 2 x 40 x 8 x 128 x 8192 x 2 = 1,342,177,280
    # Q3_K_M: 23.6e9 x 3.9 / 8 = 11,505,000,000 -> 13,384,048,192 / 17,179,869,184 = 77.9 %: marginal
    # Q2_K:   23.6e9 x 3.0 / 8 =  8,850,000,000 -> 10,729,048,192 / 17,179,869,184 = 62.5 %: good
    assert (fit["fit_level"], fit["best_quant"]) == ("good", "Q2_K")
    assert fit["memory_required_bytes"] == 10_729_048_192


def test_a_32b_model_is_too_tight_for_the_laptop_even_at_q2():
    fit = engine.model_fit(model("Qwen/Qwen2.5-32B-Instruct"), machine("laptop16"), context_limit=8192)
    # Q2_K: 32.8e9 x 3 / 8 = 12,300,000,000 + KV 2 x 64 x 8 x 128 x 8192 x 2 = 2,147,483,648 + 536,870,912
    #     = 14,984,354,560 / 17,179,869,184 = 87.2 % > 85 %: too tight
    assert (fit["fit_level"], fit["best_quant"]) == ("too_tight", "Q2_K")
    assert fit["memory_required_bytes"] == 14_984_354_560


def test_a_mixture_of_experts_model_is_as_fast_as_its_active_parameters():
    fit = engine.model_fit(model("Qwen/Qwen3-30B-A3B"), machine("rtx4090"), context_limit=8192)
    # KV = 2 x 48 x 4 x 128 x 8192 x 2 = 805,306,368
    # Q5_K_M: 30.5e9 x 5.7 / 8 = 21,731,250,000 -> 23,073,427,280 / 25,757,220,864 = 89.6 %: good on the GPU
    # Q6_K: 25,010,000,000 -> over VRAM.  Q4_K_M would be perfect, but good on the GPU at a higher quant wins.
    assert (fit["fit_level"], fit["run_mode"], fit["best_quant"]) == ("good", "gpu", "Q5_K_M")
    # reads 3.3 / 30.5 of the weights per token: 0.6 x 1008e9 / (21,731,250,000 x 3.3 / 30.5) = 257.2 tok/s
    assert fit["estimated_tps"] == 257.2
    assert fit["is_moe"] is True


def test_memory_override_replaces_the_gpu_memory_like_llmfits_flag():
    laptop = machine("laptop16", memory_bytes=engine.parse_memory_size("24G"))
    fit = engine.model_fit(model("meta-llama/Llama-3.1-8B-Instruct"), laptop, context_limit=8192)
    # 10,150,612,736 / 24 GiB (25,769,803,776) = 39.4 %: perfect
    assert (fit["fit_level"], fit["run_mode"]) == ("perfect", "gpu")
    assert engine.parse_memory_size("512M") == 512 * 2 ** 20
    with pytest.raises(ValueError):
        engine.parse_memory_size("lots")


def test_a_measurement_replaces_the_model_and_says_so():
    spec = model("meta-llama/Llama-3.1-8B-Instruct")
    fit = engine.model_fit(spec, machine("rtx4090"), context_limit=8192,
                           measurement=engine.Measurement(memory_bytes=22 * GIB, tokens_per_second=55.5))
    # measured weights replace the modelled ones; the KV cache and overhead stay modelled:
    # 22 GiB + KV (32 layers x 8 kv heads x 128 x 2 (K, V) x 2 bytes x 8192 = 1 GiB) + 0.5 GiB overhead
    # = 23.5 GiB = 25,232,932,864 bytes; / 25,757,220,864 = 98.0 %: marginal
    assert (fit["estimate_source"], fit["measured"]) == ("measured", ["memory", "tps"])
    assert fit["memory_required_bytes"] == 22 * GIB + GIB + OVERHEAD == 25_232_932_864
    assert (fit["fit_level"], fit["estimated_tps"], fit["memory_required_gb"]) == ("marginal", 55.5, 23.5)


def test_a_registered_model_with_a_bare_header_is_still_analysed():
    spec = engine.registered_model_spec(model_id="mystery", owned_by="me", architecture="", parameter_count=None,
                                        context_length=None, file_type="Q4_1", size_bytes=5_000_000_000,
                                        metadata=None, release_date=None)
    # parameters from the file: 5e9 bytes x 8 / 5.0 bits = 8e9; no layer counts: no KV cache
    assert spec.parameter_count == 8_000_000_000
    fit = engine.model_fit(spec, machine("rtx4090"), context_limit=4096)
    assert fit["memory_required_bytes"] == 5_000_000_000 + OVERHEAD
    assert any("KV cache not counted" in note for note in fit["notes"])


def test_a_nodes_architecture_comes_from_its_own_hardware_not_the_servers():
    arm = {**snapshot("laptop16"), "arch": "aarch64", "cpu_model": ""}
    system = engine.system_json(engine.machine_from_hardware(name="arm", hardware=arm))
    assert (system["backend"], system["cpu_name"]) == ("CPU (ARM)", "aarch64")
    x86 = engine.system_json(engine.machine_from_hardware(name="x86", hardware={**arm, "arch": "x86_64"}))
    assert x86["backend"] == "CPU (x86)"
