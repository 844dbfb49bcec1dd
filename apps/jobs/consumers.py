"""WebSocket: live job events, with replay of what a reconnecting client missed.

Connect to ``/ws/jobs/`` with a session cookie or an API key: an ``Authorization: Bearer`` header,
or from a browser (which cannot set headers) the subprotocols ``["llmp", "bearer.<key>"]`` (the
server accepts ``llmp``), or ``?api_key=`` (kept working; it is redacted from every log line).
Query parameters subscribe at once: ``job=<id>`` (or ``job=*`` for every job the user may see)
and ``last_event_id=<id>``. Or send ``{"action": "subscribe", "job": "<id>" | "*", "last_event_id": "<id>"}`` and
``{"action": "unsubscribe", "job": ...}``. Every message is JSON: an event (``"type": "job.*"``),
``{"type": "subscribed", ...}`` or ``{"type": "error", "error": ...}``.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain

from apps.jobs import events
from apps.jobs.selectors import job_visible
from llmplatform.authentication import api_key_checker
from llmplatform.request_guard import auth_blocked_for, auth_failure_count

ALL = "*"
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def _origin_is_this_site(scope) -> bool:
    """Whether the page that opened this WebSocket is this site's: its whole origin (scheme, host and port)
    is the one the connection came to, on an allowed host, or is in CSRF_TRUSTED_ORIGINS (``*.`` wildcards
    included), as Django's CSRF check has it for forms. No Origin header: not a browser, nothing to hijack."""
    headers = dict(scope.get("headers") or [])
    if b"origin" not in headers:
        return True
    origin, host = headers[b"origin"].decode("latin1"), headers.get(b"host", b"").decode("latin1")
    secure = scope.get("scheme") == "wss"
    if settings.SECURE_PROXY_SSL_HEADER:  # TLS ends at a proxy in front, which says so in this header
        name, value = settings.SECURE_PROXY_SSL_HEADER
        forwarded = headers.get(name.removeprefix("HTTP_").replace("_", "-").lower().encode(), b"")
        secure = secure or forwarded.decode("latin1").split(",")[0].strip() == value
    if host and origin == f"{'https' if secure else 'http'}://{host}":
        return validate_host(split_domain_port(host)[0], settings.ALLOWED_HOSTS)
    scheme, _, netloc = origin.partition("://")
    return origin in settings.CSRF_TRUSTED_ORIGINS or any(
        trusted.startswith(f"{scheme}://*.") and is_same_domain(netloc, trusted.partition("://")[2].lstrip("*"))
        for trusted in settings.CSRF_TRUSTED_ORIGINS)


@database_sync_to_async
def _key_check(raw_key: str):
    return async_to_sync(api_key_checker())(raw_key=raw_key)


SUBPROTOCOL = "llmp"  # what the server accepts when a browser sends its key as a subprotocol
BEARER_SUBPROTOCOL = "bearer."  # "bearer.<key>": the key, offered beside "llmp" and never echoed back


class JobEventsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        address = (self.scope.get("client") or ("",))[0]
        if auth_blocked_for(address):  # key guessing over the WebSocket is held to the same limit as over HTTP
            await self.close(code=4401)
            return
        self.user = await self._authenticate(address)
        if self.user is None:
            await self.close(code=4401)
            return
        self.subscriptions: dict[str, str] = {}  # job id or "*" -> its group
        self.last_seen: dict[str, tuple[int, int]] = {}  # job id -> last event id sent
        await self.accept(SUBPROTOCOL if SUBPROTOCOL in (self.scope.get("subprotocols") or []) else None)
        query = parse_qs(self.scope.get("query_string", b"").decode())
        if "job" in query:
            await self._subscribe(query["job"][0], (query.get("last_event_id") or [""])[0])

    async def _authenticate(self, address: str):
        user = self.scope.get("user")
        if user is not None and user.is_authenticated and _origin_is_this_site(self.scope):  # no cross-site hijacking
            return user
        headers = dict(self.scope.get("headers") or [])
        scheme, _, raw_key = headers.get(b"authorization", b"").decode(errors="replace").partition(" ")
        if scheme.lower() != "bearer":
            offered = [p for p in self.scope.get("subprotocols") or [] if p.startswith(BEARER_SUBPROTOCOL)]
            raw_key = offered[0][len(BEARER_SUBPROTOCOL):] if offered else (
                parse_qs(self.scope.get("query_string", b"").decode()).get("api_key") or [""])[0]
        if not raw_key.strip():
            return None
        check = await _key_check(raw_key.strip())
        if check.key is None:
            await auth_failure_count(address)
            return None
        return check.key.user  # None for a key without a user: /v1 only

    async def disconnect(self, code) -> None:
        for group in set(getattr(self, "subscriptions", {}).values()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        if not isinstance(content, dict) or content.get("action") not in ("subscribe", "unsubscribe"):
            await self.send_json({"type": "error",
                                  "error": 'send {"action": "subscribe" or "unsubscribe", "job": "<id>" or "*"}'})
            return
        target = str(content.get("job") or "")
        if content["action"] == "subscribe":
            await self._subscribe(target, str(content.get("last_event_id") or ""))
        elif (target := self._subscription_key(target)) in self.subscriptions:
            group = self.subscriptions.pop(target)
            if group not in self.subscriptions.values():
                await self.channel_layer.group_discard(group, self.channel_name)
            await self.send_json({"type": "unsubscribed", "job": target})

    def _subscription_key(self, target: str) -> str:
        for key in self.subscriptions:
            if key.replace("-", "") == target.replace("-", "").lower():
                return key
        return target

    async def _subscribe(self, target: str, last_event_id: str) -> None:
        if last_event_id and not _EVENT_ID.match(last_event_id):
            await self.send_json({"type": "error", "error": f"invalid last_event_id {last_event_id!r}: use an event's id"})
            return
        if target == ALL:
            group = events.STAFF_GROUP if self.user.is_staff else events.user_group(self.user.pk)
            job_id = None
        else:
            job = await database_sync_to_async(job_visible)(user=self.user, job_id=target)
            if job is None:
                await self.send_json({"type": "error", "error": f"job {target!r} not found"})
                return
            group, job_id, target = events.job_group(job.pk), job.pk, str(job.pk)
        # Join first, then replay: an event published in between arrives twice and is dropped by id.
        await self.channel_layer.group_add(group, self.channel_name)
        self.subscriptions[target] = group
        missed = await database_sync_to_async(events.events_after)(last_id=last_event_id or None, job_id=job_id) \
            if last_event_id or job_id is not None else []
        await self.send_json({"type": "subscribed", "job": target, "replayed": len(missed)})
        for event in missed:
            await self._forward(event)

    def _visible(self, event: events.JobEvent) -> bool:
        return self.user.is_staff or event.get("owner") == self.user.pk

    async def _forward(self, event: events.JobEvent) -> None:
        if not self._visible(event):
            return
        key = events.id_key(event["id"])
        if self.last_seen.get(event["job"], (-1, -1)) >= key:
            return
        self.last_seen[event["job"]] = key
        await self.send_json(event)

    async def job_event(self, message) -> None:
        event = message["event"]
        if event["job"] in self.subscriptions or ALL in self.subscriptions:
            await self._forward(event)
