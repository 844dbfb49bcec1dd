"""The one runner of every job: claim (a conditional UPDATE) → run the kind's handler → finish.

A handler is a function ``run(ctx: JobContext) -> RegisteredModel | None``, registered for its kind
in ``apps.jobs.registry`` by the app that owns the kind, that reports stages, progress and log
lines through ``ctx`` and calls ``ctx.check_cancel()`` often. It raises
``JobError`` for a failure a user can act on; anything else is a bug and fails the job too.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.jobs import events
from apps.jobs.models import Job, JobStage, JobStatus
from apps.jobs.registry import job_handler_get

logger = logging.getLogger(__name__)

LOG_LINES_KEPT = 200


class JobError(Exception):
    """A job failed for a reason its user can read and act on."""


class JobCancelled(Exception):
    """The job's user asked it to stop."""


class JobContext:
    """What a handler may do: report progress, stages and log lines, and notice cancellation."""

    def __init__(self, job: Job, *, models_dir: Path) -> None:
        self.job = job
        self.params = job.params
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._last_flush = 0.0
        self._last_cancel_check = 0.0
        self._rate_mark: tuple[float, int] | None = None

    @property
    def node_name(self) -> str:
        return self.job.node.name if self.job.node else ""

    def _save(self, **fields) -> None:
        fields["updated_at"] = timezone.now()
        Job.objects.filter(pk=self.job.pk).update(**fields)
        for name, value in fields.items():
            setattr(self.job, name, value)

    def stage(self, stage: str, *, unit: str = "", total: int | None = None) -> None:
        """Enter a new stage; progress restarts from zero in ``unit``."""
        with self._lock:
            self._rate_mark = None
            self._save(stage=stage, progress_done=0, progress_total=total, progress_unit=unit, rate=None,
                       eta_seconds=None)
            events.job_event_send(self.job, events.STAGE, {"stage": stage, "unit": unit, "total": total})
        self.log(f"stage: {stage}")

    def progress(self, done: int, total: int | None = None, *, force: bool = False) -> None:
        """Record progress; written and published at most every LLMP_JOB_PROGRESS_INTERVAL seconds."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_flush < settings.LLMP_JOB_PROGRESS_INTERVAL:
                return
            self._last_flush = now
            rate = eta = None
            if self._rate_mark is not None and now > self._rate_mark[0]:
                rate = max(0.0, (done - self._rate_mark[1]) / (now - self._rate_mark[0]))
                if self.job.rate is not None:  # smooth it
                    rate = 0.7 * self.job.rate + 0.3 * rate
                total_now = total if total is not None else self.job.progress_total
                if total_now and rate > 0:
                    eta = max(0.0, (total_now - done) / rate)
            self._rate_mark = (now, done)
            fields = {"progress_done": done, "rate": rate, "eta_seconds": eta}
            if total is not None:
                fields["progress_total"] = total
            self._save(**fields)
            events.job_event_send(self.job, events.PROGRESS, {
                "done": done, "total": self.job.progress_total, "unit": self.job.progress_unit,
                "rate": rate, "eta_seconds": eta})

    def log(self, line: str) -> None:
        stamped = f"{timezone.now():%Y-%m-%d %H:%M:%S} {line}"
        with self._lock:
            lines = (list(self.job.log) + [stamped])[-LOG_LINES_KEPT:]
            self._save(log=lines)
            events.job_event_send(self.job, events.LOG, {"line": stamped})

    def cancel_requested(self) -> bool:
        """Whether the user asked to stop; reads the database at most once a second."""
        now = time.monotonic()
        if now - self._last_cancel_check >= 1.0:
            self._last_cancel_check = now
            self.job.cancel_requested = Job.objects.filter(pk=self.job.pk).values_list(
                "cancel_requested", flat=True).first() is not False
        return self.job.cancel_requested

    def check_cancel(self) -> None:
        if self.cancel_requested():
            raise JobCancelled()


def job_claim(*, job_id, node) -> Job | None:
    """Take the job for this worker if it is queued, or running under a lease that ran out."""
    now = timezone.now()
    claimable = Q(status=JobStatus.QUEUED) | Q(status=JobStatus.RUNNING, lease_expires_at__lt=now)
    claimed = Job.objects.filter(claimable, pk=job_id, cancel_requested=False).update(
        status=JobStatus.RUNNING, node=node, attempts=F("attempts") + 1, started_at=Coalesce("started_at", now),
        lease_expires_at=now + timedelta(seconds=settings.LLMP_JOB_LEASE_SECONDS), updated_at=now)
    if claimed != 1:
        return None
    return Job.objects.select_related("node").get(pk=job_id)


def _finish(job: Job, status: str, *, error: str = "", result_model=None) -> None:
    now = timezone.now()
    fields = {"status": status, "error": error, "finished_at": now, "lease_expires_at": None, "updated_at": now,
              "result_model": result_model}
    if status == JobStatus.SUCCEEDED:
        fields["stage"] = JobStage.DONE
    updated = Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(**fields)
    for name, value in fields.items():
        setattr(job, name, value)
    if updated != 1:
        logger.warning("job %s was no longer running when it finished as %s", job.pk, status)
        return
    event_type = {JobStatus.SUCCEEDED: events.SUCCEEDED, JobStatus.FAILED: events.FAILED,
                  JobStatus.CANCELLED: events.CANCELLED}[status]
    events.job_event_send(job, event_type, {"error": error, "model": result_model.id if result_model else None})


class _LeaseKeeper(threading.Thread):
    """Renews a running job's lease while its handler works, even through silent stages."""

    def __init__(self, job: Job) -> None:
        super().__init__(name=f"job-lease-{job.pk}", daemon=True)
        self.job_id = job.pk
        self.stopped = threading.Event()

    def run(self) -> None:
        period = settings.LLMP_JOB_LEASE_SECONDS / 3
        while not self.stopped.wait(period):
            try:
                close_old_connections()
                Job.objects.filter(pk=self.job_id, status=JobStatus.RUNNING).update(
                    lease_expires_at=timezone.now() + timedelta(seconds=settings.LLMP_JOB_LEASE_SECONDS))
            except Exception:
                logger.exception("could not renew the lease of job %s", self.job_id)


