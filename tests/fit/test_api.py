"""The per-node fit API and the fleet matrix: every filter, sort and error llmfit documents."""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from apps.fit.models import FitMeasurement
from apps.fit.selectors import fit_level
from apps.fit.services import measurement_record
from apps.models.models import RegisteredModel

ERRORS = {
    "min_fit": "invalid min_fit value: use perfect|good|marginal|too_tight",
    "runtime": "invalid runtime value: use any|mlx|llamacpp|vllm",
    "use_case": "invalid use_case value: use general|coding|reasoning|chat|multimodal|embedding",
    "sort": "invalid sort value: use score|tps|params|mem|ctx|date|use_case",
}


@pytest.fixture
def api() -> Client:
    user = get_user_model().objects.create_user(f"fit-{uuid.uuid4().hex[:8]}")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def gpu_node(make_node):
    return make_node("rtx4090")


def models(api, node, suffix="", **params) -> dict:
    reply = api.get(f"/api/v1/nodes/{node.name}/models{suffix}", params)
    assert reply.status_code == 200, reply.content
    return reply.json()


def test_it_refuses_anonymous_clients_with_one_error_shape(gpu_node):
    reply = Client().get(f"/api/v1/nodes/{gpu_node.name}/system")
    assert reply.status_code in (401, 403) and isinstance(reply.json()["error"], str)


def test_the_system_of_a_node_is_found_by_name_or_id(api, gpu_node):
    by_name = api.get(f"/api/v1/nodes/{gpu_node.name}/system").json()
    by_id = api.get(f"/api/v1/nodes/{gpu_node.pk}/system").json()
    assert by_name == by_id
    assert by_name["node"]["name"] == gpu_node.name and by_name["node"]["os"] == "linux"
    system = by_name["system"]
    assert (system["has_gpu"], system["gpu_count"], system["gpu_name"]) == (True, 1, "NVIDIA GeForce RTX 4090")
    assert system["gpu_vram_gb"] == 23.99 and system["total_ram_gb"] == 64.0
    assert system["gpus"][0]["memory_bandwidth_gbps"] == 1008.0 and system["backend"] == "CUDA"


def test_an_unknown_node_is_a_404_with_an_error(api):
    reply = api.get("/api/v1/nodes/no-such-node/models")
    assert reply.status_code == 404 and reply.json() == {"error": "node no-such-node not found"}


def test_the_models_envelope_is_llmfits(api, gpu_node):
    body = models(api, gpu_node)
    assert set(body) == {"node", "system", "total_models", "returned_models", "filters", "models"}
    assert body["total_models"] == body["returned_models"] == len(body["models"]) >= 100
    assert body["filters"] == {"limit": None, "perfect": None, "min_fit": None, "runtime": None, "use_case": None,
                               "provider": None, "search": None, "sort": None, "max_context": None,
                               "include_too_tight": None, "top_only": False}
    row = body["models"][0]
    for field in ("name", "provider", "parameter_count", "params_b", "context_length", "use_case", "category",
                  "release_date", "is_moe", "fit_level", "fit_label", "run_mode", "run_mode_label", "score",
                  "score_components", "estimated_tps", "runtime", "runtime_label", "best_quant",
                  "memory_required_gb", "memory_available_gb", "utilization_pct", "notes", "estimate_source"):
        assert field in row, field
    # min_fit defaults to marginal, as in llmfit: nothing too tight unless asked for
    assert all(r["fit_level"] != "too_tight" for r in body["models"])
    scores = [r["score"] for r in body["models"]]
    assert scores == sorted(scores, reverse=True)


def test_limit_and_its_alias_n_cut_the_list_but_not_the_total(api, gpu_node):
    full = models(api, gpu_node)
    cut = models(api, gpu_node, limit=3)
    assert cut["returned_models"] == 3 and cut["total_models"] == full["total_models"]
    assert [r["name"] for r in cut["models"]] == [r["name"] for r in full["models"][:3]]
    assert models(api, gpu_node, n=2)["returned_models"] == 2


def test_fit_filters_perfect_min_fit_and_include_too_tight(api, gpu_node):
    perfect = models(api, gpu_node, perfect="true")["models"]
    assert perfect and {r["fit_level"] for r in perfect} == {"perfect"}
    good = models(api, gpu_node, min_fit="good")["models"]
    assert {r["fit_level"] for r in good} <= {"perfect", "good"} and len(good) > len(perfect)
    everything = models(api, gpu_node, min_fit="too_tight")["models"]
    assert "too_tight" in {r["fit_level"] for r in everything}
    assert everything[-1]["fit_level"] == "too_tight"  # unrunnable rows sort last whatever the column
    without = models(api, gpu_node, min_fit="too_tight", include_too_tight="false")["models"]
    assert "too_tight" not in {r["fit_level"] for r in without}


