"""Fit analysis: which models a machine can run, at which quantization, how fast and how well.

Pure Python on plain values (no ORM), shared by the per-node API, the fleet matrix, the
placement selector and ``manage.py fit`` / ``fit serve``.

Memory a model needs at one quantization, for ``seqs`` sequences of ``ctx`` tokens each::

    weights   = the GGUF file's size at that quantization (loaded once, whatever the sequences)
    kv_cache  = 2 (K and V) x layers x kv_heads x head_dim x ctx x seqs x 2 bytes (f16 cache)
    overhead  = 0.5 GiB (CUDA/CPU runtime, compute buffers, scratch)
    required  = weights + kv_cache + overhead

``ctx`` is the model's own context length, capped by ``max_context`` (or, without one, by the
context the platform loads models with, ``LLMP_N_CTX``). ``seqs`` is 1 for llmfit's single-stream
estimate; the platform's own estimates use the sequences a runner batches (``LLMP_POOL_SLOTS_PER_MODEL``),
which is what a runner allocates.

Run mode and fit level (V = VRAM of the node's GPUs, R = the node's RAM):

* ``gpu`` when required <= V: perfect up to 80 % of V, good up to 90 %, marginal up to 100 %.
* ``cpu_offload`` (layers split over GPU and CPU) when V > 0 and the model does not fit in V:
  good up to 70 % of V + R, marginal up to 85 %, too_tight beyond.
* ``cpu_only`` when there is no GPU: good up to 70 % of R, marginal up to 85 %, too_tight beyond.

Only a model wholly on a GPU can be perfect: the rest of the machine needs its RAM too.

Best quantization: among Q8_0 down to Q2_K (F16 only when nothing else is published), the
highest-quality one that runs wholly on the GPU at good or better; else wholly on the GPU at
marginal; else the highest-quality one at good or better, then marginal, in CPU or offload
mode; else the smallest (too_tight).

Tokens per second (decoding reads every active weight once per token, so memory bandwidth
bounds it): ``efficiency x bandwidth / active weight bytes``, efficiency 0.6 on a GPU and 0.5
on CPU RAM; in offload mode the GPU's share of the weights (what fits in V) and the CPU's
share add their times. Mixture-of-experts models read only their active parameters.

A measurement recorded by the node's worker (``FitMeasurement``) replaces the modelled
memory and/or speed, and the row says ``estimate_source: measured``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

from llmplatform.errors import ApplicationError

GIB = 1024 ** 3
CATALOG_PATH = Path(__file__).resolve().parent / "data" / "catalog.json"

RUNTIME_OVERHEAD_BYTES = GIB // 2
KV_CACHE_BYTES_PER_VALUE = 2  # f16, llama.cpp's default cache type
GPU_PERFECT_MAX, GPU_GOOD_MAX = 0.80, 0.90
SHARED_GOOD_MAX, SHARED_MARGINAL_MAX = 0.70, 0.85
GPU_EFFICIENCY, CPU_EFFICIENCY = 0.6, 0.5
UNKNOWN_GPU_BANDWIDTH_GBPS = 300.0
SPEED_TARGET_TPS = 30.0

RUN_MODE_LABELS = {"gpu": "GPU", "cpu_offload": "CPU+GPU", "cpu_only": "CPU"}
USE_CASES = ("general", "coding", "reasoning", "chat", "multimodal", "embedding")
USE_CASE_LABELS = {"general": "General", "coding": "Coding", "reasoning": "Reasoning", "chat": "Chat",
                   "multimodal": "Multimodal", "embedding": "Embedding"}
# Bits per weight of a whole GGUF file (embeddings and output kept at higher precision included),
# for quantizations named by a registered model's file_type and for sorting by quality.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6.0, "Q5_K_M": 5.7,
    "Q5_K_S": 5.55, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K_M": 4.85, "Q4_K_S": 4.6, "Q4_0": 4.55, "IQ4_NL": 4.55,
    "IQ4_XS": 4.3, "MXFP4": 4.25, "Q3_K_L": 4.3, "Q3_K_M": 3.9, "Q3_K_S": 3.5, "IQ3_M": 3.7, "IQ3_XXS": 3.1,
    "Q2_K": 3.0, "IQ2_M": 2.7, "IQ2_XXS": 2.1,
}
_FULL_PRECISION = {"F32", "F16", "BF16"}


class FitLevel(StrEnum):
    """How well a model fits a machine, worst first; a ``str``, so rows and JSON carry the bare value.

    The one ranking of levels: ``rank`` (and ``<``, ``>=``...) grows with the fit, so the best
    level is ``max(levels)`` and placement prefers a higher rank.
    """

    TOO_TIGHT = "too_tight"
    MARGINAL = "marginal"
    GOOD = "good"
    PERFECT = "perfect"

    @property
    def rank(self) -> int:
        return _FIT_ORDER.index(self)

    @property
    def label(self) -> str:
        return _FIT_LABELS[self]

    @property
    def score(self) -> float:
        return _FIT_SCORES[self]

    @property
    def runnable(self) -> bool:
        return self is not FitLevel.TOO_TIGHT

    def __lt__(self, other):
        return self.rank < FitLevel(other).rank if isinstance(other, str) else NotImplemented

    def __le__(self, other):
        return self.rank <= FitLevel(other).rank if isinstance(other, str) else NotImplemented

    def __gt__(self, other):
        return self.rank > FitLevel(other).rank if isinstance(other, str) else NotImplemented

    def __ge__(self, other):
        return self.rank >= FitLevel(other).rank if isinstance(other, str) else NotImplemented


_FIT_ORDER = tuple(FitLevel)
_FIT_LABELS = {FitLevel.PERFECT: "Perfect", FitLevel.GOOD: "Good", FitLevel.MARGINAL: "Marginal",
               FitLevel.TOO_TIGHT: "Too Tight"}
_FIT_SCORES = {FitLevel.PERFECT: 100.0, FitLevel.GOOD: 80.0, FitLevel.MARGINAL: 50.0, FitLevel.TOO_TIGHT: 0.0}


class FitQueryError(ApplicationError, ValueError):
    """A query parameter has a value the fit API does not accept (400); the message is llmfit's."""


