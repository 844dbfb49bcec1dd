"""One GGUF model's weights loaded once, with its vocabulary: what every context of a runner shares.

Everything here talks to llama.cpp through llama-cpp-python's low-level bindings; the high-level
``Llama`` class drives a single sequence and so is not used by the engine.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cached_property
from pathlib import Path

import llama_cpp

_backend_ready = threading.Lock()
_backend_started = False


def backend_init() -> None:
    """Initialise llama.cpp once per process, with only its errors logged."""
    global _backend_started
    with _backend_ready:
        if not _backend_started:
            from llama_cpp import _logger

            _logger.set_verbose(False)  # llama.cpp's own log: errors only, to stderr
            llama_cpp.llama_backend_init()
            _backend_started = True


class ModelLoadError(RuntimeError):
    """llama.cpp could not load the file (not a GGUF it understands, or not enough memory)."""


class LoadedModel:
    """A model's weights and vocabulary. Not thread-safe for loading; reading is."""

    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0) -> None:
        backend_init()
        self.path = str(path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.ptr = llama_cpp.llama_model_load_from_file(self.path.encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load {Path(self.path).name}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self._piece_buffer = ctypes.create_string_buffer(256)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    # -- facts -------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        """Bytes llama.cpp holds for the weights (on the GPU or the CPU)."""
        return int(llama_cpp.llama_model_size(self.ptr))

    @property
    def n_ctx_train(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self.ptr))

    @property
    def can_trim_memory(self) -> bool:
        """Whether a sequence's KV can be cut back to a prefix (for prompt reuse).

        Recurrent and hybrid models keep a state, not per-position entries, and a sliding-window
        cache may already have dropped the positions a prefix needs: those recompute instead.
        """
        return not (llama_cpp.llama_model_is_recurrent(self.ptr) or llama_cpp.llama_model_is_hybrid(self.ptr)
                    or llama_cpp.llama_model_n_swa(self.ptr) > 0)

    def kv_bytes_per_token(self) -> int:
        """F16 K and V bytes one position of one sequence takes (llama.cpp's default cache type)."""
        n_layer = llama_cpp.llama_model_n_layer(self.ptr)
        n_head = max(1, self.metadata_int("attention.head_count") or 1)
        n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        n_head_kv = llama_cpp.llama_model_n_head_kv(self.ptr) or n_head
        head_dim = n_embd // n_head
        return n_layer * 2 * n_head_kv * head_dim * 2

    def metadata(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buffer, size)
            if length < 0:
                return None
            if length < size:
                return buffer.value.decode("utf-8", errors="replace")
            size = length + 1

    def metadata_int(self, suffix: str) -> int | None:
        arch = self.metadata("general.architecture") or ""
        value = self.metadata(f"{arch}.{suffix}")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    @cached_property
    def chat_template(self) -> str | None:
        return self.metadata("tokenizer.chat_template")

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str | bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:  # cannot happen with one slot per byte plus specials, but never truncate silently
            tokens = (llama_cpp.llama_token * -count)()
            count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, -count, add_special, parse_special)
        return list(tokens[:count])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (control tokens render as nothing unless ``special``)."""
        buffer = self._piece_buffer
        length = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        if length < 0:
            buffer = ctypes.create_string_buffer(-length)
            length = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:length]

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return (llama_cpp.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @cached_property
    def longest_token_bytes(self) -> int:
        """The longest piece any token decodes to: a text of N bytes has at least N / this many tokens."""
        return max([len(self.piece(token)) for token in range(self.n_vocab)] + [1])

    @cached_property
    def control_token_texts(self) -> tuple[str, ...]:
        """Texts that parse as a control token (``<|im_start|>`` and the like), longest first."""
        texts = set()
        for token in range(self.n_vocab):
            attr = llama_cpp.llama_vocab_get_attr(self.vocab, token)
            if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED):
                text = self.token_text(token)
                if text:
                    texts.add(text)
        return tuple(sorted(texts, key=len, reverse=True))
