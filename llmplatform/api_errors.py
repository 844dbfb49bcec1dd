"""The one place management-API errors get their shape: ``{"error": "...", "detail": ...}``.

Besides DRF's own exceptions, the application errors a view lets through become HTTP here: every
``llmplatform.errors.ApplicationError``, with its status and body, and Redis not answering (a 503).
Paths under /api/ that match no view get the same shape from ``not_found``.
"""

from __future__ import annotations

import logging

from django.http import JsonResponse
from django.views import defaults
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

from llmplatform.errors import BROKER_ERRORS, ApplicationError, BrokerUnavailable

logger = logging.getLogger(__name__)


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            message = _first_message(value)
            return message if key in ("detail", "non_field_errors") else f"{key}: {message}"
        return "invalid request"
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else "invalid request"
    return str(detail)


def _application_error(exc: Exception, context) -> Response | None:
    if isinstance(exc, BROKER_ERRORS):
        logger.error("%s %s: Redis failed: %s", context["request"].method, context["request"].path, exc)
        exc = BrokerUnavailable()
    if not isinstance(exc, ApplicationError):
        return None
    set_rollback()
    return Response(exc.body(), status=exc.status)


def management_exception_handler(exc, context):
    response = exception_handler(exc, context)
    if response is None:
        return _application_error(exc, context)
    detail = response.data
    body = {"error": _first_message(detail)}
    if isinstance(detail, dict) and set(detail) - {"detail"}:
        body["detail"] = detail
    response.data = body
    return response


def not_found(request, exception):
    """The site's 404 page: ``{"error": ...}`` under /api/, Django's own page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"error": f"Not found: {request.method} {request.path}"}, status=404)
    return defaults.page_not_found(request, exception)


class ApiErrorSerializer(serializers.Serializer):
    """The management API's error body, for the OpenAPI schema (``llmplatform.api_schema``)."""

    error = serializers.CharField(help_text="What went wrong, in one sentence.")
    detail = serializers.JSONField(required=False, help_text="The messages per field of a refused body or query.")
    code = serializers.CharField(required=False, help_text="A machine-readable name, e.g. broker_unavailable.")
