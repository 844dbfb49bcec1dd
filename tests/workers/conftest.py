"""Fixtures for the worker runtime tests: the tiny llama checkpoint, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_llama import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM Hugging Face checkpoint with SmolLM2's tokenizer (read-only: copy to change it)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")
