"""The typed messages between gateway and worker, each defined once with its defaults.

The gateway builds an ``InferenceRequest``; Celery carries it as JSON (``to_wire``: the keyword
arguments of the ``inference_run`` task, ``request_id``, ``kind``, ``model`` and ``params``, the
shape that task has always had); the node's task turns them back into one (``from_wire``) and
hands it to ``workers.runner.request_run``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from workers.protocol import KIND_CHAT, KIND_EMBEDDING


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a chat or completion request; the defaults are the OpenAI API's."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                "stop": list(self.stop), "seed": self.seed}

    @classmethod
    def from_wire(cls, params: Mapping[str, Any]) -> SamplingParams:
        defaults = cls(max_tokens=0)
        return cls(max_tokens=params["max_tokens"],
                   temperature=params.get("temperature", defaults.temperature),
                   top_p=params.get("top_p", defaults.top_p),
                   stop=tuple(params.get("stop") or ()), seed=params.get("seed"),
                   frequency_penalty=params.get("frequency_penalty", defaults.frequency_penalty),
                   presence_penalty=params.get("presence_penalty", defaults.presence_penalty))


# The defaults above, for the gateway's validation of a client's body.
SAMPLING_DEFAULTS = SamplingParams(max_tokens=0)


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to find, fetch and load a registered model; plain JSON values only."""

    id: str
    source: str
    file_name: str
    size_bytes: int = 0
    sha256: str = ""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ModelRef:
        return cls(id=wire["id"], source=wire["source"], file_name=wire["file_name"],
                   size_bytes=wire.get("size_bytes") or 0, sha256=wire.get("sha256") or "")


@dataclass(frozen=True)
class InferenceRequest:
    """One request for a worker: a chat (``messages``), a completion (``prompt``) or embeddings (``input``)."""

    request_id: str
    kind: str
    model: ModelRef
    messages: tuple[dict[str, str], ...] = ()  # chat
    prompt: str = ""  # completion
    input: tuple[str, ...] = ()  # embedding
    encoding_format: str = "float"  # embedding
    sampling: SamplingParams | None = None  # chat and completion

    @classmethod
    def from_params(cls, *, request_id: str, kind: str, model: ModelRef, params: Mapping[str, Any]) -> InferenceRequest:
        """From the validated body's ``params`` (the wire's ``params`` too)."""
        if kind == KIND_EMBEDDING:
            return cls(request_id, kind, model, input=tuple(params["input"]),
                       encoding_format=params.get("encoding_format", "float"))
        sampling = SamplingParams.from_wire(params)
        if kind == KIND_CHAT:
            return cls(request_id, kind, model, messages=tuple(params["messages"]), sampling=sampling)
        return cls(request_id, kind, model, prompt=params["prompt"], sampling=sampling)

    def params(self) -> dict[str, Any]:
        if self.kind == KIND_EMBEDDING:
            return {"input": list(self.input), "encoding_format": self.encoding_format}
        what = {"messages": list(self.messages)} if self.kind == KIND_CHAT else {"prompt": self.prompt}
        return {**what, **self.sampling.to_wire()}

    def to_wire(self) -> dict[str, Any]:
        """The ``inference_run`` task's keyword arguments (JSON values only)."""
        return {"request_id": self.request_id, "kind": self.kind, "model": self.model.to_wire(),
                "params": self.params()}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> InferenceRequest:
        return cls.from_params(request_id=wire["request_id"], kind=wire["kind"],
                               model=ModelRef.from_wire(wire["model"]), params=wire["params"])

