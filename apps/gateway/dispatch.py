"""Sending a request to a node and reading its events back (the gateway's side of the wire).

See ``workers.protocol`` for why each request gets its own Redis stream, and
``apps.gateway.streams`` for how one reader per process reads all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import NamedTuple

from asgiref.sync import sync_to_async
from django.conf import settings

from apps.fit.selectors import FitLevel, fit_levels
from apps.gateway.errors import OpenAIError, model_load_failed, no_worker
from apps.gateway.lookups import lookup_live_nodes
from apps.gateway.streams import FINAL_EVENTS, stream_reader
from apps.models.models import ModelCopy, RegisteredModel
from apps.models.selectors import model_load_failures
from apps.nodes.models import Node, NodeStatus
from apps.nodes.selectors import node_list_unhealthy
from llmplatform.aioredis import redis_client
from llmplatform.celery import app as celery_app
from workers import protocol
from workers.messages import InferenceRequest

logger = logging.getLogger(__name__)

def _inflight_key(node_name: str) -> str:
    """A sorted set of the node's requests in flight, scored by dispatch time.

    A set rather than a counter, so that a request whose release never ran (a gateway that
    died mid-request) stops counting once it is older than any request can wait.
    """
    return f"{settings.LLMP_REDIS_PREFIX}:node:{node_name}:requests"


def _inflight_horizon() -> float:
    return time.time() - settings.LLMP_QUEUE_TIMEOUT - settings.LLMP_FIRST_TOKEN_TIMEOUT


class Placement(NamedTuple):
    """The node chosen to serve a request, and why (kept in the request history)."""

    node: Node
    reason: str


async def node_pick(model: RegisteredModel) -> Placement:
    """The live node to serve ``model`` (see ``node_choose``)."""
    nodes = await lookup_live_nodes()
    if not nodes:
        unhealthy = [node.name async for node in node_list_unhealthy()]
        if unhealthy:
            raise no_worker(f"No live worker node can serve '{model.id}' right now: " + "; ".join(
                f"node {name} is unhealthy (its start-up test decode failed; GET /api/v1/nodes/{name}/ says why)"
                for name in unhealthy) + ".")
        raise no_worker(f"No live worker node can serve '{model.id}' right now; start one with "
                        "'python -m workers --node NAME'.")
    return await node_choose(model, nodes)


async def node_choose(model: RegisteredModel, nodes: list[Node]) -> Placement:
    """Of the live ``nodes``, the one to serve ``model``, with the reason for choosing it.

    Cordoned nodes (or nodes on a cordoned GPU) are skipped. Degraded nodes are used only when
    no online node can take the request. Among the rest: a node holding the model loaded, least
    busy first; otherwise (a model no candidate has loaded) a node the model fits on, marginal or
    better, before one whose fit is unknown; then one that already holds the file; then the one
    with fewest requests in flight; then the better fit. Nodes where the model is too_tight are
    used only when no other node is left.
    """
    open_nodes = [node for node in nodes if not node.is_cordoned]
    if not open_nodes:
        raise no_worker(f"Every live node is cordoned; none can serve '{model.id}' right now.")
    skipped = [f"{node.name} cordoned" for node in nodes if node.is_cordoned]
    online = [node for node in open_nodes if node.status == NodeStatus.ONLINE]

    warm = [node for node in online if model.id in node.loaded_models]
    if len(warm) == 1:  # the hottest path: nothing to weigh, so no round trip to count requests in flight
        return _placed(model, warm[0], "model loaded, the only online node holding it", skipped)
    busy = await _inflight_counts(warm or open_nodes)
    if warm:  # the hot path: no fit or file look-ups
        node = min(warm, key=lambda node: (busy[node.name], node.name))
        return _placed(model, node, f"model loaded, {busy[node.name]} in flight", skipped)

    # Not where it failed to load (until its file changes or the mark is cleared); 503 when that is everywhere.
    failed = await model_load_failures(model_id=model.id, node_ids=[node.pk for node in open_nodes])
    if failed:
        reasons = {node.name: failed[node.pk] for node in open_nodes if node.pk in failed}
        open_nodes = [node for node in open_nodes if node.pk not in failed]
        if not open_nodes:
            raise model_load_failed(model.id, reasons)
        skipped += [f"{name} failed to load it" for name in reasons]

    # Placement ranks nodes by how well the model fits (FitLevel.rank); too_tight ones only when nothing else can take it.
    fits = await sync_to_async(fit_levels)(model=model, nodes=open_nodes)
    candidates = [node for node in open_nodes if fits[node.pk] != FitLevel.TOO_TIGHT or model.id in node.loaded_models]
    skipped += [f"{node.name} too_tight" for node in open_nodes if node not in candidates]
    if not candidates:
        candidates = open_nodes
        skipped.append("every node too_tight: trying anyway")
    if any(node.status == NodeStatus.ONLINE for node in candidates):
        candidates = [node for node in candidates if node.status == NodeStatus.ONLINE]
    else:
        skipped.append("no online node: using a degraded one")
    copies = {node_id async for node_id in ModelCopy.objects.filter(
        model_id=model.id, node_id__in=[node.pk for node in candidates]).values_list("node_id", flat=True)}

    def rank(node: Node) -> tuple:
        level = fits[node.pk]
        return (model.id not in node.loaded_models, level is None, node.pk not in copies, busy[node.name],
                -FitLevel(level).rank if level is not None else 0, node.name)

    node = min(candidates, key=rank)
    if model.id in node.loaded_models:
        reason = f"model loaded, {busy[node.name]} in flight"
    else:
        reason = (f"fit {fits[node.pk] or 'unknown'}, file {'on node' if node.pk in copies else 'not on node'}, "
                  f"{busy[node.name]} in flight")
    return _placed(model, node, reason, skipped)


async def _inflight_counts(nodes: list[Node]) -> dict[str, int]:
    """How many requests each node has in flight (one round trip for all)."""
    pipe = redis_client().pipeline(transaction=False)
    for node in nodes:
        pipe.zcount(_inflight_key(node.name), _inflight_horizon(), "+inf")
    return {node.name: count for node, count in zip(nodes, await pipe.execute())}


def _placed(model: RegisteredModel, node: Node, reason: str, skipped: list[str]) -> Placement:
    if skipped:
        reason = f"{reason}; {'; '.join(skipped)}"
    logger.info("placement: %s on %s: %s", model.id, node.name, reason)
    return Placement(node, reason[:255])


async def request_send(*, message: InferenceRequest, node: Node) -> str | None:
    """Queue the request on the node; returns the node's worker incarnation at this moment, if one runs.

    The message expires with the queue timeout: once the gateway has given up waiting, no worker
    (a restarted one, or one that gets a message back from a dead one) runs it. Its task id is the
    request id, so the worker's log names the request.

    The Celery message is sent on the event loop's own thread, without retries: one LPUSH to a local
    Redis takes well under a millisecond, while handing it to a thread costs more than that under a
    burst (every hop waits for the GIL behind the other requests' work). A Redis that refuses it fails
    the request at once (503), as the stream it would be answered on is in that Redis too. The
    bookkeeping round trip (the node's in-flight set, its incarnation) follows the send, so it
    overlaps the message's way to the worker instead of delaying it.
    """
    request_id = message.request_id
    celery_app.send_task(protocol.TASK_INFERENCE_RUN, queue=node.queue, task_id=request_id, kwargs=message.to_wire(),
                         expires=settings.LLMP_QUEUE_TIMEOUT, retry=False)
    track = redis_client().pipeline(transaction=False)
    track.zadd(_inflight_key(node.name), {request_id: time.time()})
    track.zremrangebyscore(_inflight_key(node.name), "-inf", _inflight_horizon())
    track.get(protocol.node_incarnation_key(settings.LLMP_REDIS_PREFIX, node.name))
    tracked = await track.execute()
    return tracked[-1].decode() if tracked[-1] else None


async def request_release(*, request_id: str, node: Node, cancel: bool) -> None:
    """The gateway is done with a request: free the node's slot, and stop the worker if asked."""
    if cancel:
        logger.info("request %s ended before its answer was complete; cancelling it on %s", request_id, node.name)
    try:
        # One transaction, so the worker cannot see the cancel flag before the stream is gone
        # and its "cancelled" record lands in a fresh stream instead of being deleted with it.
        pipe = redis_client().pipeline(transaction=True)
        pipe.zrem(_inflight_key(node.name), request_id)
        if cancel:
            pipe.set(protocol.cancel_key(settings.LLMP_REDIS_PREFIX, request_id), 1,
                     ex=protocol.STREAM_TTL_SECONDS)
        pipe.delete(protocol.stream_key(settings.LLMP_REDIS_PREFIX, request_id))
        await pipe.execute()
    except Exception:
        logger.exception("could not release request %s on %s", request_id, node.name)
        raise


async def request_events(request_id: str, node_name: str, incarnation: str | None = None
                         ) -> AsyncIterator[tuple[str, dict]]:
    """Every event of a request in order, one at a time (``request_event_batches``)."""
    async with aclosing(request_event_batches(request_id, node_name, incarnation)) as batches:
        async for events in batches:
            for event in events:
                yield event


async def request_event_batches(request_id: str, node_name: str, incarnation: str | None = None
                                ) -> AsyncIterator[list[tuple[str, dict]]]:
    """Every event of a request in order, from the first, ending with its final one, in the batches they
    arrive in (what one read of its stream returned); raises OpenAIError.

    Three waits, each with its own limit: for a worker to pick the request up
    (LLMP_QUEUE_TIMEOUT), for its first output once picked up, which covers waiting for a
    free slot, loading the model and reading the prompt (LLMP_FIRST_TOKEN_TIMEOUT), and
    between two outputs after that (LLMP_STREAM_IDLE_TIMEOUT). If the worker process waited on
    dies meanwhile (``incarnation``, the node's at dispatch, then the one that started the
    request), the request fails with worker_lost within seconds instead of waiting out the
    limit; with no incarnation to watch, the node's heartbeat decides.
    """
    reader = stream_reader()
    sub = reader.subscribe(protocol.stream_key(settings.LLMP_REDIS_PREFIX, request_id), node=node_name,
                           incarnation=incarnation)
    phase, limit = "queued", settings.LLMP_QUEUE_TIMEOUT
    try:
        while True:
            try:
                async with asyncio.timeout(limit):
                    events = await sub.next_events()
            except TimeoutError:
                if phase == "queued":
                    raise no_worker(f"No worker picked the request up within {limit:g}s; node {node_name} "
                                    "may be overloaded.") from None
                raise OpenAIError(503, f"Node {node_name} produced nothing for {limit:g}s.", code="worker_timeout",
                                  type="server_error") from None
            for index, (event, _) in enumerate(events):
                if event == protocol.EVENT_START:
                    phase, limit = "started", settings.LLMP_FIRST_TOKEN_TIMEOUT
                else:
                    phase, limit = "streaming", settings.LLMP_STREAM_IDLE_TIMEOUT
                if event in FINAL_EVENTS:
                    yield events[:index + 1]
                    return
            yield events
    finally:
        reader.unsubscribe(sub)
