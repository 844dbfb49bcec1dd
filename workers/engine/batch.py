"""Continuous batching: one llama.cpp context, many sequences, one decode step at a time.

Each step packs the next token of every sequence that is generating together with a bounded
chunk of the prompts still being read, so a long new prompt delays the running streams by one
chunk, not by its whole length. Requests join between steps; a sequence that finishes or is
cancelled leaves its slot free at once. Each slot keeps the tokens whose KV it holds, so the
next request whose prompt starts the same way (a shared system prompt, the earlier turns of a
conversation) reads only the part that differs: from its own slot, or copied in from whichever
slot holds the longest start, busy or not (the same prompt sent by several clients at once is read
once). A new prompt takes the least recently used free slot, so the prompts that other slots hold
stay for the requests that repeat them.
"""

from __future__ import annotations

import ctypes
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import llama_cpp

from workers.engine.model import LoadedModel
from workers.engine.sampling import Sampler
from workers.generation import InferenceError, TextStream
from workers.messages import SamplingParams

DEFAULT_BATCH = 512  # tokens per decode step: a prompt is read in chunks of at most this
ABORT_CHECK_MIN_TOKENS = 256  # prompt tokens in a step from which cancellation is checked during the decode
_NO_ABORT = llama_cpp.ggml_abort_callback(0)
# A prompt start another slot holds is copied in (rather than read again) when that saves at least one
# token per this many cells copied: copying a cell's K and V is hundreds of times cheaper than computing it.
SHARE_CELLS_PER_TOKEN = 64


class SequenceSink(Protocol):
    """Where one sequence's output goes (the runner's request stream, or a test's list)."""

    def text(self, text: str) -> None: ...

    def finish(self, finish_reason: str, usage: dict, timings: dict) -> None: ...

    def fail(self, error: InferenceError) -> None: ...

    def cancel(self, tokens_emitted: int) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    sampling: SamplingParams
    sink: SequenceSink
    stops: tuple[str, ...] = ()
    submitted_at: float = field(default_factory=time.monotonic)
    # State while it runs
    slot: Slot | None = None
    prompt_read: int = 0  # prompt tokens whose KV is in the slot
    reused: int = 0  # of which were already there from an earlier request
    next_token: int | None = None  # sampled, not yet decoded
    completion_tokens: int = 0
    tokens_emitted: int = 0
    first_token_at: float | None = None
    started_at: float | None = None
    max_shared: int = 0  # most sequences that shared one decode step with this one (itself included)
    sampler: Sampler | None = None
    text: TextStream | None = None


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this slot's memory holds, in order
    sequence: Sequence | None = None
    released_at: float = 0.0  # when its last sequence ended (least recently used slots are taken first)
    prompt_len: int = 0  # the length of its last sequence's prompt (the start of ``cached``)