@dataclass(frozen=True)
class Quantization:
    name: str
    size_bytes: int
    estimated: bool

    @property
    def bits_per_weight(self) -> float:
        return BITS_PER_WEIGHT.get(self.name.upper(), 8.0)


@dataclass(frozen=True)
class ModelSpec:
    """One model fit analysis can place: a catalog entry or a model registered on the platform."""

    name: str
    provider: str
    parameter_count: int
    active_parameters: int | None
    context_length: int
    use_cases: tuple[str, ...]
    release_date: str | None
    architecture: str
    layers: int | None
    kv_heads: int | None
    head_dim: int | None
    quantizations: tuple[Quantization, ...]
    source: str = "catalog"  # or "registered"

    @property
    def is_moe(self) -> bool:
        return bool(self.active_parameters) and self.active_parameters < self.parameter_count

    @property
    def use_case(self) -> str:
        return self.use_cases[0] if self.use_cases else "general"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    vram_bytes: int
    vram_free_bytes: int | None
    bandwidth_gbps: float | None
    extra: Mapping = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Machine:
    """What fit analysis needs to know about one node, from its hardware snapshot."""

    name: str
    os: str
    cpu_name: str
    cpu_cores: int | None
    ram_bytes: int
    ram_available_bytes: int
    ram_bandwidth_gbps: float
    gpus: tuple[Gpu, ...]
    hardware: Mapping = field(default_factory=dict, compare=False)
    memory_override: bool = False

    @property
    def vram_bytes(self) -> int:
        return sum(gpu.vram_bytes for gpu in self.gpus)

    def gpu_seconds_per_byte(self) -> float:
        """Layers are split over GPUs in proportion to their VRAM and run one after another."""
        total = self.vram_bytes
        return sum((gpu.vram_bytes / total) / ((gpu.bandwidth_gbps or UNKNOWN_GPU_BANDWIDTH_GBPS) * 1e9)
                   for gpu in self.gpus)


@dataclass(frozen=True)
class Measurement:
    memory_bytes: int | None = None
    tokens_per_second: float | None = None


# --- the catalog -------------------------------------------------------------------------

@cache
def catalog_models() -> tuple[ModelSpec, ...]:
    """The curated catalog (read once per process)."""
    data = json.loads(CATALOG_PATH.read_text())
    return tuple(_spec_from_catalog(entry) for entry in data["models"])


