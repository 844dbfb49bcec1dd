"""Embeddings, batched: many inputs share each decode, in a context of their own on the loaded weights."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable

import llama_cpp
import numpy as np

from workers.engine.model import LoadedModel
from workers.generation import InferenceError

MAX_SEQUENCES = 64  # inputs per decode


class EmbeddingEngine:
    def __init__(self, model: LoadedModel, *, n_ctx: int, n_threads: int) -> None:
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx  # one input must fit one micro-batch
        params.n_seq_max = min(MAX_SEQUENCES, llama_cpp.llama_max_parallel_sequences())
        params.n_threads = params.n_threads_batch = n_threads
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.kv_unified = True  # inputs of any length share the cells
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise InferenceError("llama.cpp could not create an embedding context", code="model_unavailable",
                                 status=503, type="server_error")
        self.n_ctx = n_ctx
        self.n_seq_max = params.n_seq_max
        self.n_embd = llama_cpp.llama_model_n_embd(model.ptr)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def tokenize(self, inputs: list[str]) -> list[list[int]]:
        from workers.prompts import check_length

        tokenized = []
        for index, text in enumerate(inputs):
            check_length([text], self.model, self.n_ctx, f"input[{index}]")
            tokens = self.model.tokenize(text, add_special=True, parse_special=False)
            if len(tokens) > self.n_ctx:
                raise InferenceError(f"input[{index}] is longer than the model's context of {self.n_ctx} tokens",
                                     code="context_length_exceeded", param="input")
            tokenized.append(tokens or [self.model.bos])
        return tokenized

    def batches(self, tokenized: list[list[int]]):
        """Groups of input indexes, each as many as fit one decode."""
        group, used = [], 0
        for index, tokens in enumerate(tokenized):
            if group and (used + len(tokens) > self.n_ctx or len(group) >= self.n_seq_max):
                yield group
                group, used = [], 0
            group.append(index)
            used += len(tokens)
        if group:
            yield group

    def embed(self, tokenized: list[list[int]], group: list[int]) -> list[list[float]]:
        """Normalised mean-pooled vectors of the inputs in ``group`` (one decode)."""
        batch, n = self._batch, 0
        llama_cpp.llama_memory_clear(self.memory, True)
        for seq_id, index in enumerate(group):
            for pos, token in enumerate(tokenized[index]):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                batch.seq_id[n][0], batch.logits[n] = seq_id, True
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise InferenceError(f"llama.cpp could not compute embeddings (error {rc})", code="internal_error",
                                 status=500, type="server_error")
        vectors = []
        for seq_id in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq_id)
            vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float32)
            norm = float(np.linalg.norm(vector))
            vectors.append((vector / norm if norm > 0 and math.isfinite(norm) else vector).tolist())
        return vectors


def embedding_result(vectors: list[list[float]], total_tokens: int, encoding_format: str) -> dict:
    data = []
    for index, vector in enumerate(vectors):
        if encoding_format == "base64":
            encoded: object = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        else:
            encoded = vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"data": data, "usage": {"prompt_tokens": total_tokens, "total_tokens": total_tokens}}


def embed_all(engine: EmbeddingEngine, inputs: list[str], encoding_format: str,
              cancelled: Callable[[], bool] = lambda: False) -> dict | None:
    """Every input's vector, batch by batch; None when ``cancelled`` turns true between batches."""
    tokenized = engine.tokenize(inputs)
    vectors: list[list[float]] = []
    for group in engine.batches(tokenized):
        if cancelled():
            return None
        vectors += engine.embed(tokenized, group)
    return embedding_result(vectors, sum(len(t) for t in tokenized), encoding_format)
