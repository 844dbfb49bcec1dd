"""One llama.cpp sampler chain per sequence, built from the request's sampling parameters."""

from __future__ import annotations

import llama_cpp

from workers.engine.model import LoadedModel
from workers.messages import SamplingParams

PENALTY_LAST_N = 64  # tokens the frequency and presence penalties look back over

# llama.cpp's dist sampler takes a 32-bit seed, and 0xFFFFFFFF means "draw a random one".
# A client's seed is reduced modulo 2**32 - 1, so every seed is reproducible and two seeds that
# differ by a multiple of 4294967295 sample alike.
SEED_MODULUS = 0xFFFFFFFF


def dist_seed(seed: int | None) -> int:
    return llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed % SEED_MODULUS


class Sampler:
    """Samples (and accepts) the next token of one sequence from its row of the last decode's logits."""

    def __init__(self, model: LoadedModel, params: SamplingParams) -> None:
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # noqa: E731
        if params.frequency_penalty or params.presence_penalty:
            add(llama_cpp.llama_sampler_init_penalties(model.n_vocab, PENALTY_LAST_N, 1.0,
                                                       params.frequency_penalty, params.presence_penalty))
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            add(llama_cpp.llama_sampler_init_dist(dist_seed(params.seed)))

    def sample(self, ctx, index: int) -> int:
        return llama_cpp.llama_sampler_sample(self._chain, ctx, index)

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