def _spec_from_catalog(entry: dict) -> ModelSpec:
    arch = entry["architecture"]
    return ModelSpec(
        name=entry["name"], provider=entry["provider"], parameter_count=int(entry["parameter_count"]),
        active_parameters=entry.get("active_parameters"), context_length=int(entry["context_length"]),
        use_cases=tuple(entry["use_cases"]), release_date=entry.get("release_date"), architecture=arch["family"],
        layers=arch["layers"], kv_heads=arch["kv_heads"], head_dim=arch["head_dim"],
        quantizations=tuple(Quantization(q["name"], int(q["size_bytes"]), bool(q["estimated"]))
                            for q in entry["quantizations"]),
    )


def _positive_int(value) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def registered_model_spec(*, model_id: str, owned_by: str, architecture: str, parameter_count: int | None,
                          context_length: int | None, file_type: str, size_bytes: int, metadata: Mapping | None,
                          release_date: str | None) -> ModelSpec | None:
    """A model registered on the platform, from its GGUF header fields; None without a file size.

    Missing header facts are tolerated: without layer/head counts the KV cache counts as 0
    (and the row's ``notes`` say so); without a parameter count it is derived from the file
    size and the quantization's bits per weight.
    """
    if not size_bytes:
        return None
    metadata = metadata or {}
    quant = (file_type or "unknown").upper()
    parameters = _positive_int(parameter_count)
    if parameters is None:
        parameters = int(size_bytes * 8 / BITS_PER_WEIGHT.get(quant, 8.0))
    layers = _positive_int(metadata.get("block_count"))
    heads = _positive_int(metadata.get("head_count"))
    kv_heads = _positive_int(metadata.get("head_count_kv")) or heads
    head_dim = _positive_int(metadata.get("key_length"))
    if head_dim is None and heads and _positive_int(metadata.get("embedding_length")):
        head_dim = int(metadata["embedding_length"]) // heads
    is_embedding = "embed" in model_id.lower() or architecture in ("bert", "nomic-bert")
    return ModelSpec(
        name=model_id, provider=owned_by or "llmplatform", parameter_count=parameters, active_parameters=None,
        context_length=_positive_int(context_length) or 2048,
        use_cases=("embedding",) if is_embedding else ("chat", "general"),
        release_date=release_date, architecture=architecture or "unknown", layers=layers, kv_heads=kv_heads,
        head_dim=head_dim, quantizations=(Quantization(quant, int(size_bytes), False),), source="registered",
    )


# --- machines ----------------------------------------------------------------------------

