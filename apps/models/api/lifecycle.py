"""Getting models onto the fleet: Hugging Face search/files/register, convert, quantize (each a job),
a node's model cache, and the blob endpoint nodes pull model files from."""

from __future__ import annotations

import re

from asgiref.sync import async_to_sync
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.jobs.serializers import JobSerializer
from apps.models.selectors import hub_file_list, hub_model_search, model_copy_list, model_get_file_backed
from apps.models.services import (
    CONVERT_OUTTYPES,
    GGUF_SUFFIX,
    ModelError,
    blob_token_check,
    model_convert_start,
    model_copy_delete,
    model_download_start,
    model_path,
    model_quantize_start,
)
from apps.nodes.selectors import node_get
from apps.nodes.services import node_models_unload
from llmplatform.api_errors import ApiErrorSerializer as ApiError
from llmplatform.authentication import request_user
from llmplatform.permissions import access, access_refusal


def _error(message: str, code: int) -> Response:
    return Response({"error": message}, status=code)


class HubSearchView(APIView):
    permission_classes = access("hf-search")

    @extend_schema(summary="Search Hugging Face models", parameters=[
        OpenApiParameter("q", str, required=True), OpenApiParameter("limit", int)], responses={200: dict, 502: ApiError})
    def get(self, request):
        query = request.query_params.get("q", "").strip()
        if not query:
            return _error("q is required", 400)
        try:
            limit = min(100, max(1, int(request.query_params.get("limit", 20))))
        except ValueError:
            return _error("limit must be an integer", 400)
        return Response({"models": hub_model_search(query=query, limit=limit)})


class HubFilesView(APIView):
    permission_classes = access("hf-files")

    @extend_schema(summary="A Hugging Face repo's files, to pick a GGUF quant", parameters=[
        OpenApiParameter("repo", str, required=True), OpenApiParameter("revision", str)],
        responses={200: dict, 404: ApiError, 502: ApiError})
    def get(self, request):
        repo = request.query_params.get("repo", "").strip()
        if not repo:
            return _error("repo is required", 400)
        files = hub_file_list(repo_id=repo, revision=request.query_params.get("revision") or None)
        return Response({"repo": repo, "files": files, "gguf_files": [f for f in files if f.get("is_gguf")]})


class HubRegisterSerializer(serializers.Serializer):
    repo_id = serializers.CharField(max_length=255)
    filename = serializers.CharField(max_length=255)
    revision = serializers.CharField(max_length=64, required=False, allow_blank=True)
    name = serializers.CharField(max_length=128, required=False, help_text="Model id; default: the file name without .gguf")
    node = serializers.CharField(max_length=128, required=False, help_text="Node to run the job on; default: least busy")


class ConvertSerializer(serializers.Serializer):
    repo_id = serializers.CharField(max_length=255, required=False, help_text="A Hugging Face safetensors checkpoint")
    source_dir = serializers.CharField(max_length=500, required=False,
                                       help_text="Or a checkpoint directory under LLMP_CHECKPOINTS_DIR on the node")
    revision = serializers.CharField(max_length=64, required=False, allow_blank=True)
    outtype = serializers.ChoiceField(choices=CONVERT_OUTTYPES, default="f16")
    quantize = serializers.CharField(max_length=16, required=False, allow_blank=True,
                                     help_text="Then quantize to this type (Q4_K_M, Q5_K_M, Q8_0, ...)")
    name = serializers.CharField(max_length=128)
    node = serializers.CharField(max_length=128, required=False)


class QuantizeSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=128, help_text="Id of a registered GGUF model")
    qtype = serializers.CharField(max_length=16)
    name = serializers.CharField(max_length=128, required=False, help_text="Default: <model>-<qtype>")
    node = serializers.CharField(max_length=128, required=False)


