"""The one place management-API errors get their shape: ``{"error": "...", "detail": ...}``.

Besides DRF's own exceptions, the application errors a view may let through become HTTP here:
the model registry's ``ModelError`` (its ``status``) and the Hugging Face client's ``HfError``.
"""

from __future__ import annotations

from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

from apps.models.services import ModelError


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            message = _first_message(value)
            return message if key in ("detail", "non_field_errors") else f"{key}: {message}"
        return "invalid request"
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else "invalid request"
    return str(detail)


def _hub_status(exc: Exception) -> int | None:
    """The status for an error of the Hugging Face Hub; None if ``exc`` is not one."""
    from workers import hf  # not at import: huggingface_hub is heavy and most processes never need it

    if not isinstance(exc, hf.HfError):
        return None
    if isinstance(exc, (hf.HfRepoNotFound, hf.HfRevisionNotFound, hf.HfFileNotFound)):
        return 404
    if isinstance(exc, hf.HfAccessDenied):
        return 403
    return 502


def _application_error(exc: Exception) -> Response | None:
    status = exc.status if isinstance(exc, ModelError) else _hub_status(exc)
    if status is None:
        return None
    set_rollback()
    return Response({"error": str(exc)}, status=status)


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
