from __future__ import annotations

import asyncio
import re

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from apps.jobs import events
from apps.jobs.models import Job
from apps.jobs.selectors import job_list_visible, job_visible
from apps.jobs.serializers import JobSerializer
from apps.jobs.services import job_cancel, job_retry
from llmplatform.aioredis import redis_client
from llmplatform.api_errors import ApiErrorSerializer as ApiError
from llmplatform.authentication import request_user
from llmplatform.permissions import access, access_refusal
from llmplatform.sse import KEEP_ALIVE, sse_frame, sse_response

_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
SSE_BLOCK_MS = 2000


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Long operations (download, convert, quantize) with their progress; poll a job here, or follow its
    events live over SSE (``events_url``) or WebSocket (``/ws/jobs/``)."""

    serializer_class = JobSerializer
    filterset_fields = ["kind", "status", "node__name"]
    permission_classes = access("jobs")

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return Job.objects.none()
        return job_list_visible(user=self.request.user)

    @extend_schema(request=None, responses={200: JobSerializer, 409: ApiError})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = job_cancel(job=self.get_object())  # JobStateError: 409
        return Response(JobSerializer(job).data)

    @extend_schema(request=None, responses={200: JobSerializer, 409: ApiError, 503: ApiError})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        job = job_retry(job=self.get_object())  # JobStateError: 409
        return Response(JobSerializer(job).data)


async def job_events(request: HttpRequest, job_id: str):
    """Server-sent events of one job: its history (after ``Last-Event-ID`` when given), then live ones,
    until the job ends. For clients without WebSocket."""
    user = await request_user(request)
    if user is None:
        return JsonResponse({"error": "Authentication credentials were not provided."}, status=401)
    job = await sync_to_async(job_visible)(user=user, job_id=job_id)
    if job is None:
        return JsonResponse({"error": "Job not found."}, status=404)
    if refusal := access_refusal(view="job-events", action="get", user=user, obj=job):
        return JsonResponse({"error": refusal}, status=403)
    last_id = request.headers.get("Last-Event-ID") or request.GET.get("last_event_id") or ""
    if last_id and not _EVENT_ID.match(last_id):
        return JsonResponse({"error": f"invalid Last-Event-ID {last_id!r}: use an event's id"}, status=400)

    async def stream():
        cursor = last_id or "0-0"
        terminal = job.is_terminal
        redis = redis_client()
        while True:
            entries = await redis.xread({events.job_stream(job.pk): cursor}, block=SSE_BLOCK_MS, count=500)
            if not entries:
                if terminal:
                    return
                terminal = await sync_to_async(lambda: job_visible(user=user, job_id=job.pk).is_terminal)()
                yield KEEP_ALIVE
                continue
            for entry_id, fields in entries[0][1]:
                event = events.event_decode(entry_id, fields)
                cursor = event["id"]
                yield sse_frame(event, event=event["type"], event_id=event["id"])
                if event["type"] in events.FINAL_TYPES:
                    return
            await asyncio.sleep(0)

    return sse_response(stream())
