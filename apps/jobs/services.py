from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.jobs import events
from apps.jobs.models import Job, JobStage, JobStatus
from apps.nodes.models import Node
from apps.nodes.selectors import node_list_live
from llmplatform.celery import app as celery_app
from llmplatform.errors import BROKER_ERRORS, BROKER_UNAVAILABLE, ApplicationError
from workers.protocol import TASK_JOB_RUN

logger = logging.getLogger(__name__)


class JobStateError(ApplicationError):
    """The job is not in a state that allows this action (409)."""

    status = 409


UNSENT_ERROR = f"The job could not be queued: {BROKER_UNAVAILABLE} Retry it once Redis answers."


def _dispatch(job: Job, *, queue: str, announce: dict | None = None) -> None:
    """Once the current transaction commits, announce ``job`` (``job.created`` with ``announce`` as its
    data, when given) and wake a worker on ``queue`` for it.

    When Redis does not answer, a queued job is failed with ``UNSENT_ERROR`` instead of waiting for a
    worker that will never hear of it, and the broker error goes on up (a 503 to the client).
    """
    job_id = str(job.pk)
    Job.objects.filter(pk=job.pk).update(dispatched_at=timezone.now())

    def send() -> None:
        try:
            if announce is not None:
                events.job_event_send(job, events.CREATED, announce)  # outside a transaction now: sent at once
            celery_app.send_task(TASK_JOB_RUN, args=[job_id], queue=queue)
        except BROKER_ERRORS:
            _job_fail_unsent(job=job)
            raise

    transaction.on_commit(send)


def _job_fail_unsent(*, job: Job) -> None:
    now = timezone.now()
    if not Job.objects.filter(pk=job.pk, status=JobStatus.QUEUED).update(
            status=JobStatus.FAILED, error=UNSENT_ERROR, finished_at=now, updated_at=now):
        return  # a redelivered running job: the reaper tries again
    logger.error("job %s failed: Redis did not answer when it was queued", job.pk)
    job.status, job.error, job.finished_at = JobStatus.FAILED, UNSENT_ERROR, now
    with contextlib.suppress(*BROKER_ERRORS):  # the events' Redis may answer when the broker does not
        events.job_event_send(job, events.FAILED, {"error": UNSENT_ERROR, "model": None})


def job_create(*, kind: str, params: dict, node: Node, created_by=None) -> Job:
    """Queue a job on ``node``'s queue (failed at once, and the broker error raised, when Redis is down)."""
    with transaction.atomic():
        job = Job.objects.create(kind=kind, params=params, node=node, created_by=created_by)
        _dispatch(job, queue=node.queue, announce={"params": params, "node": node.name})
    return job


def job_cancel(*, job: Job) -> Job:
    """Stop a job: a queued one at once, a running one at its next cancellation check."""
    now = timezone.now()
    with transaction.atomic():
        if Job.objects.filter(pk=job.pk, status=JobStatus.QUEUED).update(
                status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, updated_at=now):
            job.refresh_from_db()
            events.job_event_send(job, events.CANCELLED, {"error": "", "model": None})
            return job
        if not Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(cancel_requested=True, updated_at=now):
            job.refresh_from_db()
            raise JobStateError(f"The job has already {job.status}.")
    job.refresh_from_db()
    return job


def job_retry(*, job: Job) -> Job:
    """Queue a failed or cancelled job again, with its attempts reset; downloads resume their partial file."""
    now = timezone.now()
    node = job.node
    if node is None:
        raise JobStateError("The job's node no longer exists; start a new job instead.")
    with transaction.atomic():
        retried = Job.objects.filter(pk=job.pk, status__in=[JobStatus.FAILED, JobStatus.CANCELLED]).update(
            status=JobStatus.QUEUED, stage=JobStage.WAITING, attempts=0, cancel_requested=False, error="",
            progress_done=0, progress_total=None, rate=None, eta_seconds=None, finished_at=None,
            lease_expires_at=None, result_model=None, updated_at=now)
        job.refresh_from_db()
        if not retried:
            raise JobStateError(f"Only failed or cancelled jobs can be retried; this one is {job.status}.")
        _dispatch(job, queue=node.queue, announce={"params": job.params, "node": node.name, "retry": True})
    return job


def job_recover_for_node(*, node: Node) -> int:
    """A node's worker (re)starts: jobs it was running died with its previous process; run them again.

    One node name is one worker, so no other process can hold these leases.
    """
    stale = list(Job.objects.filter(node=node, status=JobStatus.RUNNING))
    for job in stale:
        Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(lease_expires_at=timezone.now())
        logger.info("job %s was running when node %s stopped; redelivering it", job.pk, node.name)
        _dispatch(job, queue=node.queue)
    return len(stale)


def job_reap() -> int:
    """Redeliver running jobs whose lease ran out (their worker died), to their node if it is live again,
    else to any worker; the runner gives up after LLMP_JOB_MAX_ATTEMPTS attempts."""
    now = timezone.now()
    live = set(node_list_live().values_list("pk", flat=True))
    count = 0
    resent_before = now - timedelta(seconds=settings.LLMP_JOB_LEASE_SECONDS)
    stale = (Job.objects.filter(status=JobStatus.RUNNING, lease_expires_at__lt=now)
             .filter(Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=resent_before)).select_related("node"))
    for job in stale:
        queue = job.node.queue if job.node_id in live else settings.CELERY_TASK_DEFAULT_QUEUE
        logger.info("job %s lost its worker (lease ran out); redelivering it to %s", job.pk, queue)
        _dispatch(job, queue=queue)
        count += 1
    return count
