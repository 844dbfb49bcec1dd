"""Writes of the model registry: GGUF files registered (uploaded, found in the store, bundled) and
deleted, the copies nodes hold, and the tokens nodes fetch model files with."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.core import signing
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.models.models import ModelCopy, ModelSource, RegisteredModel
from apps.nodes.models import Node
from apps.nodes.selectors import node_list_live
from apps.nodes.services import node_models_unload
from llmplatform.celery import app as celery_app
from llmplatform.errors import ApplicationError
from workers.bundled import BUNDLED_FILE_NAME, bundled_model_path
from workers.files import sha256_file
from workers.protocol import TASK_MODEL_COPY_DELETE

if TYPE_CHECKING:
    from apps.models.services.uploads import ReceivedFile

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class ModelError(ApplicationError):
    """A request about models that cannot be done, with the HTTP status that says why (400 by default)."""


class ModelConflict(ModelError):
    status = 409


def model_file_name_clean(raw_name: str) -> str:
    """A safe file name for a model: the last path component, unsafe characters replaced, ``.gguf``.

    Raises ModelError for names that are empty or not GGUF files.
    """
    base = re.split(r"[\\/]", raw_name or "")[-1].strip()
    if not base or base in {".", ".."}:
        raise ModelError("No file selected")
    if not base.lower().endswith(GGUF_SUFFIX):
        raise ModelError("Invalid file type. Only gguf files are allowed")
    stem = _UNSAFE_CHARS.sub("-", base[: -len(GGUF_SUFFIX)]).strip("-._") or "model"
    return f"{stem[:128]}{GGUF_SUFFIX}"


def model_id_for_file(file_name: str) -> str:
    """The id a file's model is registered under: its name without ``.gguf``."""
    return file_name[: -len(GGUF_SUFFIX)] if file_name.lower().endswith(GGUF_SUFFIX) else file_name


