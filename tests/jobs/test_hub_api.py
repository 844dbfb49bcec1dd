"""The management API's Hugging Face endpoints through the real huggingface_hub code, against the fake hub,
and a conversion job whose checkpoint comes from the hub."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from apps.jobs.models import Job, JobStatus
from apps.models.models import RegisteredModel
from llmplatform import devstack
from tests.jobs.conftest import CHECKPOINT_REPO, GGUF_FILE, GGUF_REPO

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def hub_server(hub, platform, api_key, tmp_path_factory):
    """An ASGI server whose HF_ENDPOINT is the fake hub (the session's server has none)."""
    base_url, server = devstack.server_start_live(env=devstack.child_env(HF_ENDPOINT=hub.endpoint),
                                                  log_dir=Path(tmp_path_factory.mktemp("hub-server-logs")),
                                                  what="the hub server")
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as client:
        yield client
    server.stop()


def test_a_repos_files_are_listed_with_their_gguf_quantizations(hub_server):
    body = hub_server.get("/api/v1/hf/files", params={"repo": GGUF_REPO}).json()
    assert body["repo"] == GGUF_REPO
    smol = next(f for f in body["gguf_files"] if f["path"] == GGUF_FILE)
    assert smol["quantization"] == "Q4_1" and smol["size"] > 90_000_000 and len(smol["sha256"]) == 64
    assert "README.md" in [f["path"] for f in body["files"]]


def test_search_finds_gguf_repos(hub_server):
    found = hub_server.get("/api/v1/hf/search", params={"q": "smol"}).json()["models"]
    assert GGUF_REPO in [m["id"] for m in found]


def test_an_unknown_repo_is_a_404(hub_server):
    missing = hub_server.get("/api/v1/hf/files", params={"repo": "acme/nothing-here"})
    assert missing.status_code == 404 and "acme/nothing-here" in missing.json()["error"]


def test_a_repo_id_the_hub_refuses_as_invalid_is_a_400(hub_server):
    invalid = hub_server.get("/api/v1/hf/files", params={"repo": "\U00010091"})
    assert invalid.status_code == 400 and "invalid" in invalid.json()["error"]


def test_a_checkpoint_from_the_hub_is_converted_and_quantized_in_one_job(http, client, hub_node):
    name = f"hubconv-{uuid.uuid4().hex[:6]}"
    response = http.post("/api/v1/convert", json={"repo_id": CHECKPOINT_REPO, "outtype": "f16", "quantize": "Q8_0",
                                                  "name": name, "node": hub_node.name})
    assert response.status_code == 202, response.text
    devstack.wait_until(lambda: Job.objects.get(pk=response.json()["id"]).is_terminal, timeout=240,
                        what="the conversion job")
    job = Job.objects.get(pk=response.json()["id"])
    assert job.status == JobStatus.SUCCEEDED, (job.error, job.log)
    stages = [line.split("stage: ")[1] for line in job.log if "stage: " in line]
    assert stages == ["downloading", "converting", "quantizing", "verifying", "registering"]
    model = RegisteredModel.objects.get(id=name)
    assert model.file_type == "Q8_0" and model.hf_repo == CHECKPOINT_REPO
    reply = client.chat.completions.create(model=name, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens > 0
