"""Convert a Hugging Face checkpoint to GGUF and quantize it, as jobs on a real worker; the results answer chat."""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings

from apps.jobs.models import Job, JobStatus
from apps.models.models import ModelSource, RegisteredModel
from llmplatform.devstack import wait_until
from tests.fixtures.tiny_llama import build_tiny_llama

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def checkpoint_name() -> str:
    name = f"tiny-llama-{uuid.uuid4().hex[:6]}"
    build_tiny_llama(settings.LLMP_CHECKPOINTS_DIR / name)
    return name


def _finished(job_id: str) -> Job:
    wait_until(lambda: Job.objects.get(pk=job_id).is_terminal, timeout=240, what=f"job {job_id} to finish")
    return Job.objects.get(pk=job_id)


def test_a_checkpoint_converted_then_quantized_gives_models_that_answer_chat(http, client, platform, checkpoint_name):
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    response = http.post("/api/v1/convert", json={"source_dir": checkpoint_name, "outtype": "f16", "name": f"{name}-f16",
                                                  "node": platform.node})
    assert response.status_code == 202, response.text
    converted = _finished(response.json()["id"])
    assert converted.status == JobStatus.SUCCEEDED, (converted.error, converted.log)
    f16 = RegisteredModel.objects.get(id=f"{name}-f16")
    assert f16.source == ModelSource.CONVERSION and f16.architecture == "llama" and f16.file_type == "F16"
    assert f16.metadata["block_count"] == 2 and f16.chat_template

    response = http.post("/api/v1/quantize", json={"model": f16.id, "qtype": "q4_k_m", "name": f"{name}-q4km",
                                                   "node": platform.node})
    assert response.status_code == 202, response.text
    quantized = _finished(response.json()["id"])
    assert quantized.status == JobStatus.SUCCEEDED, (quantized.error, quantized.log)
    q4 = RegisteredModel.objects.get(id=f"{name}-q4km")
    assert q4.file_type == "Q4_K_M" and q4.parent_id == f16.id and q4.size_bytes < f16.size_bytes
    assert [e for e in quantized.log if "stage: quantizing" in e]

    for model in (f16, q4):
        reply = client.chat.completions.create(model=model.id, max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.usage.completion_tokens > 0


@pytest.mark.parametrize("body, message", [
    ({"source_dir": "x", "outtype": "f16"}, "name"),
    ({"source_dir": "../../etc", "name": "evil"}, "LLMP_CHECKPOINTS_DIR"),
    ({"name": "nothing"}, "exactly one of repo_id and source_dir"),
    ({"source_dir": "x", "repo_id": "a/b", "name": "both"}, "exactly one of repo_id and source_dir"),
    ({"source_dir": "x", "name": "badq", "quantize": "Q9_X"}, "unknown quantization"),
    ({"source_dir": "x", "name": "badout", "outtype": "q4_0"}, "outtype"),
])
def test_convert_refuses_bad_requests_clearly(http, body, message):
    response = http.post("/api/v1/convert", json=body)
    assert response.status_code == 400
    assert message in str(response.json())


def test_quantize_refuses_unknown_models_and_types(http, model_id):
    missing = http.post("/api/v1/quantize", json={"model": "no-such-model", "qtype": "Q4_0"})
    assert missing.status_code == 404
    bad = http.post("/api/v1/quantize", json={"model": model_id, "qtype": "Q1_Z"})
    assert bad.status_code == 400 and "Q4_K_M" in bad.json()["error"]


def test_a_missing_checkpoint_fails_the_job_with_a_clear_error(http, platform):
    response = http.post("/api/v1/convert", json={"source_dir": f"absent-{uuid.uuid4().hex[:6]}",
                                                  "name": f"absent-{uuid.uuid4().hex[:6]}", "node": platform.node})
    assert response.status_code == 202
    job = _finished(response.json()["id"])
    assert job.status == JobStatus.FAILED and "does not exist" in job.error
