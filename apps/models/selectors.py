from __future__ import annotations

from django.db.models import QuerySet

from apps.models.models import ModelCopy, ModelSource, RegisteredModel
from apps.models.services import GGUF_SUFFIX, ModelError, model_id_for_file


def model_list() -> QuerySet[RegisteredModel]:
    """Every registered model, active or not."""
    return RegisteredModel.objects.all()


def model_list_active() -> QuerySet[RegisteredModel]:
    return RegisteredModel.objects.filter(is_active=True)


async def model_get_active(*, model_id: str) -> RegisteredModel | None:
    return await RegisteredModel.objects.filter(id=model_id, is_active=True).afirst()


def model_list_external() -> QuerySet[RegisteredModel]:
    """Every external API model, with its endpoint and creator, by id."""
    return (RegisteredModel.objects.filter(source=ModelSource.EXTERNAL)
            .select_related("endpoint", "created_by").order_by("id"))


def model_get_file_backed(*, model_id: str) -> RegisteredModel | None:
    """An active model with a file on the server (not an external API model)."""
    return RegisteredModel.objects.filter(id=model_id, is_active=True).exclude(source=ModelSource.EXTERNAL).first()


def model_get_by_name(*, name: str) -> RegisteredModel | None:
    """A model by its file name (``.gguf`` appended when missing) or its id."""
    file_name = name if name.lower().endswith(GGUF_SUFFIX) else name + GGUF_SUFFIX
    return (RegisteredModel.objects.filter(file_name=file_name).first()
            or RegisteredModel.objects.filter(id=name).first()
            or RegisteredModel.objects.filter(id=model_id_for_file(file_name)).first())


def model_file_names(*, model_ids: list[str]) -> dict[str, str]:
    """The file name of each of these models that is registered (its id when it has no file)."""
    return {model.id: model.file_name or model.id for model in RegisteredModel.objects.filter(id__in=model_ids)}


def model_copy_list(*, node) -> QuerySet[ModelCopy]:
    """The copies of models a node holds on its disk."""
    return ModelCopy.objects.filter(node=node)


async def model_load_failures(*, model_id: str, node_ids: list[int]) -> dict[int, str]:
    """Of the nodes ``node_ids``, those where the model failed to load and has not been tried again since
    (its file has not changed, no operator cleared the mark), with why; one indexed query."""
    marked = ModelCopy.objects.filter(model_id=model_id, node_id__in=node_ids, load_failed_at__isnull=False)
    return {node_id: error async for node_id, error in marked.values_list("node_id", "load_error")}


def model_load_failure_marked(*, model_id: str, node_name: str) -> bool:
    """Whether the model is still marked as failing to load on the node (no operator cleared it)."""
    return ModelCopy.objects.filter(model_id=model_id, node__name=node_name, load_failed_at__isnull=False).exists()


def model_load_failures_of_node(*, node_name: str) -> QuerySet[ModelCopy]:
    """The node's copies marked as failing to load, with their models."""
    return ModelCopy.objects.filter(node__name=node_name, load_failed_at__isnull=False).select_related("model")


def _hub_error(exc: Exception) -> ModelError:
    """A Hugging Face Hub failure as the registry reports it: 404 for what does not exist, 403 for
    what the token may not see, 400 for a request the Hub refuses as invalid, 502 for the rest."""
    from workers import hf

    if isinstance(exc, (hf.HfRepoNotFound, hf.HfRevisionNotFound, hf.HfFileNotFound)):
        status = 404
    elif isinstance(exc, hf.HfInvalidRequest):
        status = 400
    elif isinstance(exc, hf.HfAccessDenied):
        status = 403
    else:
        status = 502
    return ModelError(str(exc), status=status)


def hub_model_search(*, query: str, limit: int) -> list[dict]:
    """GGUF models of the Hugging Face Hub matching ``query``, at most ``limit``; ModelError when the Hub fails."""
    from workers import hf  # not at import: huggingface_hub is heavy and most processes never need it

    try:
        return hf.hf_search(query=query, limit=limit)
    except hf.HfError as exc:
        raise _hub_error(exc) from exc


def hub_file_list(*, repo_id: str, revision: str | None) -> list[dict]:
    """The files of a Hugging Face repo at ``revision`` (its default branch when None); ModelError when the
    Hub fails or the repo does not exist."""
    from workers import hf

    try:
        return hf.hf_repo_files(repo_id=repo_id, revision=revision)
    except hf.HfError as exc:
        raise _hub_error(exc) from exc
