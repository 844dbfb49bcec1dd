"""Hostile GGUF files on the running platform: every header bound, and files that pass the validator
but that llama.cpp refuses or aborts on, are refused at upload with a 400 and the reason, and leave
nothing behind; the directory sync skips them the same way. The files are generated in the test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from django.conf import settings

from apps.models.models import RegisteredModel
from tests.fixtures.tiny_gguf import tiny_gguf, tiny_tokens
from tests.models.test_gguf import HOSTILE_HPARAMS
from tests.models.test_local_api import _leftover_parts, _upload

pytestmark = pytest.mark.live


def assert_refused_and_gone(response, name: str) -> str:
    assert response.status_code == 400, response.text
    assert not (settings.MODELS_DIR / name).exists()
    assert not RegisteredModel.objects.filter(id=name.removesuffix(".gguf")).exists()
    assert _leftover_parts() == []
    return response.json()["error"]


def assert_names_no_server_path(message: str) -> None:
    assert "/" not in message, message  # no models directory, upload file, build tree or site-packages
    assert str(settings.DATA_DIR) not in message


@pytest.mark.parametrize("data, message", HOSTILE_HPARAMS.values(), ids=HOSTILE_HPARAMS.keys())
def test_an_upload_with_a_hyperparameter_llama_cpp_cannot_load_is_refused_with_the_reason(http, data, message):
    name = f"hparams-{uuid.uuid4().hex[:8]}.gguf"
    error = assert_refused_and_gone(_upload(http, name, data), name)
    assert error.startswith("Invalid GGUF file: ") and message in error


def duplicate_token_model(directory: Path) -> Path:
    tokens = tiny_tokens()
    tokens[-1] = tokens[-2]  # passes the validator; llama.cpp asserts its tokens are distinct and aborts
    return tiny_gguf(directory / "duplicate-token.gguf", tokens=tokens)


def test_a_file_that_passes_the_validator_but_aborts_llama_cpp_is_refused_at_upload(http, tmp_path):
    name = f"aborts-{uuid.uuid4().hex[:8]}.gguf"
    error = assert_refused_and_gone(_upload(http, name, duplicate_token_model(tmp_path).read_bytes()), name)
    assert error.startswith("Invalid GGUF file: a trial load refused it: llama.cpp crashed (SIGABRT) while loading "
                            "the model: llama-vocab.cpp:")
    assert "GGML_ASSERT(id_to_token.size() == token_to_id.size()) failed" in error
    assert_names_no_server_path(error)
    assert http.get("/health").status_code == 200  # the server lives on


def test_a_file_whose_tensors_contradict_its_header_is_refused_at_upload(http, tmp_path):
    name = f"shape-{uuid.uuid4().hex[:8]}.gguf"
    data = tiny_gguf(tmp_path / "shape.gguf", shapes={"blk.0.attn_k.weight": (16, 64)}).read_bytes()
    error = assert_refused_and_gone(_upload(http, name, data), name)
    assert error == ("Invalid GGUF file: a trial load refused it: llama.cpp could not load it (while loading the "
                     "model): error loading model: check_tensor_dims: tensor 'blk.0.attn_k.weight' has wrong shape; "
                     "expected 64, 32, got 64, 16, 1, 1")


def test_a_small_model_llama_cpp_loads_is_accepted_after_its_trial_load(http, tmp_path):
    name = f"tiny-{uuid.uuid4().hex[:8]}.gguf"
    response = _upload(http, name, tiny_gguf(tmp_path / "tiny.gguf").read_bytes())
    assert response.status_code == 200, response.text
    model = RegisteredModel.objects.get(id=name.removesuffix(".gguf"))
    assert model.architecture == "llama" and model.metadata["block_count"] == 2
    http.delete(f"/api/v1/models/{model.id}")


def test_the_directory_sync_skips_a_file_llama_cpp_aborts_on_with_the_reason(http, tmp_path):
    name = f"sync-aborts-{uuid.uuid4().hex[:8]}.gguf"
    path = settings.MODELS_DIR / name
    path.write_bytes(duplicate_token_model(tmp_path).read_bytes())
    try:
        body = http.post("/api/v1/models/sync").json()
        [skipped] = [entry for entry in body["skipped"] if entry["name"] == name]
        assert "a trial load refused it: llama.cpp crashed (SIGABRT)" in skipped["reason"]
        assert name not in body["added"]
        assert not RegisteredModel.objects.filter(id=name.removesuffix(".gguf")).exists()
    finally:
        path.unlink()
