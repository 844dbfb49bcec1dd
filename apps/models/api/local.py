"""The local LLM API (same paths, fields and status codes as that design), on the platform's registry.

``/api/v1/health``, ``/api/v1/models`` (GET list, POST upload or external registration),
``/api/v1/models/{name}`` (DELETE), ``/api/v1/models/sync``, ``/api/v1/cache/clear`` and
``/api/v1/cache/status``; its ``/api/v1/generate`` is the gateway's (``apps.gateway.api.local``).
They need an API key (or a session) like the rest of the management API; errors are
``{"error": "..."}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework.exceptions import ParseError
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.models.models import RegisteredModel
from apps.models.selectors import model_file_names, model_get_by_name, model_list_active
from apps.models.services import (
    FILE_FIELD,
    GGUFUploadHandler,
    model_delete,
    model_path,
    model_register_external,
    model_register_upload,
    model_store_sync,
    model_unload_everywhere,
)
from apps.nodes.selectors import node_list_live
from llmplatform.api_errors import ApiErrorSerializer as ApiError
from llmplatform.api_input import JSONParser
from llmplatform.permissions import access

logger = logging.getLogger(__name__)

SERVICE_NAME = "Local LLM API"
SERVICE_VERSION = "1.0.0"


def _error(message: str, code: int, **extra) -> Response:
    return Response({**extra, "error": message}, status=code)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _display_path(path: Path) -> str:
    try:
        return "./" + str(path.relative_to(settings.BASE_DIR))
    except ValueError:
        return str(path)


def model_info(model: RegisteredModel) -> dict:
    """A model as the local LLM API lists it (name, path, size, modified), plus the registry's facts."""
    info = {"name": model.file_name or model.id, "id": model.id, "source": model.source}
    if model.is_external:
        info.update(path=None, size=None, modified=model.updated_at.isoformat().replace("+00:00", "Z"))
        return info
    path = model_path(model)
    info.update(
        path=_display_path(path), size=human_size(model.size_bytes), size_bytes=model.size_bytes,
        modified=model.updated_at.isoformat().replace("+00:00", "Z"), architecture=model.architecture,
        parameter_count=model.parameter_count, context_length=model.context_length, file_type=model.file_type,
        sha256=model.sha256,
    )
    return info


def _models_listing() -> dict:
    models = [model_info(model) for model in model_list_active()]
    return {"models": models, "count": len(models)}


class HealthView(APIView):
    permission_classes = access("local-health")

    @extend_schema(summary="Whether the API is up (local LLM API)", responses={200: dict})
    def get(self, request):
        return Response({"status": "healthy", "service": SERVICE_NAME, "version": SERVICE_VERSION})