@dataclass
class StepStats:
    steps: int = 0
    tokens: int = 0
    sequences_per_step: dict[int, int] = field(default_factory=dict)  # sequences in a step -> how many steps

    def as_dict(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens,
                "sequences_per_step": {str(k): v for k, v in sorted(self.sequences_per_step.items())}}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchEngine:
    """Generation for up to ``n_slots`` sequences at once, each with ``n_ctx_per_seq`` positions."""

    def __init__(self, model: LoadedModel, *, n_slots: int, n_ctx_per_seq: int, n_threads: int,
                 n_batch: int = DEFAULT_BATCH, flash_attn: int = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                 step_lock: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.model = model
        n_slots = max(1, min(n_slots, llama_cpp.llama_max_parallel_sequences()))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_slots * n_ctx_per_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_slots
        params.n_threads = params.n_threads_batch = n_threads
        # Each sequence its own n_ctx_per_seq cells: a decode attends only over the cells of the
        # sequences in it. In one unified pool every step would also scan the cells of what idle
        # slots keep cached (long prompts, say), and a short stream would pay for them.
        params.kv_unified = False
        params.flash_attn_type = flash_attn
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise InferenceError(f"llama.cpp could not create a context of {params.n_ctx} positions for "
                                 f"{n_slots} sequences", code="model_unavailable", status=503, type="server_error")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        self.n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        self.waiting: deque[Sequence] = deque()
        self.stats = StepStats()
        self._step_lock = step_lock
        self._reuse = model.can_trim_memory
        self._abort_members: list[Sequence] = []
        # Kept on the instance: llama.cpp holds only the C pointer.
        self._abort_callback = llama_cpp.ggml_abort_callback(
            lambda _: bool(self._abort_members) and all(s.sink.cancelled() for s in self._abort_members))

    def close(self) -> None:
        for sequence in list(self._running()) + list(self.waiting):
            self._release(sequence)
        if self.ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    # -- requests ------------------------------------------------------------------------------
    def add(self, sequence: Sequence) -> bool:
        """Queue a sequence; False (after failing it) when its prompt cannot fit a slot."""
        if not sequence.prompt:
            sequence.prompt = [self.model.bos]
        if len(sequence.prompt) >= self.n_ctx_seq:
            sequence.sink.fail(InferenceError(
                f"This model's maximum context length is {self.n_ctx_seq} tokens, but the prompt has "
                f"{len(sequence.prompt)} tokens.", code="context_length_exceeded", param="messages"))
            return False
        self.waiting.append(sequence)
        return True

    def busy(self) -> bool:
        return bool(self.waiting) or any(slot.sequence is not None for slot in self.slots)

    def active(self) -> int:
        return len(self.waiting) + sum(slot.sequence is not None for slot in self.slots)

    def _running(self):
        return (slot.sequence for slot in self.slots if slot.sequence is not None)

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> int:
        """Decode once for every sequence that has work; returns how many sequences took part."""
        self._drop_cancelled()
        self._admit()
        batch, outputs, members = self._batch, [], []
        chunks: dict[Sequence, list[int]] = {}  # the prompt tokens each reading sequence put in this step
        n = 0
        for sequence in self._running():
            if sequence.next_token is not None:
                self._put(n, sequence.next_token, len(sequence.slot.cached), sequence.slot.seq_id, True)
                outputs.append((n, sequence))
                members.append(sequence)
                n += 1
        for sequence in self._running():  # prompts, oldest first, in what room is left
            if sequence.next_token is not None or n >= self.n_batch:
                continue
            chunk = sequence.prompt[sequence.prompt_read: sequence.prompt_read + self.n_batch - n]
            if not chunk:
                continue
            base = len(sequence.slot.cached)
            last = sequence.prompt_read + len(chunk) == len(sequence.prompt)
            for offset, token in enumerate(chunk):
                self._put(n, token, base + offset, sequence.slot.seq_id, last and offset == len(chunk) - 1)
                n += 1
            if last:
                outputs.append((n - 1, sequence))
            members.append(sequence)
            chunks[sequence] = chunk
        if n == 0:
            return 0
        batch.n_tokens = n
        # A step that reads prompt chunks can take long on a big model: it stops early if every
        # sequence in it is cancelled meanwhile. (Not armed for plain decode steps, which are short
        # and where a callback per graph node would cost more than it saves.)
        abortable = n > len(outputs) + ABORT_CHECK_MIN_TOKENS
        if abortable:
            self._abort_members = members
            llama_cpp.llama_set_abort_callback(self.ctx, self._abort_callback, None)
        try:
            with self._step_lock():
                rc = llama_cpp.llama_decode(self.ctx, batch)
        finally:
            if abortable:
                llama_cpp.llama_set_abort_callback(self.ctx, _NO_ABORT, None)
                self._abort_members = []
        if rc == 2:  # aborted: everyone in the step had been cancelled
            for sequence in members:
                self._forget_slot(sequence.slot)
                sequence.sink.cancel(sequence.tokens_emitted)
                self._release(sequence)
            return len(members)
        if rc != 0:
            error = InferenceError(f"llama.cpp could not decode (error {rc})", code="internal_error", status=500,
                                   type="server_error")
            for sequence in members:
                self._forget_slot(sequence.slot)
                sequence.sink.fail(error)
                self._release(sequence)
            return len(members)
        self.stats.steps += 1
        self.stats.tokens += n
        self.stats.sequences_per_step[len(members)] = self.stats.sequences_per_step.get(len(members), 0) + 1
        for sequence in members:
            sequence.max_shared = max(sequence.max_shared, len(members))
            if sequence.next_token is not None:
                sequence.slot.cached.append(sequence.next_token)
                sequence.next_token = None
            else:
                sequence.slot.cached.extend(chunks[sequence])
                sequence.prompt_read += len(chunks[sequence])
        for index, sequence in outputs:
            self._accept(sequence, sequence.sampler.sample(self.ctx, index))
        return len(members)

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _admit(self) -> None:
        """Give free slots to waiting sequences (``_pick_slot``), each with as much of its prompt's
        start as any slot holds (``_reuse_prefix``)."""
        free = [slot for slot in self.slots if slot.sequence is None]
        while self.waiting and free:
            sequence = self.waiting.popleft()
            if sequence.sink.cancelled():
                sequence.sink.cancel(0)
                continue
            held = {slot: _common_prefix(slot.cached, sequence.prompt) for slot in self.slots} if self._reuse else {}
            slot = self._pick_slot(free, sequence.prompt, held)
            free.remove(slot)
            keep = self._reuse_prefix(slot, sequence.prompt, held) if self._reuse else 0
            if not llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1):
                llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                keep = 0
            del slot.cached[keep:]
            slot.sequence, sequence.slot = sequence, slot
            slot.prompt_len = len(sequence.prompt)
            sequence.prompt_read = sequence.reused = keep
            sequence.started_at = time.monotonic()
            sequence.sampler = Sampler(self.model, sequence.sampling)
            sequence.text = TextStream(sequence.stops + tuple(sequence.sampling.stop))

    def _pick_slot(self, free: list[Slot], prompt: list[int], held: dict[Slot, int]) -> Slot:
        """A free slot whose last prompt ``prompt`` starts with (an earlier turn of this conversation,
        the same prompt sent before) is taken as it is. Otherwise the least recently used free slot
        is taken, and ``_reuse_prefix`` shares in the start it lacks (a system prompt, say) from
        whichever slot holds it, so that no slot's prompt is overwritten while an older one is idle.
        ``held``: how many of the prompt's first tokens each slot holds (empty without reuse)."""
        covering = [s for s in free if held and s.cached and held[s] >= min(s.prompt_len, len(prompt)) - 1]
        if covering:
            return max(covering, key=held.get)
        return min(free, key=lambda s: s.released_at)

    def _reuse_prefix(self, slot: Slot, prompt: list[int], held: dict[Slot, int]) -> int:
        """How many of ``prompt``'s first tokens ``slot`` will hold without reading them: its own,
        or, where another slot (busy or free) holds a longer start of it, that slot's cells copied
        in (the caller trims what follows). A copy moves the other sequence's whole KV (its bytes,
        not a computation), so it is made only where it saves at least one token per
        ``SHARE_CELLS_PER_TOKEN`` cells copied."""
        limit = len(prompt) - 1  # the last prompt token is read again for its logits
        keep = min(held[slot], limit)
        donor = max(self.slots, key=held.get)
        shared = min(held[donor], limit)
        if donor is slot or (shared - keep) * SHARE_CELLS_PER_TOKEN < len(donor.cached):
            return keep
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        slot.cached.clear()
        size = llama_cpp.llama_state_seq_get_size(self.ctx, donor.seq_id)
        state = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, state, size, donor.seq_id)
        if not written or not llama_cpp.llama_state_seq_set_data(self.ctx, state, written, slot.seq_id):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            return 0
        slot.cached[:] = donor.cached
        return shared

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.waiting if s.sink.cancelled()]:
            self.waiting.remove(sequence)
            sequence.sink.cancel(0)
        for sequence in [s for s in self._running() if s.sink.cancelled()]:
            sequence.sink.cancel(sequence.tokens_emitted)
            self._release(sequence)

    def _accept(self, sequence: Sequence, token: int) -> None:
        now = time.monotonic()
        if sequence.first_token_at is None:
            sequence.first_token_at = now
        if self.model.is_eog(token):
            return self._finish(sequence, "stop")
        sequence.completion_tokens += 1
        text = sequence.text.push(self.model.piece(token))
        if text:
            sequence.sink.text(text)
            sequence.tokens_emitted += 1
        if sequence.text.stopped:
            return self._finish(sequence, "stop")
        if (sequence.completion_tokens >= sequence.sampling.max_tokens
                or len(sequence.slot.cached) + 1 >= self.n_ctx_seq):
            return self._finish(sequence, "length")
        sequence.next_token = token

    def _finish(self, sequence: Sequence, finish_reason: str) -> None:
        tail = sequence.text.finish()
        if tail:
            sequence.sink.text(tail)
            sequence.tokens_emitted += 1
        usage = {"prompt_tokens": len(sequence.prompt), "completion_tokens": sequence.completion_tokens,
                 "total_tokens": len(sequence.prompt) + sequence.completion_tokens}
        now = time.monotonic()
        first = sequence.first_token_at or now
        timings = {"queued_ms": round(((sequence.started_at or now) - sequence.submitted_at) * 1000, 2),
                   "ttft_ms": round((first - sequence.submitted_at) * 1000, 2),
                   "decode_ms": round((now - first) * 1000, 2),
                   "prompt_tokens_reused": sequence.reused, "max_batch_sequences": sequence.max_shared}
        sequence.sink.finish(finish_reason, usage, timings)
        self._release(sequence)

    def _release(self, sequence: Sequence) -> None:
        if sequence.slot is not None:
            sequence.slot.sequence = None
            sequence.slot.released_at = time.monotonic()
        sequence.sampler = None  # numpy buffers: nothing of llama.cpp's to free

    def _forget_slot(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        slot.cached.clear()
