"""The local LLM API's ``POST /api/v1/generate``: one answer from a registered model, through the /v1
inference service (``apps.gateway.inference``). The rest of that API (health, models, cache) is
``apps.models.api.local``; errors are ``{"error": "..."}`` there and here.
"""

from __future__ import annotations

import time

from asgiref.sync import async_to_sync
from django.conf import settings
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework.exceptions import ParseError
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.gateway.errors import OpenAIError
from apps.gateway.inference import generate_answer
from apps.models.selectors import model_get_by_name
from llmplatform.api_errors import ApiErrorSerializer as ApiError
from llmplatform.api_input import JSONParser
from llmplatform.errors import ApplicationError
from llmplatform.permissions import access


def _error(message: str, code: int, **extra) -> Response:
    return Response({**extra, "error": message}, status=code)


def _int_field(body: dict, name: str, default: int, minimum: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApplicationError(f"{name} must be an integer of at least {minimum}")
    return value


class GenerateView(APIView):
    permission_classes = access("local-generate")
    parser_classes = [JSONParser]

    @extend_schema(summary="Generate a response (local LLM API)", request={"application/json": {
        "type": "object", "required": ["question", "model_name"], "properties": {
            "question": {"type": "string"}, "model_name": {"type": "string"}, "template": {"type": "string"},
            "n_gpu_layers": {"type": "integer"}, "n_batch": {"type": "integer"}, "temperature": {"type": "number"},
            "max_tokens": {"type": "integer"}}}}, examples=[OpenApiExample("A short answer", request_only=True, value={
                "question": "What is the capital of France?", "model_name": "smollm2-135m-instruct", "max_tokens": 8})],
        responses={200: dict, 404: ApiError, 500: ApiError, 503: ApiError})
    def post(self, request):
        try:
            body = request.data
        except ParseError:
            return _error("Request body is required", 400)
        if not isinstance(body, dict) or not body:
            return _error("Request body is required", 400)
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            return _error("Question is required", 400)
        model_name = body.get("model_name")
        if not isinstance(model_name, str) or not model_name.strip():
            return _error("Model name is required", 400)
        model = model_get_by_name(name=model_name.strip())
        if model is None or not model.is_active:
            return _error("Model not found", 404)
        temperature = body.get("temperature", settings.LLMP_GENERATE_TEMPERATURE)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            return _error("temperature must be a number from 0 to 2", 400)
        # Accepted for compatibility: a node loads a model once with its own offload and batch settings.
        _int_field(body, "n_gpu_layers", 40, -1)
        _int_field(body, "n_batch", 512, 1)
        max_tokens = _int_field(body, "max_tokens", settings.LLMP_DEFAULT_MAX_TOKENS, 1)
        template = body.get("template")
        if template is not None and not isinstance(template, str):
            return _error("template must be a string", 400)
        if template and "{question}" in template:
            request_body = {"prompt": template.replace("{question}", question)}
        else:
            messages = [{"role": "system", "content": template}] if template else []
            request_body = {"messages": messages + [{"role": "user", "content": question}]}
        request_body.update(temperature=temperature, max_tokens=max_tokens)
        started = time.perf_counter()
        api_key = request.auth if hasattr(request.auth, "prefix") else None
        try:
            answer = async_to_sync(generate_answer)(model=model, body=request_body, path=request.path, api_key=api_key,
                                                    user_id=request.user.pk if request.user.is_authenticated else None)
        except OpenAIError as exc:
            # The client's mistakes keep their 4xx; the platform's failures are 503 (retry later) or 500.
            code = exc.status if exc.status < 500 or exc.status == 503 else 500
            return _error(f"Failed to generate response: {exc.message}", code, success=False)
        response = Response({
            "success": True, "response": answer.text, "model_used": model.file_name or model.id,
            "processing_time": round(time.perf_counter() - started, 3), "token_count": answer.completion_tokens,
        })
        response["X-Request-Id"] = answer.request_id
        return response