def test_runtime_use_case_provider_and_search_filters(api, gpu_node):
    assert models(api, gpu_node, runtime="llamacpp")["total_models"] == models(api, gpu_node)["total_models"]
    assert models(api, gpu_node, runtime="mlx")["models"] == []
    coding = models(api, gpu_node, use_case="coding")["models"]
    assert coding and all("coding" in r["use_cases"] for r in coding)
    embedding = models(api, gpu_node, use_case="embed")["models"]  # llmfit's alias
    assert embedding and all("embedding" in r["use_cases"] for r in embedding)
    qwen = models(api, gpu_node, provider="qwe")["models"]
    assert qwen and {r["provider"] for r in qwen} == {"Qwen"}
    found = models(api, gpu_node, search="LLAMA-3.1")["models"]
    assert found and all("llama-3.1" in r["name"].lower() for r in found)


@pytest.mark.parametrize("sort, key, descending", [
    ("score", "score", True), ("tps", "estimated_tps", True), ("params", "parameters", True),
    ("mem", "utilization_pct", True), ("ctx", "context_length", True), ("date", "release_date", True),
    ("use_case", "category", False),
])
def test_every_sort_column_orders_the_rows(api, gpu_node, sort, key, descending):
    rows = models(api, gpu_node, sort=sort)["models"]
    values = [r[key] for r in rows]
    assert values == sorted(values, reverse=descending), sort


def test_max_context_caps_the_context_the_memory_is_estimated_for(api, gpu_node):
    search = {"search": "Llama-3.1-8B-Instruct"}
    small = models(api, gpu_node, max_context=1024, **search)["models"][0]
    large = models(api, gpu_node, max_context=8192, **search)["models"][0]
    assert (small["estimate_context"], large["estimate_context"]) == (1024, 8192)
    # Per sequence, KV grows by 2 x 32 x 8 x 128 x (8192 - 1024) x 2 bytes = 939,524,096 at the same quant,
    # and the platform counts every sequence a runner holds.
    sequences = settings.LLMP_POOL_SLOTS_PER_MODEL
    assert small["estimate_sequences"] == large["estimate_sequences"] == sequences
    assert small["best_quant"] == large["best_quant"] == "Q8_0"
    assert large["memory_required_bytes"] - small["memory_required_bytes"] == 939_524_096 * sequences


def test_top_returns_five_runnable_models_by_default(api, make_node):
    laptop = make_node("laptop16")
    top = models(api, laptop, "/top")
    assert top["returned_models"] == 5 and top["filters"]["top_only"] is True
    forced = models(api, laptop, "/top", include_too_tight="true", min_fit="too_tight", limit=500)
    assert "too_tight" not in {r["fit_level"] for r in forced["models"]}
    assert models(api, laptop, "/top", limit=2)["returned_models"] == 2


def test_a_model_is_found_by_a_case_insensitive_part_of_its_name(api, gpu_node):
    body = models(api, gpu_node, "/qwen2.5-CODER")
    assert body["models"] and all("qwen2.5-coder" in r["name"].lower() for r in body["models"])
    assert body["filters"]["search"] == "qwen2.5-CODER"
    exact = models(api, gpu_node, "/meta-llama/Llama-3.3-70B-Instruct")
    assert [r["name"] for r in exact["models"]] == ["meta-llama/Llama-3.3-70B-Instruct"]


@pytest.mark.parametrize("param", sorted(ERRORS))
def test_an_invalid_filter_value_is_a_400_with_llmfits_message(api, gpu_node, param):
    for suffix in ("", "/top", "/llama"):
        reply = api.get(f"/api/v1/nodes/{gpu_node.name}/models{suffix}", {param: "bogus"})
        assert reply.status_code == 400 and reply.json() == {"error": ERRORS[param]}


def test_malformed_numbers_and_booleans_are_400s(api, gpu_node):
    for params in ({"limit": "-1"}, {"max_context": "many"}, {"perfect": "maybe"}, {"include_too_tight": "2"}):
        reply = api.get(f"/api/v1/nodes/{gpu_node.name}/models", params)
        assert reply.status_code == 400 and reply.json()["error"].startswith("invalid "), params


