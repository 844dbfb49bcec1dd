from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from apps.jobs.models import Job


def job_list_visible(*, user) -> QuerySet[Job]:
    """Staff see every job; other users see the jobs they started."""
    jobs = Job.objects.select_related("node", "created_by", "result_model")
    return jobs if user.is_staff else jobs.filter(created_by=user)


def job_visible(*, user, job_id) -> Job | None:
    try:
        return job_list_visible(user=user).filter(pk=job_id).first()
    except ValidationError:  # not a UUID
        return None
