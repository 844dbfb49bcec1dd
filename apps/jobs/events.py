"""The one publisher of live job events, and their durable log for replay.

Each event is appended, in one atomic step, to a Redis stream of all jobs and to a stream of its
job, under the same entry id; that id is the event's ``id``. Then it goes to the channel-layer
groups of its job, of its owner and of staff. A client that reconnects with the last id it saw
reads what it missed from the streams (``events_after``) and drops live duplicates by id.
"""

from __future__ import annotations

import json
import logging
import time
from functools import cache
from typing import TYPE_CHECKING, TypedDict

import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

if TYPE_CHECKING:
    from apps.jobs.models import Job

logger = logging.getLogger(__name__)

# Event types, in the order a job's life produces them.
CREATED = "job.created"
STARTED = "job.started"
STAGE = "job.stage"
PROGRESS = "job.progress"
LOG = "job.log"
RETRYING = "job.retrying"
SUCCEEDED = "job.succeeded"
FAILED = "job.failed"
CANCELLED = "job.cancelled"
FINAL_TYPES = frozenset({SUCCEEDED, FAILED, CANCELLED})

STAFF_GROUP = "jobs.staff"
JOB_STREAM_TTL_SECONDS = 7 * 24 * 3600

# Append to the all-jobs stream, then to the job's stream under the same id, atomically.
_APPEND = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], id, 'e', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return id
"""


class JobEvent(TypedDict):
    id: str  # the Redis stream entry id, "<ms>-<seq>"; increases along one job's events
    type: str
    job: str
    kind: str
    owner: int | None
    at: float
    status: str
    stage: str
    data: dict


def job_group(job_id) -> str:
    return f"jobs.job.{str(job_id).replace('-', '')}"


def user_group(user_id: int) -> str:
    return f"jobs.user.{user_id}"


def all_jobs_stream() -> str:
    return f"{settings.LLMP_REDIS_PREFIX}:jobs:events"


def job_stream(job_id) -> str:
    return f"{settings.LLMP_REDIS_PREFIX}:job:{job_id}:events"


@cache
def events_redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def event_decode(entry_id: bytes | str, fields: dict) -> JobEvent:
    event = json.loads(fields[b"e"] if b"e" in fields else fields["e"])
    event["id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return event


def id_key(event_id: str) -> tuple[int, int]:
    """A stream id as a comparable pair."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


async def _group_send(groups: list[str], event: JobEvent) -> None:
    layer = get_channel_layer()
    for group in groups:
        await layer.group_send(group, {"type": "job.event", "event": event})


def _publish_now(payload: dict) -> JobEvent:
    encoded = json.dumps(payload, separators=(",", ":"))
    entry_id = events_redis().eval(_APPEND, 2, all_jobs_stream(), job_stream(payload["job"]),
                             settings.LLMP_JOB_EVENTS_MAXLEN, 10_000, encoded, JOB_STREAM_TTL_SECONDS)
    event: JobEvent = {"id": entry_id.decode(), **payload}
    groups = [job_group(payload["job"]), STAFF_GROUP]
    if payload["owner"] is not None:
        groups.append(user_group(payload["owner"]))
    try:
        async_to_sync(_group_send)(groups, event)  # one event loop (and layer connection) for all groups
    except Exception:  # the durable streams have it; a reconnecting client will catch up
        logger.exception("could not send %s of job %s to the channel layer", payload["type"], payload["job"])
    return event


def job_event_send(job: Job, event_type: str, data: dict | None = None) -> None:
    """Publish an event about ``job`` as it is now, once the current transaction commits."""
    payload = {
        "type": event_type, "job": str(job.id), "kind": job.kind, "owner": job.created_by_id, "at": time.time(),
        "status": job.status, "stage": job.stage, "data": data or {},
    }
    transaction.on_commit(lambda: _publish_now(payload))


def events_after(*, last_id: str | None, job_id=None, page: int = 1000) -> list[JobEvent]:
    """Every event kept after ``last_id`` (all of them when None), of one job or of all jobs, oldest first."""
    stream = job_stream(job_id) if job_id is not None else all_jobs_stream()
    found: list[JobEvent] = []
    while True:
        start = f"({found[-1]['id'] if found else last_id}" if found or last_id else "-"
        entries = events_redis().xrange(stream, start, "+", count=page)
        found.extend(event_decode(entry_id, fields) for entry_id, fields in entries)
        if len(entries) < page:
            return found