def parse_memory_size(text: str) -> int:
    """'24G', '24GB', '512M', '1.5T' or a bare number of GB, in bytes."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}
    multiplier = GIB
    if raw and raw[-1] in units:
        multiplier, raw = units[raw[-1]], raw[:-1]
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"invalid memory size {text!r}: use e.g. 24G or 512M") from None
    if value <= 0:
        raise ValueError(f"invalid memory size {text!r}: must be positive")
    return int(value * multiplier)


def machine_from_hardware(*, name: str, hardware: Mapping, gpu_index: int | None = None,
                          memory_bytes: int | None = None) -> Machine:
    """A machine from a ``hardware_snapshot()`` dict.

    A node pinned to one GPU (``gpu_index``) counts only that GPU. ``memory_bytes`` overrides
    the GPU memory, like llmfit's ``--memory``: all GPUs then count as one of that size.
    """
    gpus = []
    for raw in hardware.get("gpus") or []:
        if gpu_index is not None and raw.get("index") != gpu_index:
            continue
        gpus.append(Gpu(index=int(raw.get("index") or 0), name=raw.get("name") or "GPU",
                        vram_bytes=int(raw.get("vram_total_bytes") or 0), vram_free_bytes=raw.get("vram_free_bytes"),
                        bandwidth_gbps=raw.get("memory_bandwidth_gbps"), extra=raw))
    if memory_bytes is not None:
        first = gpus[0] if gpus else None
        gpus = [Gpu(index=first.index if first else 0, name=first.name if first else "GPU (--memory)",
                    vram_bytes=memory_bytes, vram_free_bytes=None,
                    bandwidth_gbps=first.bandwidth_gbps if first else None, extra=first.extra if first else {})]
    return Machine(
        name=name, os=hardware.get("os") or "linux", cpu_name=hardware.get("cpu_model") or hardware.get("arch") or "CPU",
        cpu_cores=hardware.get("cpu_cores"),
        ram_bytes=int(hardware.get("ram_total_bytes") or 0),
        ram_available_bytes=int(hardware.get("ram_available_bytes") or 0),
        ram_bandwidth_gbps=float(hardware.get("ram_bandwidth_gbps") or 60.0), gpus=tuple(gpus),
        hardware=hardware, memory_override=memory_bytes is not None,
    )


def _gb(value: float | int | None) -> float | None:
    return None if value is None else round(value / GIB, 2)


def system_json(machine: Machine) -> dict:
    """llmfit's system object, plus what our hardware snapshot knows beyond it."""
    hw = machine.hardware
    first = machine.gpus[0] if machine.gpus else None
    arch = "ARM" if str(hw.get("arch") or "").lower() in ("aarch64", "arm64") else "x86"
    return {
        "total_ram_gb": _gb(machine.ram_bytes),
        "available_ram_gb": _gb(machine.ram_available_bytes),
        "cpu_cores": machine.cpu_cores,
        "cpu_threads": hw.get("cpu_threads"),
        "cpu_name": machine.cpu_name,
        "has_gpu": bool(machine.gpus),
        "gpu_vram_gb": _gb(machine.vram_bytes) if machine.gpus else None,
        "gpu_name": first.name if first else None,
        "gpu_count": len(machine.gpus),
        "unified_memory": False,
        "backend": "CUDA" if machine.gpus else f"CPU ({arch})",
        "gpus": [
            {"name": gpu.name, "vram_gb": _gb(gpu.vram_bytes), "backend": "CUDA", "count": 1, "unified_memory": False,
             "index": gpu.index, "vram_free_gb": _gb(gpu.vram_free_bytes),
             "memory_bandwidth_gbps": gpu.bandwidth_gbps,
             **{key: gpu.extra.get(key) for key in ("utilization_pct", "temperature_c", "power_w", "driver_version",
                                                     "cuda_version", "compute_capability")}}
            for gpu in machine.gpus
        ],
        "accelerators": [{"name": gpu.name, "kind": "gpu", "vendor": "NVIDIA", "memory_gb": _gb(gpu.vram_bytes)}
                         for gpu in machine.gpus],
        "ram_bandwidth_gbps": machine.ram_bandwidth_gbps,
        "ram_bandwidth_source": hw.get("ram_bandwidth_source", "typical"),
        "models_dir": hw.get("models_dir"),
        "disk_total_gb": _gb(hw.get("disk_total_bytes")),
        "disk_free_gb": _gb(hw.get("disk_free_bytes")),
        "memory_override": machine.memory_override,
    }


# --- one model on one machine ------------------------------------------------------------

def kv_cache_bytes(model: ModelSpec, context: int) -> int:
    if not (model.layers and model.kv_heads and model.head_dim):
        return 0
    return 2 * model.layers * model.kv_heads * model.head_dim * context * KV_CACHE_BYTES_PER_VALUE


def _place(required: int, machine: Machine) -> tuple[str, FitLevel, int]:
    """(run_mode, fit_level, capacity in bytes) for a model needing ``required`` bytes."""
    vram, ram = machine.vram_bytes, machine.ram_bytes
    if vram > 0 and required <= vram:
        share = required / vram
        level = (FitLevel.PERFECT if share <= GPU_PERFECT_MAX else FitLevel.GOOD if share <= GPU_GOOD_MAX
                 else FitLevel.MARGINAL)
        return "gpu", level, vram
    mode, capacity = ("cpu_offload", vram + ram) if vram > 0 else ("cpu_only", ram)
    share = required / capacity if capacity else math.inf
    level = (FitLevel.GOOD if share <= SHARED_GOOD_MAX else FitLevel.MARGINAL if share <= SHARED_MARGINAL_MAX
             else FitLevel.TOO_TIGHT)
    return mode, level, capacity


def _tokens_per_second(model: ModelSpec, weights: int, kv: int, mode: str, machine: Machine) -> float:
    active = weights
    if model.is_moe:
        active = weights * model.active_parameters / model.parameter_count
    cpu_seconds_per_byte = 1 / (CPU_EFFICIENCY * machine.ram_bandwidth_gbps * 1e9)
    if mode == "cpu_only" or not machine.gpus:
        return 1 / (active * cpu_seconds_per_byte)
    gpu_seconds_per_byte = machine.gpu_seconds_per_byte() / GPU_EFFICIENCY
    if mode == "gpu":
        return 1 / (active * gpu_seconds_per_byte)
    on_gpu = min(1.0, max(0.0, (machine.vram_bytes - kv - RUNTIME_OVERHEAD_BYTES) / weights))
    seconds = active * on_gpu * gpu_seconds_per_byte + active * (1 - on_gpu) * cpu_seconds_per_byte
    return 1 / seconds


