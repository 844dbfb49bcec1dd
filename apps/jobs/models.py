import uuid

from django.conf import settings
from django.db import models


class JobKind(models.TextChoices):
    DOWNLOAD = "download", "Download from Hugging Face"
    CONVERT = "convert", "Convert a Hugging Face checkpoint to GGUF"
    QUANTIZE = "quantize", "Quantize a GGUF model"


class JobStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobStage(models.TextChoices):
    WAITING = "waiting"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    CONVERTING = "converting"
    QUANTIZING = "quantizing"
    VERIFYING = "verifying"
    REGISTERING = "registering"
    DONE = "done"


class Job(models.Model):
    """A long operation on a node (download, convert, quantize), driven by ``apps.jobs.runner``.

    The row is the truth; a Celery message only wakes a worker up. A running job holds a lease
    that its runner renews; a job whose lease ran out (its worker died) is redelivered, up to
    ``LLMP_JOB_MAX_ATTEMPTS`` attempts in all.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=JobKind.choices)
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True)
    stage = models.CharField(max_length=16, choices=JobStage.choices, default=JobStage.WAITING)
    params = models.JSONField(default=dict)
    node = models.ForeignKey("nodes.Node", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    # Progress in ``progress_unit`` (bytes, tensors, ...): done of total, with rate and ETA.
    progress_done = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(null=True, blank=True)
    progress_unit = models.CharField(max_length=16, blank=True)
    rate = models.FloatField(null=True, blank=True, help_text="Units per second")
    eta_seconds = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    log = models.JSONField(default=list, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True, help_text="When a worker was last sent this job")
    result_model = models.ForeignKey("llm_models.RegisteredModel", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="jobs")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "lease_expires_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def progress_fraction(self) -> float | None:
        """Of the current stage; 1.0 once the job has succeeded."""
        if self.status == JobStatus.SUCCEEDED:
            return 1.0
        if not self.progress_total:
            return None
        return min(1.0, self.progress_done / self.progress_total)
