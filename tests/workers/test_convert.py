"""HF checkpoint → GGUF conversion and quantization, on a tiny llama the tests build themselves."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import pytest
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from workers.bundled import bundled_model_path
from workers.convert import (
    QUANT_FTYPES,
    STAGE_CONVERTING,
    STAGE_QUANTIZING,
    SUPPORTED_QUANT_TYPES,
    ConversionCancelled,
    ConversionError,
    convert_checkpoint,
    partial_path,
    quantize,
)


@dataclass
class Produced:
    path: Path
    events: list[tuple[int, int, str]]


def _recorder() -> tuple[list[tuple[int, int, str]], callable]:
    events: list[tuple[int, int, str]] = []
    return events, lambda done, total, stage: events.append((done, total, stage))


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="module")
def f16_model(tiny_llama_checkpoint, out_dir) -> Produced:
    events, progress = _recorder()
    path = convert_checkpoint(source_dir=tiny_llama_checkpoint, out_path=out_dir / "tiny-f16.gguf", outtype="f16",
                              progress=progress, model_name="tiny-llama")
    return Produced(path, events)


@pytest.fixture(scope="module")
def q4_k_m_model(f16_model, out_dir) -> Produced:
    events, progress = _recorder()
    path = quantize(source=f16_model.path, out_path=out_dir / "tiny-Q4_K_M.gguf", qtype="Q4_K_M", progress=progress,
                    threads=2)
    return Produced(path, events)


def metadata(path: Path) -> dict[str, str]:
    """The GGUF's key/values as llama.cpp reads them (arrays left out), and its vocabulary size."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata, n_vocab=str(llm.n_vocab()))
    finally:
        llm.close()


def tensor_types(path: Path) -> dict[str, GGMLQuantizationType]:
    return {tensor.name: tensor.tensor_type for tensor in GGUFReader(path).tensors}


def generated_tokens(path: Path, count: int = 6) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        prompt = llm.tokenize(b"The sea is", add_bos=False)
        tokens = []
        for token in llm.generate(prompt, temp=0.0):
            tokens.append(token)
            if len(tokens) == count:
                break
        return tokens
    finally:
        llm.close()


def assert_progress_is_monotonic_and_complete(events: list[tuple[int, int, str]], stage: str) -> None:
    assert events, "no progress was reported"
    dones = [done for done, _, _ in events]
    assert dones == sorted(dones) and len(set(dones)) == len(dones)
    assert {total for _, total, _ in events} == {events[-1][1]}
    assert {name for _, _, name in events} == {stage}
    assert events[-1][0] == events[-1][1] > 0


def assert_only(directory: Path, *names: str) -> None:
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


# --- conversion --------------------------------------------------------------------------------

def test_a_checkpoint_converts_to_an_f16_llama_gguf_with_the_smollm2_tokenizer(f16_model):
    meta = metadata(f16_model.path)
    bundled = metadata(bundled_model_path())
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny-llama"
    assert meta["general.file_type"] == str(int(LlamaFileType.MOSTLY_F16))
    assert meta["llama.block_count"] == "2" and meta["llama.embedding_length"] == "256"
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "n_vocab"):
        assert meta[key] == bundled[key], key
    assert meta["tokenizer.ggml.pre"] == "smollm"


def test_conversion_reports_bytes_written_up_to_the_total(f16_model):
    assert_progress_is_monotonic_and_complete(f16_model.events, STAGE_CONVERTING)
    assert f16_model.events[0][0] == 0
    assert f16_model.events[-1][1] <= f16_model.path.stat().st_size


def test_the_converted_model_loads_and_generates_tokens(f16_model):
    assert len(generated_tokens(f16_model.path)) == 6


def test_a_checkpoint_converts_straight_to_q8_0_and_generates(tiny_llama_checkpoint, tmp_path):
    events, progress = _recorder()
    path = convert_checkpoint(source_dir=tiny_llama_checkpoint, out_path=tmp_path / "tiny-q8_0.gguf", outtype="q8_0",
                              progress=progress)
    assert metadata(path)["general.file_type"] == str(int(LlamaFileType.MOSTLY_Q8_0))
    types = tensor_types(path)
    assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == GGMLQuantizationType.F32
    assert_progress_is_monotonic_and_complete(events, STAGE_CONVERTING)
    assert len(generated_tokens(path)) == 6
    assert_only(tmp_path, "tiny-q8_0.gguf")


# --- quantization ------------------------------------------------------------------------------

def test_an_f16_model_quantizes_to_q4_k_m_with_real_k_quant_tensors(q4_k_m_model, f16_model):
    meta = metadata(q4_k_m_model.path)
    assert meta["general.file_type"] == str(int(LlamaFileType.MOSTLY_Q4_K_M))
    assert meta["tokenizer.ggml.pre"] == "smollm"
    types = tensor_types(q4_k_m_model.path)
    # rows of 256 columns, so llama.cpp uses k-quants here rather than its fallback types
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_K
    assert types["token_embd.weight"] == GGMLQuantizationType.Q6_K
    assert q4_k_m_model.path.stat().st_size < f16_model.path.stat().st_size / 2


def test_quantization_reports_source_bytes_done_up_to_the_total(q4_k_m_model, f16_model):
    assert_progress_is_monotonic_and_complete(q4_k_m_model.events, STAGE_QUANTIZING)
    assert q4_k_m_model.events[-1][1] == f16_model.events[-1][1]  # the same tensors, as the converter wrote them
    assert len(q4_k_m_model.events) > 3  # one step per tensor, not just start and end


