"""Sampling the next token of one sequence from its row of the last decode's logits.

The same steps as a llama.cpp sampler chain, in the same order: frequency and presence penalties
over the last ``PENALTY_LAST_N`` generated tokens, then either the most likely token (temperature 0),
or the nucleus (``top_p``, taken from the untempered distribution, as llama.cpp's chain does),
temperature, and a draw. They are done in numpy, in vectorised passes over the row: llama.cpp's
CPU samplers visit the vocabulary one element at a time (about 0.5 ms per token for SmolLM2's
49,152 tokens at temperature sampling, 5 ms with ``top_p``, which sorts it all), time that a decode
step of eight streams spends eight times over between two decodes. Here a draw costs about 0.1 ms,
and ``top_p`` sorts only the few hundred most likely tokens it needs.

Greedy choice is llama.cpp's exactly (the first of equal maxima, penalties in 32-bit floats as it
computes them). Draws come from numpy's PCG64 generator seeded with the request's seed (any 64-bit
integer; taken modulo 2**64, so every int64 seed has its own stream): the same seed gives the same
text for the same prompt, model build and batch composition (see the README on batching), though
not the text llama.cpp's own generator would draw.
"""

from __future__ import annotations

from collections import deque

import llama_cpp
import numpy as np

from workers.engine.model import LoadedModel
from workers.messages import SamplingParams

PENALTY_LAST_N = 64  # generated tokens the frequency and presence penalties look back over
SEED_MODULUS = 2**64
_BLOCK = 256  # a draw finds its block of the vocabulary by block sums, then the token within the block
_NUCLEUS_START = 256  # the most likely tokens top_p first sorts; more (x8 each time) if they hold too little


def sampler_seed(seed: int | None) -> int | None:
    """The generator's seed for a request's ``seed`` (None: fresh entropy)."""
    return None if seed is None else seed % SEED_MODULUS


class Sampler:
    """Samples (and remembers, for the penalties) the next token of one sequence."""

    def __init__(self, model: LoadedModel, params: SamplingParams) -> None:
        self.n_vocab = model.n_vocab
        self.greedy = params.temperature <= 0
        self.inverse_temperature = np.float32(1.0) / np.float32(params.temperature) if not self.greedy else None
        self.top_p = params.top_p
        self.frequency = np.float32(params.frequency_penalty)
        self.presence = np.float32(params.presence_penalty)
        self.penalised = bool(params.frequency_penalty or params.presence_penalty)
        self.recent: deque[int] = deque(maxlen=PENALTY_LAST_N)
        self.rng = np.random.Generator(np.random.PCG64(sampler_seed(params.seed)))
        blocks = -(-self.n_vocab // _BLOCK)
        self._work = np.full(blocks * _BLOCK, -np.inf, dtype=np.float32)  # the padding stays -inf: weight 0
        self._penalised_row = np.empty(self.n_vocab, dtype=np.float32) if self.penalised else None

    def sample(self, ctx, index: int) -> int:
        """The next token, from row ``index`` of the logits of ``ctx``'s last decode."""
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        if self.penalised and self.recent:
            row = self._penalise(row)
        if self.greedy:
            token = int(row.argmax())
        elif self.top_p < 1.0:
            token = self._draw_nucleus(row)
        else:
            token = self._draw(row)
        if self.penalised:
            self.recent.append(token)
        return token

    def _penalise(self, row: np.ndarray) -> np.ndarray:
        out = self._penalised_row
        np.copyto(out, row)
        tokens, counts = np.unique(np.fromiter(self.recent, dtype=np.int64, count=len(self.recent)),
                                   return_counts=True)
        out[tokens] -= counts.astype(np.float32) * self.frequency + self.presence
        return out

    def _draw(self, row: np.ndarray) -> int:
        """A token drawn with probability softmax(row / temperature), over the whole vocabulary."""
        work = self._work
        head = work[:self.n_vocab]
        np.multiply(row, self.inverse_temperature, out=head)
        head -= head.max()
        np.exp(head, out=head)
        blocks = work.reshape(-1, _BLOCK)
        cumulative = np.cumsum(blocks.sum(axis=1, dtype=np.float64))
        target = self.rng.random() * cumulative[-1]
        block = min(int(np.searchsorted(cumulative, target, side="right")), len(cumulative) - 1)
        within = np.cumsum(blocks[block], dtype=np.float64)
        rest = target - (cumulative[block - 1] if block else 0.0)
        offset = min(int(np.searchsorted(within, rest, side="right")), _BLOCK - 1)
        token = block * _BLOCK + offset
        while work[token] == 0.0:  # rounding at the very end of the range: the last token with weight
            token -= 1
        return token

    def _draw_nucleus(self, row: np.ndarray) -> int:
        """The smallest set of most likely tokens (at temperature 1) whose probability reaches ``top_p``,
        then a draw among them at the temperature."""
        shifted = row - row.max()
        weights = np.exp(shifted)
        total = weights.sum(dtype=np.float64)
        k = min(_NUCLEUS_START, self.n_vocab)
        while True:
            top = np.argpartition(weights, self.n_vocab - k)[self.n_vocab - k:] if k < self.n_vocab else \
                np.arange(self.n_vocab)
            top = top[np.argsort(-weights[top], kind="stable")]
            cumulative = np.cumsum(weights[top], dtype=np.float64) / total
            if cumulative[-1] >= self.top_p or k == self.n_vocab:
                break
            k = min(k * 8, self.n_vocab)
        kept = top[:min(int(np.searchsorted(cumulative, self.top_p, side="left")) + 1, len(top))]
        tempered = np.exp((shifted[kept] * self.inverse_temperature).astype(np.float64))
        cumulative = np.cumsum(tempered)
        choice = min(int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")),
                     len(kept) - 1)
        return int(kept[choice])
