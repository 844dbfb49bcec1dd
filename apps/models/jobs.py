"""The handlers of model jobs: download from Hugging Face, convert a checkpoint, quantize a model.

Each runs inside ``apps.jobs.runner`` on a worker whose models directory is the model store. A
job works in its own directory, ``MODELS_DIR/.jobs/<job id>/``, which survives a worker's
death so that a redelivered download resumes there; only a complete, verified file is moved
into the store and registered. Cancelling removes the directory; a failure keeps it for a retry.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

from apps.jobs.models import JobKind, JobStage
from apps.jobs.registry import job_handler
from apps.jobs.runner import JobCancelled, JobContext, JobError
from apps.models.models import ModelSource, RegisteredModel
from apps.models.services import (
    GGUF_SUFFIX,
    ModelError,
    model_id_check,
    model_path,
    model_register_file,
)
from workers.files import sha256_file

logger = logging.getLogger(__name__)

# Files of a Hugging Face checkpoint that conversion needs.
CHECKPOINT_FILE_PATTERNS = ("config.json", "generation_config.json", ".safetensors", "tokenizer.json",
                            "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                            "merges.txt", "added_tokens.json", ".safetensors.index.json")


def job_work_dir(ctx: JobContext) -> Path:
    path = ctx.models_dir / ".jobs" / str(ctx.job.pk)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove_work_dir(ctx: JobContext) -> None:
    shutil.rmtree(ctx.models_dir / ".jobs" / str(ctx.job.pk), ignore_errors=True)


def _place(ctx: JobContext, source: Path, model_id: str) -> Path:
    """Move a finished file into the store under ``<model_id>.gguf`` without overwriting a registered model's file."""
    final = ctx.models_dir / f"{model_id}{GGUF_SUFFIX}"
    try:
        os.link(source, final)
    except FileExistsError:
        if RegisteredModel.objects.filter(file_name=final.name).exists():
            raise JobError(f"A model named {model_id!r} already exists") from None
        final.unlink()  # a stale file that no model owns
        os.link(source, final)
    source.unlink()
    return final


def _register(ctx: JobContext, path: Path, *, source: str, sha256: str | None = None, **origin) -> RegisteredModel:
    """Move a finished file of the job's directory into the store and register it.

    ``sha256`` is the digest the file was already checked against (a Hub download of an LFS
    file); without one the file is hashed here, in the VERIFYING stage.
    """
    model_id = ctx.params["model_id"]
    size = path.stat().st_size
    if sha256 is None:
        ctx.stage(JobStage.VERIFYING, unit="bytes", total=size)
        sha256 = sha256_file(path, progress=lambda done: (ctx.check_cancel(), ctx.progress(done)))
        ctx.progress(size, force=True)
        ctx.log(f"sha256 {sha256}")
    ctx.stage(JobStage.REGISTERING)
    try:
        model_id_check(model_id)
    except ModelError as exc:
        raise JobError(str(exc)) from exc
    final = _place(ctx, path, model_id)
    try:
        model = model_register_file(model_id=model_id, source=source, path=final, sha256=sha256, node=ctx.job.node,
                                    created_by=ctx.job.created_by, **origin)
    except ModelError as exc:
        final.unlink(missing_ok=True)
        raise JobError(str(exc)) from exc
    ctx.log(f"registered model {model.id} ({model.file_type or 'unknown type'}, {size} bytes)")
    return model


def _cleans_up_on_cancel(handler):
    """A cancelled job leaves nothing behind: its work directory goes with it."""
    @functools.wraps(handler)
    def run(ctx: JobContext) -> RegisteredModel:
        try:
            return handler(ctx)
        except JobCancelled:
            _remove_work_dir(ctx)
            raise

    return run


@job_handler(JobKind.DOWNLOAD)
@_cleans_up_on_cancel
def download_run(ctx: JobContext) -> RegisteredModel:
    from workers import hf

    params = ctx.params
    work = job_work_dir(ctx)
    ctx.stage(JobStage.DOWNLOADING, unit="bytes")
    with _as_job_outcomes(hf.DownloadCancelled, hf.HfError):
        downloaded = hf.hf_download(repo_id=params["repo_id"], filename=params["filename"], dest_dir=work,
                                    revision=params.get("revision") or None, progress=ctx.progress,
                                    should_cancel=ctx.cancel_requested)
    size = downloaded.path.stat().st_size
    ctx.progress(size, size, force=True)
    if downloaded.sha256 is not None:
        ctx.log(f"sha256 {downloaded.sha256}, as the Hub's")
    model = _register(ctx, downloaded.path, source=ModelSource.HUGGINGFACE, sha256=downloaded.sha256,
                      hf_repo=params["repo_id"], hf_filename=params["filename"],
                      hf_revision=params.get("revision") or "")
    _remove_work_dir(ctx)
    return model


