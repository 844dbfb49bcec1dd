"""Reads of fit analysis: per-node reports, the fleet matrix and the placement check."""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings

from apps.fit import engine
from apps.fit.engine import FitLevel
from apps.fit.models import FitMeasurement
from apps.models.models import RegisteredModel
from apps.models.selectors import model_list_active
from apps.nodes.models import Node


def fit_default_context() -> int:
    """Estimates assume the context workers load models with, unless a query caps it."""
    return settings.LLMP_N_CTX


def fit_sequences() -> int:
    """Estimates count the KV of every sequence a model's runner holds (each of the context above)."""
    return settings.LLMP_POOL_SLOTS_PER_MODEL


def registered_model_spec(model: RegisteredModel) -> engine.ModelSpec | None:
    """Fit facts of a registered local model from its GGUF header fields (any of them may be empty)."""
    if model.is_external:
        return None
    return engine.registered_model_spec(
        model_id=model.id, owned_by=model.owned_by, architecture=model.architecture,
        parameter_count=model.parameter_count, context_length=model.context_length, file_type=model.file_type,
        size_bytes=model.size_bytes or 0, metadata=model.metadata,
        release_date=model.created_at.date().isoformat() if model.created_at else None,
    )


def registered_model_specs() -> list[engine.ModelSpec]:
    specs = (registered_model_spec(model) for model in model_list_active())
    return [spec for spec in specs if spec is not None]


def fit_models() -> list[engine.ModelSpec]:
    """The curated catalog plus every active local model registered on the platform."""
    return engine.with_models(engine.catalog_models(), registered_model_specs())


def node_measurements(*, node: Node) -> dict[str, engine.Measurement]:
    return {row.model_id: engine.Measurement(row.memory_bytes, row.tokens_per_second)
            for row in FitMeasurement.objects.filter(node=node)}


def node_machine(*, node: Node) -> engine.Machine:
    return engine.machine_from_hardware(name=node.name, hardware=node.hardware or {}, gpu_index=node.gpu_index)


def node_identity(node: Node) -> dict:
    return {"name": node.name, "os": (node.hardware or {}).get("os", "linux"), "id": node.pk,
            "hostname": node.hostname, "gpu_index": node.gpu_index, "status": node.status}


def node_system(*, node: Node) -> dict:
    return {"node": node_identity(node), "system": engine.system_json(node_machine(node=node))}


def node_fit_report(*, node: Node, query: engine.FitQuery) -> dict:
    """llmfit's envelope for one node: its system and its filtered, sorted model rows."""
    machine = node_machine(node=node)
    total, rows = engine.fit_rows(fit_models(), machine, query, default_context=fit_default_context(),
                                  measurements=node_measurements(node=node), sequences=fit_sequences())
    return engine.envelope(node=node_identity(node), machine=machine, total=total, rows=rows, query=query)


def fit_matrix(*, query: engine.FitQuery, node_names: list[str] | None = None) -> dict:
    """Models x nodes: per cell the fit level, best quantization and estimated tokens/s.

    Model filters (use_case, provider, search, runtime) pick rows; fit filters (min_fit,
    perfect, include_too_tight) keep a row when at least one node passes them; rows sort and
    cut by their best node.
    """
    nodes = list(Node.objects.all() if not node_names else Node.objects.filter(name__in=node_names))
    models = fit_models()
    context_limit = query.max_context or fit_default_context()
    per_node = []
    for node in nodes:
        machine, measurements = node_machine(node=node), node_measurements(node=node)
        per_node.append((node, {model.name: engine.model_fit(model, machine, context_limit=context_limit,
                                                             measurement=measurements.get(model.name),
                                                             sequences=fit_sequences())
                                for model in models}))
    rows = []
    for model in models:
        cells = {node.name: fits[model.name] for node, fits in per_node}
        if not cells:
            continue
        best = max(cells.values(), key=lambda row: (FitLevel(row["fit_level"]).rank, row["score"]))
        if not engine.row_passes(best, query):
            continue
        rows.append({
            **{key: best[key] for key in ("name", "provider", "parameter_count", "params_b", "parameters",
                                          "active_parameters", "context_length", "use_case", "use_cases",
                                          "category", "release_date", "is_moe", "runtime", "source")},
            "best_node": next(name for name, cell in cells.items() if cell is best),
            "fit_level": best["fit_level"], "score": best["score"], "estimated_tps": best["estimated_tps"],
            "utilization_pct": best["utilization_pct"],
            "nodes": {name: {key: cell[key] for key in ("fit_level", "best_quant", "estimated_tps", "run_mode",
                                                         "memory_required_gb", "utilization_pct", "score",
                                                         "estimate_source")}
                      for name, cell in cells.items()},
        })
    rows.sort(key=engine.sort_key(query))
    limit = query.limit if query.limit is not None else query.default_limit
    returned = rows if limit is None else rows[:limit]
    return {"nodes": [node_identity(node) for node in nodes], "total_models": len(rows),
            "returned_models": len(returned), "filters": query.filters_json(), "models": returned}


def fit_levels(*, model: RegisteredModel, nodes: Iterable[Node]) -> dict[int, FitLevel | None]:
    """How well a registered model fits each node (perfect|good|marginal|too_tight), by node id.

    None where it cannot be told: an external model, a model without a file size, a node that
    has not reported its RAM. One query for every node's measurement; no network, no catalog.
    """
    nodes = list(nodes)
    spec = registered_model_spec(model)
    if spec is None:
        return {node.pk: None for node in nodes}
    measurements = {row.node_id: engine.Measurement(row.memory_bytes, row.tokens_per_second)
                    for row in FitMeasurement.objects.filter(model_id=model.id, node_id__in=[node.pk for node in nodes])}
    levels: dict[int, FitLevel | None] = {}
    for node in nodes:
        if not (node.hardware or {}).get("ram_total_bytes"):
            levels[node.pk] = None
            continue
        fit = engine.model_fit(spec, node_machine(node=node), context_limit=fit_default_context(),
                               measurement=measurements.get(node.pk), sequences=fit_sequences())
        levels[node.pk] = FitLevel(fit["fit_level"])
    return levels


def fit_level(*, node: Node, model: RegisteredModel) -> FitLevel | None:
    """How well a registered model fits one node (see ``fit_levels``)."""
    return fit_levels(model=model, nodes=[node])[node.pk]
