"""``manage.py fit serve`` as a real process, queried the way an llmfit scheduler client does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llmplatform import devstack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fit_server(django_db_setup, tmp_path_factory):
    port = devstack.free_port()
    log = tmp_path_factory.mktemp("fit-serve") / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "fit", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--memory", "24G", "--max-context", "8192"],
            cwd=ROOT, env=devstack.child_env(LLMP_NODE_NAME="fit-serve-node"), stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    devstack.wait_until(healthy, timeout=60, what="fit serve answering /health")
    yield httpx.Client(base_url=base_url, timeout=30)
    process.terminate()
    process.wait(timeout=15)


def test_health_names_the_node(fit_server):
    assert fit_server.get("/health").json() == {"status": "ok", "node": {"name": "fit-serve-node", "os": "linux"}}


def test_system_reports_this_machine_with_the_memory_override(fit_server):
    body = fit_server.get("/api/v1/system").json()
    assert body["node"]["name"] == "fit-serve-node"
    system = body["system"]
    assert system["gpu_vram_gb"] == 24.0 and system["memory_override"] is True
    assert system["total_ram_gb"] > 0 and system["cpu_name"]


def test_a_scheduler_polls_top_models_with_llmfits_parameters(fit_server):
    top = fit_server.get("/api/v1/models/top", params={"limit": 3, "min_fit": "good", "use_case": "coding"}).json()
    assert top["returned_models"] == 3 and top["filters"]["top_only"] is True
    assert all(r["fit_level"] in ("perfect", "good") and "coding" in r["use_cases"] for r in top["models"])
    assert all(r["estimate_context"] <= 8192 for r in top["models"])  # --max-context caps estimates
    listing = fit_server.get("/api/v1/models", params={"sort": "params", "limit": 5, "provider": "meta"}).json()
    params = [r["parameters"] for r in listing["models"]]
    assert params == sorted(params, reverse=True) and {r["provider"] for r in listing["models"]} == {"Meta"}
    named = fit_server.get("/api/v1/models/mistral").json()
    assert named["models"] and all("mistral" in r["name"].lower() or "mistral" in r["provider"].lower()
                                   for r in named["models"])
    assert named["returned_models"] <= 20  # llmfit's default limit for a name search


def test_the_same_engine_as_the_platform_gives_the_same_row(fit_server):
    row = fit_server.get("/api/v1/models/meta-llama/Llama-3.1-8B-Instruct").json()["models"][0]
    # 24 GiB assumed VRAM: 10,150,612,736 bytes at Q8_0 with an 8192 context is 39.4 % of it: perfect on the GPU
    assert (row["fit_level"], row["run_mode"], row["best_quant"]) == ("perfect", "gpu", "Q8_0")
    assert row["memory_required_gb"] == 9.45


@pytest.mark.parametrize("param, message", [
    ("min_fit", "invalid min_fit value: use perfect|good|marginal|too_tight"),
    ("runtime", "invalid runtime value: use any|mlx|llamacpp|vllm"),
    ("use_case", "invalid use_case value: use general|coding|reasoning|chat|multimodal|embedding"),
    ("sort", "invalid sort value: use score|tps|params|mem|ctx|date|use_case"),
])
def test_bad_parameters_get_llmfits_400s(fit_server, param, message):
    reply = fit_server.get("/api/v1/models", params={param: "nope"})
    assert reply.status_code == 400 and reply.json() == {"error": message}


def test_an_unknown_path_is_a_json_404(fit_server):
    reply = fit_server.get("/api/v2/whatever")
    assert reply.status_code == 404 and "error" in reply.json()


def test_the_terminal_table_lists_the_filtered_models():
    result = subprocess.run([sys.executable, "manage.py", "fit", "--memory", "24G", "--limit", "4", "--use-case",
                             "embedding"], cwd=ROOT, env=devstack.child_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].split()[:4] == ["model", "params", "quant", "fit"]
    assert len(lines) == 2 + 4 + 1 and lines[-1].startswith("4 of ")
    bad = subprocess.run([sys.executable, "manage.py", "fit", "--sort", "nope"], cwd=ROOT, env=devstack.child_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "invalid sort value" in bad.stderr
