"""Celery tasks of a node worker: thin adapters from a queue message to the runtime."""

from celery import shared_task

from workers.node import node_config, node_pool, node_redis
from workers.runner import request_run


# Not acks_late: a generation that was half streamed must not be replayed after a crash;
# the gateway notices the silence and fails the request instead.
@shared_task(name="workers.tasks.inference_run", ignore_result=True)
def inference_run(request_id: str, kind: str, model: dict, params: dict) -> None:
    request_run(request_id=request_id, kind=kind, model=model, params=params,
                config=node_config(), redis=node_redis(), pool=node_pool())