def job_execute(*, job_id, node_name: str) -> None:
    """Run one job on this worker, if it can be claimed; every outcome ends the job."""
    from apps.nodes.models import Node

    node = Node.objects.filter(name=node_name).first()
    job = job_claim(job_id=job_id, node=node)
    if job is None:
        logger.info("job %s is not claimable (finished, cancelled or running elsewhere); skipping", job_id)
        return
    if job.attempts > settings.LLMP_JOB_MAX_ATTEMPTS:
        _finish(job, JobStatus.FAILED, error=f"Gave up after {job.attempts - 1} attempts: the worker running "
                                             "this job stopped each time.")
        return
    events.job_event_send(job, events.STARTED if job.attempts == 1 else events.RETRYING,
                          {"attempt": job.attempts, "node": node.name if node else None})
    context = JobContext(job, models_dir=settings.MODELS_DIR)
    keeper = _LeaseKeeper(job)
    keeper.start()
    try:
        handler = job_handler_get(job.kind)
        result_model = handler(context)
    except JobCancelled:
        context.log("cancelled by its user")
        _finish(job, JobStatus.CANCELLED)
    except JobError as exc:
        context.log(f"failed: {exc}")
        _finish(job, JobStatus.FAILED, error=str(exc))
    except Exception as exc:
        logger.exception("job %s failed", job.pk)
        context.log(f"failed: {exc!r}")
        _finish(job, JobStatus.FAILED, error=f"The job failed unexpectedly: {exc}")
    else:
        _finish(job, JobStatus.SUCCEEDED, result_model=result_model)
    finally:
        keeper.stopped.set()