def _start(serializer_class, request, start) -> Response:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    job = start(serializer.validated_data, request.user)
    return Response(JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class HubRegisterView(APIView):
    permission_classes = access("hf-register")

    @extend_schema(summary="Register a GGUF file of a Hugging Face repo: starts a download job",
                   examples=[OpenApiExample("A GGUF file", request_only=True, value={
                       "repo_id": "bartowski/SmolLM2-135M-Instruct-GGUF",
                       "filename": "SmolLM2-135M-Instruct-Q4_K_M.gguf"})],
                   request=HubRegisterSerializer,
                   responses={202: JobSerializer, 404: ApiError, 409: ApiError, 503: ApiError})
    def post(self, request):
        return _start(HubRegisterSerializer, request, lambda data, user: model_download_start(**data, user=user))


class ConvertView(APIView):
    permission_classes = access("convert")

    @extend_schema(summary="Convert a Hugging Face checkpoint to GGUF (and optionally quantize it): starts a job",
                   examples=[OpenApiExample("A checkpoint, quantized", request_only=True, value={
                       "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "outtype": "f16", "quantize": "Q4_K_M",
                       "name": "smollm2-135m-q4"})],
                   request=ConvertSerializer, responses={202: JobSerializer, 404: ApiError, 409: ApiError, 503: ApiError})
    def post(self, request):
        return _start(ConvertSerializer, request, lambda data, user: model_convert_start(**data, user=user))


class QuantizeView(APIView):
    permission_classes = access("quantize")

    @extend_schema(summary="Quantize a registered model: starts a job", request=QuantizeSerializer,
                   examples=[OpenApiExample("The bundled model, to Q8_0", request_only=True,
                                            value={"model": "smollm2-135m-instruct", "qtype": "Q8_0"})],
                   responses={202: JobSerializer, 404: ApiError, 409: ApiError, 503: ApiError})
    def post(self, request):
        return _start(QuantizeSerializer, request, lambda data, user: model_quantize_start(
            source_model=data["model"], qtype=data["qtype"], name=data.get("name"), node=data.get("node"), user=user))


class NodeCacheView(APIView):
    permission_classes = access("node-cache")

    @extend_schema(summary="Models a node holds on disk (with when and why one failed to load there) and has loaded "
                           "in memory", responses={200: dict})
    def get(self, request, node: str):
        found = node_get(ref=node)
        if found is None:
            return _error(f"Node {node!r} not found", 404)
        held = [{"model": copy.model_id, "size_bytes": copy.size_bytes, "since": copy.created_at,
                 "load_failed_at": copy.load_failed_at, "load_error": copy.load_error}
                for copy in model_copy_list(node=found)]
        return Response({"node": found.name, "held": held, "loaded": list(found.loaded_models)})


class NodeCacheUnloadView(APIView):
    permission_classes = access("node-cache-unload")

    @extend_schema(summary="Unload models from a node's memory (all when 'models' is absent)",
                   request={"application/json": {"type": "object", "properties": {
                       "models": {"type": "array", "items": {"type": "string"}}}}}, responses={202: dict, 503: ApiError})
    def post(self, request, node: str):
        found = node_get(ref=node)
        if found is None:
            return _error(f"Node {node!r} not found", 404)
        if not isinstance(request.data, dict):  # a list or a bare value is a mistake, never "unload everything"
            return _error('The body must be a JSON object such as {"models": ["model-id"]}, or empty to unload '
                          "every model", 400)
        models = request.data.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            return _error("models must be a list of model ids", 400)
        node_models_unload(node=found, model_ids=models)
        return Response({"message": "Unload requested", "node": found.name, "models": models}, status=202)


class NodeCacheDeleteView(APIView):
    permission_classes = access("node-cache-delete")

    @extend_schema(summary="Delete a node's copy of a model (a node with its own cache, not the server's store)",
                   responses={202: dict, 400: ApiError, 503: ApiError})
    def delete(self, request, node: str, model: str):
        found = node_get(ref=node)
        if found is None:
            return _error(f"Node {node!r} not found", 404)
        model_copy_delete(node=found, model_id=model)  # ModelError: 404 no copy, 400 the server's store
        return Response({"message": "Delete requested", "node": found.name, "model": model}, status=202)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def model_blob(request: HttpRequest, model_id: str) -> HttpResponse:
    """A model's file, with HTTP Range so a node's interrupted pull resumes. Auth: ``?token=`` from
    ``blob_token`` (what nodes use), or the API key or session of staff or of the model's owner."""
    token = request.GET.get("token", "")
    user = None
    if token:
        try:
            blob_token_check(token=token, model_id=model_id)
        except ModelError as exc:
            return JsonResponse(exc.body(), status=exc.status)
    elif (user := async_to_sync(request_user)(request)) is None:
        return JsonResponse({"error": "Authentication credentials were not provided."}, status=401)
    model = model_get_file_backed(model_id=model_id)
    if model is None:
        return JsonResponse({"error": f"Model {model_id!r} not found"}, status=404)
    if not token and (refusal := access_refusal(view="model-blob", action="get", user=user, obj=model)):
        return JsonResponse({"error": refusal}, status=403)
    path = model_path(model)
    if not path.is_file():
        return JsonResponse({"error": f"The file of {model_id!r} is missing on the server"}, status=404)
    size = path.stat().st_size
    headers = {"Accept-Ranges": "bytes", "X-Model-Sha256": model.sha256, "ETag": f'"{model.sha256 or size}"'}
    spec = request.headers.get("Range", "")
    handle = open(path, "rb")
    if not spec:
        response = FileResponse(handle, content_type="application/octet-stream",
                                filename=model.file_name or f"{model_id}{GGUF_SUFFIX}")
        for key, value in headers.items():
            response[key] = value
        return response
    match = _RANGE.match(spec.strip())
    start, end = _range_bounds(match, size) if match else (None, None)
    if start is None:
        handle.close()
        response = JsonResponse({"error": f"Unsatisfiable range {spec!r} for {size} bytes"}, status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    handle.seek(start)
    response = FileResponse(_limited(handle, end - start + 1), status=206, content_type="application/octet-stream")
    response["Content-Range"] = f"bytes {start}-{end}/{size}"
    response["Content-Length"] = str(end - start + 1)
    for key, value in headers.items():
        response[key] = value
    return response


def _range_bounds(match, size: int) -> tuple[int | None, int | None]:
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None, None
    if not first:  # the last N bytes
        length = int(last)
        return (max(0, size - length), size - 1) if length and size else (None, None)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None, None
    return start, end


def _limited(handle, length: int, chunk_size: int = 1 << 20):
    try:
        while length > 0:
            chunk = handle.read(min(chunk_size, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk
    finally:
        handle.close()
