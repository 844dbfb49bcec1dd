"""Starting the jobs that bring models in: download from Hugging Face, convert, quantize.

The management API and the ``models`` command both call these; each checks its input, picks
the node and queues one job, or raises ModelError (with an HTTP status) saying what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db.models import Count, Q

from apps.jobs.models import Job, JobKind, JobStatus
from apps.jobs.services import job_create
from apps.models.models import RegisteredModel
from apps.models.services.registry import ModelError, model_file_name_clean, model_id_check, model_id_for_file
from apps.nodes.models import Node
from apps.nodes.selectors import node_list_live
from workers.convert import SUPPORTED_OUTTYPES as CONVERT_OUTTYPES


def job_node_pick(name: str | None) -> Node:
    """The named node, or the live node running the fewest jobs; either must write the server's model
    store (a node with its own cache would keep the new model to itself)."""
    if name:
        node = Node.objects.filter(name=name).first()
        if node is None:
            raise ModelError(f"Node {name!r} not found", status=404)
        if node.hardware.get("own_model_cache"):
            raise ModelError(f"Node {name!r} keeps its own model cache (LLMP_SERVER_URL); jobs that make models "
                             "run on nodes that share the server's models directory")
        return node
    node = (node_list_live().exclude(hardware__own_model_cache=True)
            .annotate(running=Count("jobs", filter=Q(jobs__status=JobStatus.RUNNING)))
            .order_by("running", "name").first())
    if node is None:
        raise ModelError("No live worker node can run the job; start one with 'python -m workers --node NAME'",
                         status=503)
    return node


def _new_model_id(model_id: str) -> str:
    model_id_check(model_id)
    active = Job.objects.filter(params__model_id=model_id, status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).first()
    if active is not None:
        raise ModelError(f"Job {active.pk} is already making a model named {model_id!r}", status=409)
    return model_id


def quant_type_check(name: str) -> str:
    from workers.convert import SUPPORTED_QUANT_TYPES

    upper = (name or "").strip().upper()
    if upper not in SUPPORTED_QUANT_TYPES:
        raise ModelError(f"unknown quantization {name!r}: use one of {', '.join(SUPPORTED_QUANT_TYPES)}")
    return upper


def checkpoint_dir_check(source_dir: str) -> str:
    """A checkpoint directory inside LLMP_CHECKPOINTS_DIR, as an absolute path."""
    root = Path(settings.LLMP_CHECKPOINTS_DIR).resolve()
    path = (root / source_dir).resolve()
    if root != path and root not in path.parents:
        raise ModelError(f"source_dir must be inside LLMP_CHECKPOINTS_DIR ({root})")
    return str(path)


def model_download_start(*, repo_id: str, filename: str, revision: str = "", name: str | None = None,
                         node: str | None = None, user=None) -> Job:
    file_name = model_file_name_clean(filename)
    model_id = _new_model_id(name or model_id_for_file(file_name))
    return job_create(kind=JobKind.DOWNLOAD, node=job_node_pick(node), created_by=user, params={
        "repo_id": repo_id, "filename": filename, "revision": revision or "", "model_id": model_id})


def model_convert_start(*, name: str, repo_id: str = "", source_dir: str = "", revision: str = "",
                        outtype: str = "f16", quantize: str = "", node: str | None = None, user=None) -> Job:
    if bool(repo_id) == bool(source_dir):
        raise ModelError("give exactly one of repo_id and source_dir")
    if outtype not in CONVERT_OUTTYPES:
        raise ModelError(f"unknown outtype {outtype!r}: use one of {', '.join(CONVERT_OUTTYPES)}")
    params = {"repo_id": repo_id, "source_dir": checkpoint_dir_check(source_dir) if source_dir else "",
              "revision": revision or "", "outtype": outtype, "quantize": quant_type_check(quantize) if quantize else ""}
    params["model_id"] = _new_model_id(name)
    return job_create(kind=JobKind.CONVERT, node=job_node_pick(node), created_by=user, params=params)


def model_quantize_start(*, source_model: str, qtype: str, name: str | None = None, node: str | None = None,
                         user=None) -> Job:
    source = RegisteredModel.objects.filter(id=source_model).first()
    if source is None:
        raise ModelError(f"Model {source_model!r} not found", status=404)
    if source.is_external:
        raise ModelError("An external API model has no file to quantize")
    qtype = quant_type_check(qtype)
    model_id = _new_model_id(name or f"{source.id}-{qtype}")
    return job_create(kind=JobKind.QUANTIZE, node=job_node_pick(node), created_by=user,
                      params={"source_model": source.id, "qtype": qtype, "model_id": model_id})
