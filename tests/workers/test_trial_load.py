"""The trial load: llama.cpp loads a new file in a limited child process; whatever the file does to
llama.cpp (a refusal, an abort, a hang, a runaway allocation) comes back as a reason, and this
process lives on. The hostile files are generated here (tests/fixtures/tiny_gguf.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.fixtures.tiny_gguf import VT, tiny_gguf, tiny_tokens
from workers.bundled import bundled_model_path
from workers.gguf import GGUFError, read_header, summarize
from workers.trial_load import trial_load

TIMEOUT = 60.0


def assert_names_no_path(reason: str, *paths: Path) -> None:
    assert "/" not in reason, reason
    for path in paths:
        assert str(path.parent) not in reason


def validates(path: Path) -> dict:
    return summarize(read_header(path), file_size=path.stat().st_size)


def test_the_bundled_model_passes_a_trial_load_in_well_under_two_seconds():
    started = time.monotonic()
    result = trial_load(bundled_model_path(), timeout=TIMEOUT)
    assert result.ok, result
    assert result.stage == "done" and result.reason == ""
    assert time.monotonic() - started < 2.0


def test_the_tiny_generated_model_passes_the_validator_and_a_trial_load(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    assert validates(path)["metadata"]["block_count"] == 2
    assert trial_load(path, timeout=TIMEOUT).ok


def test_a_duplicate_vocabulary_token_passes_the_validator_aborts_llama_cpp_and_is_refused(tmp_path):
    tokens = tiny_tokens()
    tokens[-1] = tokens[-2]  # llama.cpp asserts every token text is distinct: GGML_ASSERT, so SIGABRT
    path = tiny_gguf(tmp_path / "duplicate-token.gguf", tokens=tokens)
    validates(path)
    result = trial_load(path, timeout=TIMEOUT)
    assert not result.ok and result.signal == "SIGABRT" and result.stage == "started"
    assert result.reason.startswith("llama.cpp crashed (SIGABRT) while loading the model: ")
    assert "GGML_ASSERT(id_to_token.size() == token_to_id.size()) failed" in result.reason
    assert_names_no_path(result.reason, path)


def test_the_issues_layer_count_really_aborts_llama_cpp_which_is_why_the_validator_bounds_it(tmp_path):
    path = tiny_gguf(tmp_path / "layers.gguf", metadata={"llama.block_count": (0xFFFFFFFF, VT.UINT32)})
    with pytest.raises(GGUFError, match="llama.block_count = 4294967295"):
        validates(path)
    result = trial_load(path, timeout=TIMEOUT)
    assert not result.ok and result.signal == "SIGABRT"
    assert "GGML_ASSERT(hparams.n_layer_all > 0 && hparams.n_layer_all <= LLAMA_MAX_LAYERS) failed" in result.reason


def test_kv_heads_that_do_not_divide_the_heads_abort_llama_cpp_when_it_builds_the_graph(tmp_path):
    wide = {f"blk.{layer}.attn_{kind}.weight": (48, 64) for layer in range(2) for kind in "kv"}
    path = tiny_gguf(tmp_path / "gqa.gguf", metadata={"llama.attention.head_count_kv": (3, VT.UINT32)}, shapes=wide)
    with pytest.raises(GGUFError, match="llama.attention.head_count_kv = 3 does not divide"):
        validates(path)
    result = trial_load(path, timeout=TIMEOUT)
    assert not result.ok and result.signal == "SIGABRT" and "while creating a context" in result.reason


def test_a_tensor_whose_shape_contradicts_the_header_is_refused_by_llama_cpp_without_a_crash(tmp_path):
    path = tiny_gguf(tmp_path / "shape.gguf", shapes={"blk.1.attn_q.weight": (32, 64)})
    validates(path)
    result = trial_load(path, timeout=TIMEOUT)
    assert not result.ok and result.signal == "" and result.exit_code == 2
    assert result.reason == ("llama.cpp could not load it (while loading the model): error loading model: "
                             "check_tensor_dims: tensor 'blk.1.attn_q.weight' has wrong shape; expected 64, 64, "
                             "got 64, 32, 1, 1")


def test_truncated_tensor_data_is_refused(tmp_path):
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(whole[: len(whole) - 4096])
    result = trial_load(path, timeout=TIMEOUT)
    assert not result.ok and "data is not within the file bounds" in result.reason
    assert_names_no_path(result.reason, path)


def test_a_load_that_hangs_is_killed_at_the_time_limit(tmp_path):
    path = tmp_path / "never-written.gguf"
    os.mkfifo(path)  # llama.cpp's open blocks until a writer comes, which never does
    started = time.monotonic()
    result = trial_load(path, timeout=2.0)
    assert not result.ok and result.timed_out
    assert result.reason == "loading it with llama.cpp took longer than 2 s and was stopped (loading the model)"
    assert time.monotonic() - started < 10


def test_a_load_that_needs_more_than_its_address_space_is_refused(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    result = trial_load(path, timeout=TIMEOUT, extra_memory_bytes=0)  # room for the mapping, none for a context
    assert not result.ok
    assert result.reason.startswith("llama.cpp needed more memory than a trial load may use (0 MiB of address space "
                                    "beyond its libraries) while creating a context: ")
    assert trial_load(path, timeout=TIMEOUT, extra_memory_bytes=64 << 20).ok