@dataclass(frozen=True)
class _Option:
    quant: Quantization
    weights: int
    kv: int
    required: int
    mode: str
    level: FitLevel
    capacity: int


def _options(model: ModelSpec, machine: Machine, context: int, sequences: int) -> list[_Option]:
    quants = [q for q in model.quantizations if q.name.upper() not in _FULL_PRECISION] or list(model.quantizations)
    kv = kv_cache_bytes(model, context) * sequences
    options = []
    for quant in quants:
        required = quant.size_bytes + kv + RUNTIME_OVERHEAD_BYTES
        mode, level, capacity = _place(required, machine)
        options.append(_Option(quant, quant.size_bytes, kv, required, mode, level, capacity))
    return options


def _best(options: list[_Option]) -> _Option:
    runnable = [o for o in options if o.level.runnable]
    if not runnable:
        return min(options, key=lambda o: o.required)

    def preference(option: _Option):
        return (option.mode == "gpu", option.level >= FitLevel.GOOD, option.quant.bits_per_weight)

    return max(runnable, key=preference)


def format_parameter_count(parameters: int) -> str:
    if parameters < 1_000_000_000:
        return f"{round(parameters / 1e6)}M"
    return f"{parameters / 1e9:.1f}".rstrip("0").rstrip(".") + "B"


def model_fit(model: ModelSpec, machine: Machine, *, context_limit: int | None,
              measurement: Measurement | None = None, sequences: int = 1) -> dict:
    """One model's fit row on one machine (llmfit's field names, plus ours), for ``sequences``
    concurrent sequences of the context each."""
    context = min(model.context_length, context_limit) if context_limit else model.context_length
    best = _best(_options(model, machine, context, sequences))
    required, mode, level, capacity = best.required, best.mode, best.level, best.capacity
    notes, measured = [], []
    if measurement and measurement.memory_bytes:  # measured weights, plus the modelled KV cache and overhead
        required = int(measurement.memory_bytes) + best.required - best.weights
        mode, level, capacity = _place(required, machine)
        measured.append("memory")
        notes.append("weights measured on this node when the worker loaded the model")
    tps = _tokens_per_second(model, best.weights, best.kv, mode, machine)
    if measurement and measurement.tokens_per_second:
        tps = float(measurement.tokens_per_second)
        measured.append("tps")
        notes.append("tokens/s measured on this node")
    if best.quant.estimated:
        notes.append(f"{best.quant.name} file size estimated from parameters x bits per weight")
    if not best.kv and model.source == "registered":
        notes.append("KV cache not counted: the GGUF header lacks layer or head counts")
    if mode == "cpu_offload":
        notes.append("does not fit in VRAM: layers split between GPU and CPU")
    if any(gpu.bandwidth_gbps is None for gpu in machine.gpus) and mode != "cpu_only":
        notes.append(f"GPU bandwidth unknown: assumed {UNKNOWN_GPU_BANDWIDTH_GBPS:.0f} GB/s")

    params_b = model.parameter_count / 1e9
    quality = min(1.0, max(0.0, (math.log2(max(params_b, 1e-3)) + 3) / 12))
    quality *= min(1.0, 0.7 + 0.3 * min(best.quant.bits_per_weight, 8.0) / 8.0)
    components = {
        "quality": round(100 * quality, 1),
        "speed": round(100 * min(1.0, tps / SPEED_TARGET_TPS), 1),
        "fit": level.score,
        "context": round(100 * min(1.0, max(0.0, math.log2(model.context_length / 2048) / 6)), 1),
    }
    score = (0.4 * components["quality"] + 0.3 * components["speed"] + 0.2 * components["fit"]
             + 0.1 * components["context"])
    return {
        "name": model.name,
        "provider": model.provider,
        "parameter_count": format_parameter_count(model.parameter_count),
        "params_b": round(params_b, 2),
        "parameters": model.parameter_count,
        "active_parameters": model.active_parameters,
        "context_length": model.context_length,
        "use_case": model.use_case,
        "use_cases": list(model.use_cases),
        "category": USE_CASE_LABELS.get(model.use_case, "General"),
        "release_date": model.release_date,
        "is_moe": model.is_moe,
        "architecture": model.architecture,
        "fit_level": level,
        "fit_label": level.label,
        "run_mode": mode,
        "run_mode_label": RUN_MODE_LABELS[mode],
        "score": round(score, 1),
        "score_components": components,
        "estimated_tps": round(tps, 1),
        "runtime": "llamacpp",
        "runtime_label": "llama.cpp",
        "best_quant": best.quant.name,
        "quant_size_estimated": best.quant.estimated,
        "memory_required_gb": round(required / GIB, 2),
        "memory_required_bytes": required,
        "weights_gb": round(best.weights / GIB, 2),
        "kv_cache_gb": round(best.kv / GIB, 2),
        "estimate_context": context,
        "estimate_sequences": sequences,
        "memory_available_gb": round(capacity / GIB, 2),
        "total_memory_gb": round(required / GIB, 2),
        "utilization_pct": round(100 * required / capacity, 1) if capacity else None,
        "estimate_source": "measured" if measured else "modelled",
        "measured": measured,
        "source": model.source,
        "notes": notes,
        "gguf_sources": [],
    }


