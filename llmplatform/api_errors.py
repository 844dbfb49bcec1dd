"""The one place management-API errors get their shape: ``{"error": "...", "detail": ...}``.

Besides DRF's own exceptions, the application errors a view lets through become HTTP here: every
``llmplatform.errors.ApplicationError``, with its status and body.
"""

from __future__ import annotations

from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

from llmplatform.errors import ApplicationError


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            message = _first_message(value)
            return message if key in ("detail", "non_field_errors") else f"{key}: {message}"
        return "invalid request"
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else "invalid request"
    return str(detail)


def _application_error(exc: Exception) -> Response | None:
    if not isinstance(exc, ApplicationError):
        return None
    set_rollback()
    return Response(exc.body(), status=exc.status)


def management_exception_handler(exc, context):
    response = exception_handler(exc, context)
    if response is None:
        return _application_error(exc)
    detail = response.data
    body = {"error": _first_message(detail)}
    if isinstance(detail, dict) and set(detail) - {"detail"}:
        body["detail"] = detail
    response.data = body
    return response