def test_the_fleet_matrix_has_a_cell_per_model_and_node(api, make_node):
    gpu, laptop = make_node("rtx4090"), make_node("laptop16")
    reply = api.get("/api/v1/fit/matrix", {"nodes": f"{gpu.name},{laptop.name}", "search": "Llama-3.1-8B-Instruct"})
    body = reply.json()
    assert [n["name"] for n in body["nodes"]] == sorted([gpu.name, laptop.name])  # nodes in name order
    row = next(r for r in body["models"] if r["name"] == "meta-llama/Llama-3.1-8B-Instruct")
    assert row["nodes"][gpu.name]["fit_level"] == "perfect" and row["nodes"][laptop.name]["fit_level"] == "good"
    assert row["nodes"][gpu.name]["best_quant"] == "Q8_0" and row["best_node"] == gpu.name
    assert row["nodes"][gpu.name]["estimated_tps"] > row["nodes"][laptop.name]["estimated_tps"]
    perfect = api.get("/api/v1/fit/matrix", {"nodes": laptop.name, "perfect": "true"}).json()
    assert perfect["models"] == []  # a CPU-only node is never a perfect fit
    assert api.get("/api/v1/fit/matrix", {"sort": "bogus"}).json() == {"error": ERRORS["sort"]}
    limited = api.get("/api/v1/fit/matrix", {"nodes": gpu.name, "limit": 4, "use_case": "coding"}).json()
    assert limited["returned_models"] == 4 and all("coding" in r["use_cases"] for r in limited["models"])


def _registered(size_bytes: int, **fields) -> RegisteredModel:
    return RegisteredModel.objects.create(
        id=f"reg-{uuid.uuid4().hex[:8]}", source="upload", file_name="x.gguf", size_bytes=size_bytes,
        architecture="llama", parameter_count=8_000_000_000, context_length=8192, file_type="Q4_K_M",
        metadata={"block_count": 32, "head_count": 32, "head_count_kv": 8, "embedding_length": 4096}, **fields)


def test_placement_fit_level_of_a_registered_model_matches_the_hand_computation(make_node):
    gpu, laptop = make_node("rtx4090"), make_node("laptop16")
    small, big = _registered(4_000_000_000), _registered(14_000_000_000)
    ctx = min(8192, settings.LLMP_N_CTX)
    kv = 2 * 32 * 8 * (4096 // 32) * ctx * 2 * settings.LLMP_POOL_SLOTS_PER_MODEL  # every sequence's KV
    # 4e9 + KV + 0.5 GiB: on the 4090 well under 80 % of 25,757,220,864; on the laptop under 70 % of 16 GiB
    assert (4_000_000_000 + kv + 536_870_912) / 25_757_220_864 <= 0.8
    assert fit_level(node=gpu, model=small) == "perfect"
    assert (4_000_000_000 + kv + 536_870_912) / 17_179_869_184 <= 0.7
    assert fit_level(node=laptop, model=small) == "good"
    assert (14_000_000_000 + kv + 536_870_912) / 17_179_869_184 > 0.85
    assert fit_level(node=laptop, model=big) == "too_tight"
    empty = make_node("laptop16")
    empty.hardware = {}
    assert fit_level(node=empty, model=small) is None


def test_registered_models_join_the_catalog_in_the_node_api(api, gpu_node):
    registered = _registered(4_000_000_000)
    row = models(api, gpu_node, f"/{registered.id}")["models"][0]
    assert (row["name"], row["source"], row["best_quant"]) == (registered.id, "registered", "Q4_K_M")


def test_a_measurement_turns_the_estimate_from_modelled_to_measured(api, gpu_node):
    registered = _registered(4_000_000_000)
    before = models(api, gpu_node, f"/{registered.id}")["models"][0]
    assert before["estimate_source"] == "modelled"
    measurement_record(node_name=gpu_node.name, model_id=registered.id, memory_bytes=6 * 2 ** 30)
    measurement_record(node_name=gpu_node.name, model_id=registered.id, tokens_per_second=80.0)
    measurement_record(node_name=gpu_node.name, model_id=registered.id, tokens_per_second=100.0,
                       memory_bytes=5 * 2 ** 30)  # the weights as last loaded
    row = FitMeasurement.objects.get(node=gpu_node, model_id=registered.id)
    assert (row.memory_bytes, row.tokens_per_second, row.tps_samples) == (5 * 2 ** 30, 90.0, 2)
    after = models(api, gpu_node, f"/{registered.id}")["models"][0]
    assert after["estimate_source"] == "measured" and after["measured"] == ["memory", "tps"]
    # measured weights (5 GiB) replace the file size (4e9 bytes); KV cache and overhead stay as modelled
    assert after["memory_required_bytes"] == before["memory_required_bytes"] - 4_000_000_000 + 5 * 2 ** 30
    assert after["estimated_tps"] == 90.0
    assert measurement_record(node_name="no-such-node", model_id=registered.id, memory_bytes=1) is None