# --- llmfit's query parameters -----------------------------------------------------------

_MIN_FIT = {**{level.value: level for level in FitLevel}, "tootight": FitLevel.TOO_TIGHT, "tight": FitLevel.TOO_TIGHT}
_RUNTIMES = {"any": "any", "mlx": "mlx", "llamacpp": "llamacpp", "llama.cpp": "llamacpp", "llama_cpp": "llamacpp",
             "vllm": "vllm"}
_USE_CASES = {"coding": "coding", "code": "coding", "reasoning": "reasoning", "reason": "reasoning", "chat": "chat",
              "multimodal": "multimodal", "vision": "multimodal", "embedding": "embedding", "embed": "embedding",
              "general": "general"}
_SORTS = {"score": "score", "tps": "tps", "tokens": "tps", "throughput": "tps", "params": "params",
          "parameters": "params", "mem": "mem", "memory": "mem", "mem_pct": "mem", "utilization": "mem",
          "ctx": "ctx", "context": "ctx", "date": "date", "release": "date", "released": "date",
          "use": "use_case", "use_case": "use_case", "usecase": "use_case"}


@dataclass(frozen=True)
class FitQuery:
    limit: int | None = None
    perfect: bool | None = None
    min_fit: str | None = None
    runtime: str | None = None
    use_case: str | None = None
    provider: str | None = None
    search: str | None = None
    sort: str | None = None
    include_too_tight: bool | None = None
    max_context: int | None = None
    top_only: bool = False
    default_limit: int | None = None  # 5 for /models/top, 20 for /models/{name}; not echoed

    def filters_json(self) -> dict:
        """The query as given (llmfit echoes what the client sent, None where it sent nothing)."""
        return {"limit": self.limit, "perfect": self.perfect, "min_fit": self.min_fit, "runtime": self.runtime,
                "use_case": self.use_case, "provider": self.provider, "search": self.search, "sort": self.sort,
                "max_context": self.max_context, "include_too_tight": self.include_too_tight,
                "top_only": self.top_only}


def _bool(name: str, raw: str | None) -> bool | None:
    if raw is None:
        return None
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise FitQueryError(f"invalid {name} value: use true|false")


def _int(name: str, raw: str | None, minimum: int) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise FitQueryError(f"invalid {name} value: use an integer >= {minimum}")
    return value


def _choice(name: str, raw: str | None, choices: dict, allowed: str) -> str | None:
    if raw is None:
        return None
    value = choices.get(raw.strip().lower())
    if value is None:
        raise FitQueryError(f"invalid {name} value: use {allowed}")
    return value