def model_id_check(model_id: str) -> str:
    """A valid id nobody has taken yet, or ModelError / ModelConflict."""
    if not _ID_PATTERN.match(model_id or ""):
        raise ModelError(f"Invalid model name {model_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if RegisteredModel.objects.filter(id=model_id).exists():
        raise ModelConflict(f"A model named {model_id!r} already exists")
    return model_id


def gguf_facts(path: Path) -> dict:
    """The registry fields read from a GGUF file's header; ModelError when it is not a valid GGUF or
    records hyperparameters llama.cpp cannot load (``workers.gguf``: its header checks and bounds)."""
    from workers.gguf import GGUFError, read_header, summarize

    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            summary = summarize(read_header(handle, file_size=size), file_size=size)
    except GGUFError as exc:
        raise ModelError(f"Invalid GGUF file: {exc}") from exc
    return {
        "architecture": summary.get("architecture") or "",
        "parameter_count": summary.get("parameter_count"),
        "context_length": summary.get("context_length"),
        "file_type": summary.get("file_type") or "",
        "chat_template": summary.get("chat_template") or "",
        "metadata": summary.get("metadata") or {},
        "size_bytes": size,
    }


def model_file_check(*, path: Path) -> dict:
    """The registry fields of a new GGUF file once llama.cpp can load it: its header passes the
    validator (``gguf_facts``) and a trial load in a limited child process (``workers.trial_load``)
    succeeds. ModelError (400) with the reason otherwise; the reason names no server path."""
    from workers.trial_load import trial_load

    facts = gguf_facts(path)
    result = trial_load(path, timeout=settings.LLMP_TRIAL_LOAD_TIMEOUT,
                        extra_memory_bytes=settings.LLMP_TRIAL_LOAD_MEMORY_MB << 20)
    if not result.ok:
        logger.warning("trial load of %s refused it: %s (%s)", path.name, result.reason, result.as_dict())
        raise ModelError(f"Invalid GGUF file: a trial load refused it: {result.reason}")
    logger.info("trial load of %s passed in %.2f s", path.name, result.elapsed_s)
    return facts


def model_register_file(*, model_id: str, source: str, path: Path, sha256: str, node=None, created_by=None,
                        facts: dict | None = None, **origin) -> RegisteredModel:
    """Register a complete, verified GGUF file already at ``MODELS_DIR / <model_id>.gguf`` (or ``path``).

    ``origin``: hf_repo, hf_filename, hf_revision, parent. The file must already be where it
    will stay; on a conflict the caller still owns it. ``facts``: ``model_file_check(path=path)``
    when the caller already checked the file (its header and a trial load); else that runs here.
    """
    facts = facts or model_file_check(path=path)
    try:
        with transaction.atomic():
            model = RegisteredModel.objects.create(id=model_id, source=source, file_name=path.name, sha256=sha256,
                                                   created_by=created_by, **facts, **origin)
            if node is not None:
                ModelCopy.objects.create(model=model, node=node, size_bytes=facts["size_bytes"])
    except IntegrityError as exc:
        raise ModelConflict(f"A model named {model_id!r} already exists") from exc
    return model


def model_copy_record(*, model: RegisteredModel, node) -> None:
    ModelCopy.objects.get_or_create(model=model, node=node, defaults={"size_bytes": model.size_bytes})


def model_copy_record_seen(*, model_id: str, node_name: str) -> bool:
    """A node's worker found a model's file on its disk: record the copy (False when either is unknown)."""
    from apps.nodes.models import Node

    model = RegisteredModel.objects.filter(id=model_id).first()
    node = Node.objects.filter(name=node_name).first()
    if model is None or node is None:
        return False
    model_copy_record(model=model, node=node)
    return True


def model_load_failure_record(*, model_id: str, node_name: str, error: str, file: dict) -> bool:
    """A node's worker could not load a model (llama.cpp refused it, or its runner died loading it):
    mark that node's copy failed, with why and which file (``file``: its size and mtime_ns there).

    The gateway sends the model to other nodes meanwhile; the node tries it again once the file
    differs, or after ``model_load_failure_clear``. False when the model or the node is unknown.
    """
    model = RegisteredModel.objects.filter(id=model_id).first()
    node = Node.objects.filter(name=node_name).first()
    if model is None or node is None:
        return False
    mark = {"load_failed_at": timezone.now(), "load_error": error[:2000],
            "load_failed_file": {**file, "sha256": model.sha256}}
    ModelCopy.objects.update_or_create(model=model, node=node, defaults=mark,
                                       create_defaults={**mark, "size_bytes": file.get("size") or model.size_bytes})
    logger.warning("model %s marked as failing to load on node %s: %s", model_id, node_name, error)
    return True


def model_load_failure_clear(*, model_id: str, node_name: str | None = None) -> list[str]:
    """Clear a model's load-failure marks, on one node or on all: they try it again on its next request.

    Returns the names of the nodes whose mark was cleared. Called by an operator (API, admin) and by
    a node's worker that sees the file changed since it failed.
    """
    marked = ModelCopy.objects.filter(model_id=model_id, load_failed_at__isnull=False)
    if node_name is not None:
        marked = marked.filter(node__name=node_name)
    names = sorted(marked.values_list("node__name", flat=True))
    if names:
        marked.update(load_failed_at=None, load_error="", load_failed_file={})
        logger.info("load-failure mark of model %s cleared on %s", model_id, ", ".join(names))
    return names


def model_path(model: RegisteredModel) -> Path:
    """Where the server keeps a local model's file."""
    if model.source == ModelSource.BUNDLED:
        return bundled_model_path()
    return settings.MODELS_DIR / model.file_name


def model_delete(*, model: RegisteredModel) -> None:
    """Have every live node unload a model, unregister it and delete its file from the server's models
    directory; ModelError for the bundled model, which stays."""
    if model.source == ModelSource.BUNDLED:
        raise ModelError("The bundled model cannot be deleted")
    model_unload_everywhere(model_ids=[model.id])
    path = None if model.source == ModelSource.EXTERNAL else model_path(model)
    model.delete()
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def model_register_upload(*, received: ReceivedFile, created_by=None) -> RegisteredModel:
    """Register an uploaded GGUF file under its name, moving it where workers look.

    Raises ModelError for an empty or invalid file and ModelConflict ("File already exists") when
    a model of that id or file name exists; then nothing of the upload stays in the models
    directory (the caller still discards ``received``).
    """
    name = received.name
    model_id = model_id_for_file(name)
    if received.size == 0:
        raise ModelError("No file selected")
    if RegisteredModel.objects.filter(id=model_id).exists() or RegisteredModel.objects.filter(file_name=name).exists():
        raise ModelConflict("File already exists")
    facts = model_file_check(path=received.path)  # header and trial load, before the file goes where workers look
    final = settings.MODELS_DIR / name
    try:
        os.link(received.path, final)
    except FileExistsError:
        raise ModelConflict("File already exists") from None
    try:
        model = model_register_file(model_id=model_id, source=ModelSource.UPLOAD, path=final, sha256=received.sha256,
                                    facts=facts, created_by=created_by)
    except ModelConflict:
        final.unlink(missing_ok=True)
        raise ModelConflict("File already exists") from None
    except Exception:
        final.unlink(missing_ok=True)
        raise
    logger.info("uploaded %s (%d bytes, sha256 %s)", name, received.size, received.sha256)
    return model


def model_store_sync() -> dict:
    """Register every valid .gguf in the models directory that no model owns; drop models whose file is gone.

    Returns the file names ``added`` and ``removed``, and the ones ``skipped`` with the reason.
    """
    added, removed, skipped = [], [], []
    owned = set(RegisteredModel.objects.exclude(source__in=[ModelSource.BUNDLED, ModelSource.EXTERNAL])
                .values_list("file_name", flat=True))
    for path in sorted(settings.MODELS_DIR.glob(f"*{GGUF_SUFFIX}")):
        if path.name in owned or not path.is_file():
            continue
        try:
            name = model_file_name_clean(path.name)
            if name != path.name:
                raise ModelError(f"unsafe file name; rename it to {name}")
            model_register_file(model_id=model_id_for_file(name), source=ModelSource.UPLOAD, path=path,
                                sha256=sha256_file(path))
            added.append(path.name)
        except ModelError as exc:
            skipped.append({"name": path.name, "reason": str(exc)})
    for model in RegisteredModel.objects.exclude(source__in=[ModelSource.BUNDLED, ModelSource.EXTERNAL]):
        if not model_path(model).is_file():
            removed.append(model.file_name)
            model.delete()
    return {"added": added, "removed": removed, "skipped": skipped}


def model_unload_everywhere(*, model_ids: list[str] | None) -> list[str]:
    """Every live node unloads ``model_ids`` (all when None) once their requests finish; returns the nodes' names."""
    nodes = list(node_list_live())
    for node in nodes:
        node_models_unload(node=node, model_ids=model_ids)
    return [node.name for node in nodes]


def model_copy_delete(*, node: Node, model_id: str) -> None:
    """Forget a node's copy of a model and have the node delete the file.

    Only for a node with its own model cache (not the server's store); ModelError 404 when the
    node holds no copy, 400 when it uses the server's store.
    """
    copy = ModelCopy.objects.filter(node=node, model_id=model_id).first()
    if copy is None:
        raise ModelError(f"Node {node.name} holds no copy of {model_id!r}", status=404)
    if not node.hardware.get("own_model_cache"):
        raise ModelError(f"Node {node.name} uses the server's model store; delete the model itself instead",
                         status=400)
    celery_app.send_task(TASK_MODEL_COPY_DELETE, args=[model_id], queue=node.queue)
    copy.delete()


def model_register_bundled() -> RegisteredModel:
    """Make sure the bundled SmolLM2 model is registered; idempotent and race-safe."""
    path = bundled_model_path()
    defaults = {"source": ModelSource.BUNDLED, "file_name": BUNDLED_FILE_NAME, "size_bytes": path.stat().st_size}
    model = RegisteredModel.objects.filter(id=settings.LLMP_DEFAULT_MODEL_ID).first()
    if model is None or not model.architecture:
        try:
            defaults.update(gguf_facts(path))
        except ModelError:
            pass
    model, _ = RegisteredModel.objects.update_or_create(id=settings.LLMP_DEFAULT_MODEL_ID, defaults=defaults)
    return model


BLOB_SALT = "llmplatform.blob"
BLOB_TOKEN_MAX_AGE = 24 * 3600


def blob_token(model_id: str) -> str:
    """A token that lets a node fetch one model's file; signed with SECRET_KEY, valid for a day."""
    return signing.dumps({"model": model_id}, salt=BLOB_SALT)


def blob_token_check(*, token: str, model_id: str) -> None:
    """Return only when ``token`` is a ``blob_token(model_id)`` under a day old; else ModelError 403."""
    try:
        claims = signing.loads(token, salt=BLOB_SALT, max_age=BLOB_TOKEN_MAX_AGE)
    except signing.BadSignature:
        raise ModelError("Invalid or expired blob token", status=403) from None
    if claims.get("model") != model_id:
        raise ModelError("The token is for another model", status=403)
