"""``manage.py models``: list, and a download job followed to the end with a progress bar."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from apps.models.models import ModelSource, RegisteredModel
from llmplatform import devstack
from tests.jobs.conftest import GGUF_FILE, GGUF_REPO

pytestmark = pytest.mark.live


def _manage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", "models", *args], cwd=devstack.ROOT, env=devstack.child_env(),
                          capture_output=True, text=True, timeout=300)


def test_models_list_prints_the_registry_as_a_table(platform, model_id):
    listed = _manage("list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "SOURCE", "TYPE", "ARCH", "SIZE"]
    assert any(row.split()[:4] == [model_id, "bundled", "Q4_1", "llama"] for row in rows)


def test_models_download_follows_the_job_to_a_ready_model(hub_node):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    done = _manage("download", GGUF_REPO, GGUF_FILE, "--name", name, "--node", hub_node.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"model {name} is ready" in done.stdout
    assert "downloading" in done.stdout + done.stderr  # the progress bar's stage
    assert RegisteredModel.objects.get(id=name).source == ModelSource.HUGGINGFACE


def test_models_refuses_bad_requests_with_status_2(platform):
    refused = _manage("quantize", "no-such-model", "Q4_0")
    assert refused.returncode == 2 and "not found" in refused.stderr
    bad_type = _manage("quantize", "smollm2-135m-instruct", "Q9_Z", "--no-wait")
    assert bad_type.returncode == 2 and "Q4_K_M" in bad_type.stderr