def parse_query(params: Mapping[str, str], *, top_only: bool = False, search: str | None = None,
                default_limit: int | None = None) -> FitQuery:
    """llmfit's query parameters, with its aliases and its 400 messages."""
    get = params.get
    _choice("min_fit", get("min_fit"), _MIN_FIT, "perfect|good|marginal|too_tight")
    _choice("runtime", get("runtime"), _RUNTIMES, "any|mlx|llamacpp|vllm")
    _choice("use_case", get("use_case"), _USE_CASES, "general|coding|reasoning|chat|multimodal|embedding")
    _choice("sort", get("sort"), _SORTS, "score|tps|params|mem|ctx|date|use_case")
    limit = _int("limit", get("limit"), 0)
    if limit is None:
        limit = _int("n", get("n"), 0)
    return FitQuery(
        limit=limit, perfect=_bool("perfect", get("perfect")), min_fit=get("min_fit"), runtime=get("runtime"),
        use_case=get("use_case"), provider=get("provider") or None,
        search=search if search is not None else (get("search") or None), sort=get("sort"),
        include_too_tight=_bool("include_too_tight", get("include_too_tight")),
        max_context=_int("max_context", get("max_context"), 1), top_only=top_only, default_limit=default_limit,
    )


def _matches_search(row: dict, needle: str) -> bool:
    haystack = (row["name"], row["provider"], row["parameter_count"], row["use_case"], row["category"])
    return any(needle in value.lower() for value in haystack)


def row_passes(row: dict, query: FitQuery) -> bool:
    """Whether one fit row survives the query's filters (fit level included)."""
    if query.provider and query.provider.lower() not in row["provider"].lower():
        return False
    if query.search and not _matches_search(row, query.search.lower()):
        return False
    if query.use_case and _USE_CASES[query.use_case.strip().lower()] not in row["use_cases"]:
        return False
    runtime = _RUNTIMES[query.runtime.strip().lower()] if query.runtime else "any"
    if runtime not in ("any", row["runtime"]):
        return False
    return level_passes(row["fit_level"], query)


def level_passes(level: str, query: FitQuery) -> bool:
    level = FitLevel(level)
    if query.perfect:
        if level is not FitLevel.PERFECT:
            return False
    elif level < _MIN_FIT[(query.min_fit or FitLevel.MARGINAL).strip().lower()]:
        return False
    include_too_tight = query.include_too_tight if query.include_too_tight is not None else not query.top_only
    return not ((query.top_only or not include_too_tight) and not level.runnable)


def sort_key(query: FitQuery):
    """Runnable rows first whatever the column; then best first (newest for date, A-Z for use case)."""
    column = _SORTS[query.sort.strip().lower()] if query.sort else "score"
    keys = {
        "score": lambda row: -row["score"],
        "tps": lambda row: -row["estimated_tps"],
        "params": lambda row: -row["parameters"],
        "mem": lambda row: -(row["utilization_pct"] or 0),
        "ctx": lambda row: -row["context_length"],
        "date": lambda row: _negated_date(row["release_date"]),
        "use_case": lambda row: row["category"],
    }
    column_key = keys[column]
    return lambda row: (row["fit_level"] == FitLevel.TOO_TIGHT, column_key(row), -row["score"], row["name"].lower())


def _negated_date(date: str | None) -> tuple:
    if not date:
        return (1, "")
    return (0, "".join(chr(0x10FFFF - ord(c)) for c in date))


def fit_rows(models: Iterable[ModelSpec], machine: Machine, query: FitQuery, *, default_context: int | None,
             measurements: Mapping[str, Measurement] | None = None, sequences: int = 1) -> tuple[int, list[dict]]:
    """(total rows that pass the filters, those rows sorted and cut to the query's limit)."""
    context_limit = query.max_context or default_context
    measurements = measurements or {}
    rows = [model_fit(model, machine, context_limit=context_limit, measurement=measurements.get(model.name),
                      sequences=sequences) for model in models]
    rows = sorted((row for row in rows if row_passes(row, query)), key=sort_key(query))
    limit = query.limit if query.limit is not None else query.default_limit
    return len(rows), rows if limit is None else rows[:limit]


def with_models(models: Iterable[ModelSpec], extra: Iterable[ModelSpec]) -> list[ModelSpec]:
    """The catalog plus registered models; a registered model shadows a catalog entry of its name."""
    extra = list(extra)
    names = {model.name.lower() for model in extra}
    return [model for model in models if model.name.lower() not in names] + extra


def envelope(*, node: dict, machine: Machine, total: int, rows: list[dict], query: FitQuery) -> dict:
    return {"node": node, "system": system_json(machine), "total_models": total, "returned_models": len(rows),
            "filters": query.filters_json(), "models": rows}