class ModelsView(APIView):
    permission_classes = access("local-models")
    parser_classes = [MultiPartParser, JSONParser]

    def initialize_request(self, request, *args, **kwargs):
        # The GGUF handler streams the upload to disk; it must be in place before anything reads the body,
        # and a session's CSRF check reads it during authentication, before the view runs.
        if request.method == "POST" and request.content_type.startswith("multipart/form-data"):
            request.upload_handlers = [GGUFUploadHandler(request)]
        return super().initialize_request(request, *args, **kwargs)

    @extend_schema(summary="List models (local LLM API)", responses={200: dict})
    def get(self, request):
        try:
            return Response(_models_listing())
        except Exception as exc:
            logger.exception("listing models failed")
            return _error(f"Failed to list models: {exc}", 500)

    @extend_schema(summary="Upload a .gguf model (multipart field 'file'), or register an external API model (JSON)",
                   request={"multipart/form-data": {"type": "object", "properties": {
                       FILE_FIELD: {"type": "string", "format": "binary"}}},
                       "application/json": {"type": "object", "properties": {
                           "name": {"type": "string"}, "api_key": {"type": "string"},
                           "endpoint": {"type": "string"}, "upstream_model": {"type": "string"}}}},
                   examples=[OpenApiExample("An external API model", request_only=True, media_type="application/json",
                                            value={"name": "example-api-model", "endpoint": "https://api.example.com/v1",
                                                   "api_key": "sk-example", "upstream_model": "gpt-4o-mini"})],
                   responses={200: dict, 409: ApiError, 413: ApiError})
    def post(self, request):
        if request.content_type.startswith("application/json"):
            return self._register_external(request)
        if not request.content_type.startswith("multipart/form-data"):
            return _error("No file part in the request", 400)
        try:
            received = request.FILES.get(FILE_FIELD)
        except ParseError as exc:
            return _error(f"Malformed multipart body: {exc.detail}", 400)
        if received is None:
            return _error("No file part in the request", 400)
        try:
            return self._register_upload(request, received)
        finally:
            received.discard()

    def _register_upload(self, request, received) -> Response:
        model = model_register_upload(received=received,  # ModelError: 400, ModelConflict: 409
                                      created_by=request.user if request.user.is_authenticated else None)
        return Response({"message": "File uploaded successfully", "filename": received.name,
                         "model_info": model_info(model)})

    def _register_external(self, request) -> Response:
        body = request.data if isinstance(request.data, dict) else {}
        name = str(body.get("name") or "").strip()
        endpoint = str(body.get("endpoint") or "").strip()
        if not name:
            return _error("Model name is required", 400)
        if not endpoint:
            return _error("Endpoint is required for an external API model", 400)
        model = model_register_external(name=name, base_url=endpoint, api_key=str(body.get("api_key") or ""),
                                        upstream_model=body.get("upstream_model") or None,
                                        created_by=request.user if request.user.is_authenticated else None)
        return Response({"message": "External model registered successfully", "filename": model.id,
                         "model_info": model_info(model)})


class ModelDeleteView(APIView):
    permission_classes = access("local-model-delete")

    @extend_schema(summary="Delete a model (appends .gguf when missing)",
                   responses={200: dict, 400: ApiError, 503: ApiError})
    def delete(self, request, name: str):
        model = model_get_by_name(name=name)
        if model is None:
            return _error("Model not found", 404)
        self.check_object_permissions(request, model)
        filename = model.file_name or model.id
        model_delete(model=model)  # ModelError 400 for the bundled model; 503 when Redis does not answer
        return Response({"message": "Model deleted successfully", "filename": filename,
                         "remaining_models": model_list_active().count()})


class ModelsSyncView(APIView):
    permission_classes = access("local-models-sync")

    @extend_schema(summary="Synchronise the models list with the models directory", request=None,
                   responses={200: dict})
    def post(self, request):
        try:
            changes = model_store_sync()
        except Exception as exc:
            logger.exception("sync failed")
            return _error(f"Failed to sync models: {exc}", 500)
        return Response({"message": "Models list synchronized successfully", "data": _models_listing(), **changes})


class CacheClearView(APIView):
    permission_classes = access("local-cache-clear")

    @extend_schema(summary="Unload every model from every live node's memory", request=None,
                   responses={200: dict, 503: ApiError})
    def post(self, request):
        nodes = model_unload_everywhere(model_ids=None)  # 503 when Redis does not answer
        return Response({"message": "Cache cleared successfully", "nodes": nodes})


class CacheStatusView(APIView):
    permission_classes = access("local-cache-status")

    @extend_schema(summary="Models loaded in memory, across live nodes", responses={200: dict})
    def get(self, request):
        try:
            by_node = {node.name: list(node.loaded_models) for node in list(node_list_live())}
            ids = sorted({model_id for loaded in by_node.values() for model_id in loaded})
            names = model_file_names(model_ids=ids)
            cached = [names.get(model_id, model_id) for model_id in ids]
        except Exception as exc:
            logger.exception("cache status failed")
            return _error(f"Failed to get cache status: {exc}", 500)
        return Response({"cached_models": cached, "count": len(cached), "nodes": by_node})