def _checkpoint_dir(ctx: JobContext, work: Path) -> Path:
    """The checkpoint to convert: a directory under LLMP_CHECKPOINTS_DIR, or one fetched from Hugging Face."""
    from workers import hf

    params = ctx.params
    if params.get("source_dir"):
        return Path(params["source_dir"])
    checkpoint = work / "checkpoint"
    with _as_job_outcomes(hf.DownloadCancelled, hf.HfError):
        listed = hf.hf_repo_files(repo_id=params["repo_id"], revision=params.get("revision") or None)
    files = [item for item in listed if item["path"].endswith(CHECKPOINT_FILE_PATTERNS)]
    if not any(item["path"].endswith(".safetensors") for item in files):
        raise JobError(f"{params['repo_id']} has no .safetensors weights to convert")
    total = sum(item.get("size") or 0 for item in files)
    ctx.stage(JobStage.DOWNLOADING, unit="bytes", total=total)
    done_before = 0
    for item in files:
        with _as_job_outcomes(hf.DownloadCancelled, hf.HfError):
            downloaded = hf.hf_download(
                repo_id=params["repo_id"], filename=item["path"], dest_dir=checkpoint,
                revision=params.get("revision") or None,
                progress=lambda done, _total, base=done_before: ctx.progress(base + done, total),
                should_cancel=ctx.cancel_requested)
        done_before += downloaded.path.stat().st_size
    return checkpoint


@contextmanager
def _as_job_outcomes(cancelled: type[Exception], failed: type[Exception]):
    """Turn a worker library's cancel and failure exceptions into the runner's."""
    try:
        yield
    except cancelled:
        raise JobCancelled() from None
    except failed as exc:
        raise JobError(str(exc)) from exc


def _quantize(ctx: JobContext, source: Path, qtype: str, out: Path) -> Path:
    from workers import convert

    ctx.stage(JobStage.QUANTIZING, unit="bytes")
    out.unlink(missing_ok=True)  # left by an attempt whose worker died
    with _as_job_outcomes(convert.ConversionCancelled, convert.ConversionError):
        return convert.quantize(source=source, out_path=out, qtype=qtype,
                                progress=lambda done, total, _stage: ctx.progress(done, total),
                                should_cancel=ctx.cancel_requested)


@job_handler(JobKind.CONVERT)
@_cleans_up_on_cancel
def convert_run(ctx: JobContext) -> RegisteredModel:
    from workers import convert

    params = ctx.params
    work = job_work_dir(ctx)
    checkpoint = _checkpoint_dir(ctx, work)
    ctx.stage(JobStage.CONVERTING, unit="bytes")
    converted = work / f"converted-{params['outtype']}{GGUF_SUFFIX}"
    converted.unlink(missing_ok=True)  # left by an attempt whose worker died
    with _as_job_outcomes(convert.ConversionCancelled, convert.ConversionError):
        convert.convert_checkpoint(source_dir=checkpoint, out_path=converted, outtype=params["outtype"],
                                   model_name=params["model_id"],
                                   progress=lambda done, total, _stage: ctx.progress(done, total),
                                   should_cancel=ctx.cancel_requested)
    final = converted
    if params.get("quantize"):
        final = _quantize(ctx, converted, params["quantize"], work / f"quantized{GGUF_SUFFIX}")
        converted.unlink(missing_ok=True)
    model = _register(ctx, final, source=ModelSource.CONVERSION, hf_repo=params.get("repo_id") or "")
    _remove_work_dir(ctx)
    return model


@job_handler(JobKind.QUANTIZE)
@_cleans_up_on_cancel
def quantize_run(ctx: JobContext) -> RegisteredModel:
    params = ctx.params
    parent = RegisteredModel.objects.filter(id=params["source_model"]).first()
    if parent is None:
        raise JobError(f"The model {params['source_model']!r} no longer exists")
    source = model_path(parent)
    if not source.is_file():
        raise JobError(f"The file of {parent.id} is not in this node's models directory ({settings.MODELS_DIR})")
    final = _quantize(ctx, source, params["qtype"], job_work_dir(ctx) / f"quantized{GGUF_SUFFIX}")
    model = _register(ctx, final, source=ModelSource.CONVERSION, parent=parent)
    _remove_work_dir(ctx)
    return model
