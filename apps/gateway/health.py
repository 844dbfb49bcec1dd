"""Liveness (the process answers) and readiness (database, Redis and a live, healthy worker answer)."""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, JsonResponse

from apps.nodes.selectors import node_list_live, node_list_unhealthy
from llmplatform.aioredis import redis_client


async def liveness(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _database_ok() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def readiness(request: HttpRequest) -> JsonResponse:
    from asgiref.sync import sync_to_async

    checks: dict[str, dict] = {}
    try:
        await sync_to_async(_database_ok)()
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": str(exc)}
    try:
        await redis_client().ping()
        checks["redis"] = {"ok": True}
    except Exception as exc:
        checks["redis"] = {"ok": False, "error": str(exc)}
    try:
        nodes = [node.name async for node in node_list_live()]
        unhealthy = {node.name: node.health_error async for node in node_list_unhealthy()}
        checks["workers"] = {"ok": bool(nodes), "live_nodes": nodes, "unhealthy_nodes": unhealthy}
        if not nodes:
            checks["workers"]["error"] = "no live worker node" + (
                f" (unhealthy, failed their start-up test decode: {', '.join(sorted(unhealthy))})" if unhealthy else "")
    except Exception as exc:
        checks["workers"] = {"ok": False, "error": str(exc)}
    ready = all(check["ok"] for check in checks.values())
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)
