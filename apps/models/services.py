from __future__ import annotations

import os
import re
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction

from apps.models.models import ModelCopy, ModelSource, RegisteredModel
from workers.bundled import BUNDLED_FILE_NAME, bundled_model_path

GGUF_SUFFIX = ".gguf"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class ModelError(Exception):
    """A request about models that cannot be done, with the HTTP status that says why."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


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
    """The registry fields read from a GGUF file's header; ModelError when it is not a valid GGUF."""
    from apps.models.gguf import GGUFError, read_header, summarize

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


def model_register_file(*, model_id: str, source: str, path: Path, sha256: str, node=None, created_by=None,
                        facts: dict | None = None, **origin) -> RegisteredModel:
    """Register a complete, verified GGUF file already at ``MODELS_DIR / <model_id>.gguf`` (or ``path``).

    ``origin``: hf_repo, hf_filename, hf_revision, parent. The file must already be where it
    will stay; on a conflict the caller still owns it. ``facts``: ``gguf_facts(path)`` when the caller
    already read them.
    """
    facts = facts or gguf_facts(path)
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


def model_path(model: RegisteredModel) -> Path:
    """Where the server keeps a local model's file."""
    if model.source == ModelSource.BUNDLED:
        return bundled_model_path()
    return settings.MODELS_DIR / model.file_name


def model_delete(*, model: RegisteredModel) -> None:
    """Unregister a model and delete its file from the server's models directory (never a bundled file)."""
    path = None if model.source in (ModelSource.BUNDLED, ModelSource.EXTERNAL) else model_path(model)
    model.delete()
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


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
