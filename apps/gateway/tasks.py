from celery import shared_task

from apps.gateway.services import request_log_prune as prune


@shared_task(name="apps.gateway.tasks.request_log_prune", ignore_result=True)
def request_log_prune() -> int:
    return prune()
