"""The token loop against the real bundled model, in process."""

from __future__ import annotations

import pytest

from workers.bundled import bundled_model_path
from workers.generation import InferenceError, SamplingParams, _held_back, generate
from workers.pool import ModelKey
from workers.prompts import chat_prompt_tokens, completion_prompt_tokens
from workers.runner import NodeConfig, load_llama


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    config = NodeConfig(name="unit", models_dir=tmp_path_factory.mktemp("models"), redis_prefix="unit", n_ctx=512,
                        n_gpu_layers=0, n_threads=0)
    return load_llama(ModelKey("smollm2", str(bundled_model_path())), config)


def run(llm, prompt: str, **params) -> tuple[str, list[str], object]:
    pieces: list[str] = []
    result = generate(llm, completion_prompt_tokens(llm, prompt),
                      SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **params}), pieces.append)
    return "".join(pieces), pieces, result


@pytest.mark.parametrize("text, stops, held", [
    ("hello wor", ("world",), 3),
    ("hello", ("xyz",), 0),
    ("abcab", ("abc",), 2),
    ("end\n", ("\n\n",), 1),
])
def test_only_a_possible_start_of_a_stop_sequence_is_held_back(text, stops, held):
    assert _held_back(text, stops) == held


def test_pieces_are_never_empty_and_usage_counts_every_token(llm):
    text, pieces, result = run(llm, "The capital of France is", max_tokens=10)
    assert all(pieces)
    assert result.completion_tokens == 10 and result.finish_reason == "length"
    assert result.prompt_tokens == len(completion_prompt_tokens(llm, "The capital of France is"))


def test_a_stop_sequence_is_removed_with_everything_after_it(llm):
    free, _, _ = run(llm, "1, 2, 3, 4,", max_tokens=20)
    stop = free[6:9]
    cut, pieces, result = run(llm, "1, 2, 3, 4,", max_tokens=20, stop=(stop,))
    assert cut == free[: free.index(stop)]
    assert result.finish_reason == "stop"
    assert stop not in "".join(pieces)


def test_the_same_seed_gives_the_same_text(llm):
    first, _, _ = run(llm, "Once upon a time", temperature=0.9, seed=42)
    second, _, _ = run(llm, "Once upon a time", temperature=0.9, seed=42)
    assert first == second


def test_a_prompt_over_the_context_is_refused(llm):
    with pytest.raises(InferenceError) as caught:
        run(llm, "word " * 600)
    assert caught.value.code == "context_length_exceeded" and caught.value.status == 400


def test_the_chat_template_from_the_gguf_is_used(llm):
    tokens, stops = chat_prompt_tokens(llm, [{"role": "user", "content": "hi"}])
    rendered = llm.detokenize(tokens, special=True).decode()
    assert "<|im_start|>user\nhi<|im_end|>" in rendered
    assert rendered.rstrip().endswith("<|im_start|>assistant")
    assert stops == ["<|im_end|>"]


def test_an_exception_from_emit_stops_generation(llm):
    class Stop(Exception):
        pass

    seen = []

    def emit(piece):
        seen.append(piece)
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        generate(llm, completion_prompt_tokens(llm, "Once upon a time"), SamplingParams(max_tokens=200, temperature=0.0),
                 emit)
    assert len(seen) == 3
