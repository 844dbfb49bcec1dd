"""Celery tasks of a node worker: thin adapters from a queue message to the runtime."""

from celery import shared_task

from node.config import node_config, node_pool, node_redis
from workers.messages import InferenceRequest
from workers.protocol import TASK_INFERENCE_RUN, TASK_JOB_REAP, TASK_JOB_RUN, TASK_MODEL_COPY_DELETE, TASK_MODELS_UNLOAD
from workers.runner import request_refuse, request_submit


# Hands the request to its model's runner and returns: the runner streams it. Not acks_late: a
# generation that was half streamed must not be replayed after a crash; the gateway sees the
# worker's liveness key expire and fails the request instead. The gateway sends it with an expiry
# (its queue timeout), so a message a dead worker had reserved never runs later.
@shared_task(name=TASK_INFERENCE_RUN, ignore_result=True)
def inference_run(request_id: str, kind: str, model: dict, params: dict) -> None:
    """The kwargs are ``InferenceRequest.to_wire()``'s."""
    try:
        request = InferenceRequest.from_wire({"request_id": request_id, "kind": kind, "model": model, "params": params})
    except (KeyError, TypeError, ValueError) as exc:  # a gateway of another version: fail it now, not at a timeout
        request_refuse(request_id=request_id, reason=f"the worker cannot read this request ({exc!r})",
                       config=node_config(), redis=node_redis())
        return
    request_submit(request, config=node_config(), redis=node_redis(), pool=node_pool())


# acks_late + reject_on_worker_lost: a job whose worker dies goes back to the queue. The Job row
# decides whether it still runs (see apps.jobs.runner: claim by conditional update, bounded attempts).
@shared_task(name=TASK_JOB_RUN, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def job_run(job_id: str) -> None:
    from apps.jobs.runner import job_execute
    from node.config import node_name

    job_execute(job_id=job_id, node_name=node_name())


@shared_task(name=TASK_JOB_REAP, ignore_result=True)
def job_reap() -> int:
    from apps.jobs.services import job_reap as reap

    return reap()


# Sent to one node's queue (node.NAME): drain after a cordon, or free a model's memory. Returns at
# once: a model still serving requests is unloaded by the pool as its last one ends.
@shared_task(name=TASK_MODELS_UNLOAD, ignore_result=True)
def models_unload(model_ids: list[str] | None = None) -> list[str]:
    return node_pool().unload(model_ids)


@shared_task(name=TASK_MODEL_COPY_DELETE, ignore_result=True)
def model_copy_delete(model_id: str) -> bool:
    """Unload a model and delete this node's own copy of its file (never the server's store).

    A request still using the model keeps the deleted file open until it ends, then the pool unloads it.
    """
    from django.conf import settings

    from apps.models.selectors import model_file_names

    if not settings.LLMP_SERVER_URL:
        return False
    node_pool().unload([model_id])
    file_name = model_file_names(model_ids=[model_id]).get(model_id) or f"{model_id}.gguf"
    (settings.MODELS_DIR / file_name).unlink(missing_ok=True)
    return True