def test_the_quantized_model_loads_and_answers_a_chat(q4_k_m_model):
    assert len(generated_tokens(q4_k_m_model.path)) == 6
    llm = llama_cpp.Llama(model_path=str(q4_k_m_model.path), n_ctx=256, n_threads=2, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    finally:
        llm.close()
    assert reply["usage"]["prompt_tokens"] > 10  # the SmolLM2 chat template wrapped the message
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


# --- cancellation ------------------------------------------------------------------------------

def test_cancelling_a_conversion_midway_leaves_no_file(tiny_llama_checkpoint, tmp_path):
    events, record = _recorder()
    out = tmp_path / "cancelled.gguf"
    with pytest.raises(ConversionCancelled):
        convert_checkpoint(source_dir=tiny_llama_checkpoint, out_path=out, outtype="f16", progress=record,
                           should_cancel=lambda: bool(events))
    assert events, "the cancel was meant to come after progress started"
    assert_only(tmp_path)


def test_cancelling_a_quantization_before_it_starts_leaves_no_file(f16_model, tmp_path):
    with pytest.raises(ConversionCancelled):
        quantize(source=f16_model.path, out_path=tmp_path / "cancelled.gguf", qtype="Q8_0", should_cancel=lambda: True)
    assert_only(tmp_path)


def test_a_leftover_partial_file_from_a_dead_run_is_replaced(f16_model, tmp_path):
    out = tmp_path / "tiny-Q8_0.gguf"
    partial_path(out).write_bytes(b"GGUF half written by a worker that died")
    quantize(source=f16_model.path, out_path=out, qtype="q8_0", threads=2)
    assert metadata(out)["general.file_type"] == str(int(LlamaFileType.MOSTLY_Q8_0))
    assert_only(tmp_path, "tiny-Q8_0.gguf")


# --- bad input ---------------------------------------------------------------------------------

def checkpoint_copy(source: Path, destination: Path, *, without: tuple[str, ...] = (), config: dict | None = None) -> Path:
    destination.mkdir()
    for item in source.iterdir():
        if item.name not in without:
            (destination / item.name).symlink_to(item)
    if config is not None:
        (destination / "config.json").unlink()
        (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_a_directory_without_config_json_is_refused(tiny_llama_checkpoint, tmp_path):
    source = checkpoint_copy(tiny_llama_checkpoint, tmp_path / "src", without=("config.json",))
    with pytest.raises(ConversionError, match="no config.json"):
        convert_checkpoint(source_dir=source, out_path=tmp_path / "x.gguf", outtype="f16")


def test_a_checkpoint_without_safetensors_is_refused(tiny_llama_checkpoint, tmp_path):
    source = checkpoint_copy(tiny_llama_checkpoint, tmp_path / "src", without=("model.safetensors",))
    (source / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConversionError, match="only PyTorch .bin weights; only safetensors"):
        convert_checkpoint(source_dir=source, out_path=tmp_path / "x.gguf", outtype="f16")


def test_an_unsupported_architecture_is_refused_by_name(tiny_llama_checkpoint, tmp_path):
    config = json.loads((tiny_llama_checkpoint / "config.json").read_text())
    source = checkpoint_copy(tiny_llama_checkpoint, tmp_path / "src",
                             config=dict(config, architectures=["TeapotForCausalLM"], model_type="teapot"))
    with pytest.raises(ConversionError, match="architecture TeapotForCausalLM is not supported"):
        convert_checkpoint(source_dir=source, out_path=tmp_path / "x.gguf", outtype="f16")
    assert_only(tmp_path, "src")


def test_an_unknown_output_type_is_refused_with_the_valid_ones(tiny_llama_checkpoint, tmp_path):
    with pytest.raises(ConversionError, match="f32, f16, bf16, q8_0"):
        convert_checkpoint(source_dir=tiny_llama_checkpoint, out_path=tmp_path / "x.gguf", outtype="q4_0")


def test_an_unknown_quantization_type_is_refused_with_the_valid_ones(f16_model, tmp_path):
    with pytest.raises(ConversionError, match="Q4_K_M") as refused:
        quantize(source=f16_model.path, out_path=tmp_path / "x.gguf", qtype="Q3_XL")
    assert all(name in str(refused.value) for name in SUPPORTED_QUANT_TYPES)


def test_every_offered_quantization_type_is_the_llama_cpp_file_type_of_that_name():
    assert QUANT_FTYPES == {name: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") for name in SUPPORTED_QUANT_TYPES}


def test_requantizing_an_already_quantized_model_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="requantizing from type q4_1 is disabled"):
        quantize(source=bundled_model_path(), out_path=tmp_path / "x.gguf", qtype="Q4_K_M", threads=2)
    assert_only(tmp_path)


def test_a_source_that_is_not_gguf_is_refused(tiny_llama_checkpoint, tmp_path):
    with pytest.raises(ConversionError, match=r"^model\.safetensors: not a GGUF file: it starts with"):
        quantize(source=tiny_llama_checkpoint / "model.safetensors", out_path=tmp_path / "x.gguf", qtype="Q8_0")


def test_an_existing_output_is_never_overwritten(f16_model, tmp_path):
    existing = tmp_path / "taken.gguf"
    shutil.copyfile(f16_model.path, existing)
    with pytest.raises(ConversionError, match="already exists"):
        quantize(source=f16_model.path, out_path=existing, qtype="Q8_0")
    assert existing.stat().st_size == f16_model.path.stat().st_size
