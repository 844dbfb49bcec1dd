"""What one generated sequence turns into: text pieces, stop sequences, finish reasons, errors."""

from __future__ import annotations

import codecs


class InferenceError(Exception):
    """A request the worker cannot serve; carries the OpenAI error fields for the client."""

    def __init__(self, message: str, *, code: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.code, self.status, self.param, self.type = message, code, status, param, type

    def as_event(self) -> dict:
        return {"message": self.message, "code": self.code, "status": self.status, "param": self.param,
                "type": self.type}


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class TextStream:
    """Token bytes in, completion text out: incremental UTF-8 and stop sequences.

    Guarantees: the concatenation of what ``push`` and ``finish`` return is the completion text,
    with a stop sequence and everything after it removed; text that could still become a stop
    sequence is held back until it cannot.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False  # a stop sequence was generated

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; returns the text that is now final (maybe empty)."""
        self._pending += self._decoder.decode(piece)
        hit = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            text, self._pending = self._pending[:hit], ""
            return text
        keep = _held_back(self._pending, self.stops)
        text = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return text

    def finish(self) -> str:
        """The text held back for a stop sequence that never completed."""
        if self.stopped:
            return ""
        text, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return text
