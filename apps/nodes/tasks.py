from celery import shared_task

from apps.nodes.services import node_metrics_prune as prune


@shared_task(name="apps.nodes.tasks.node_metrics_prune", ignore_result=True)
def node_metrics_prune() -> int:
    return prune()
