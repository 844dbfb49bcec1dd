"""The one place /v1 errors get OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from django.http import JsonResponse

from llmplatform.errors import BROKER_UNAVAILABLE


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status)
        if self.status == 401:
            response["WWW-Authenticate"] = "Bearer"
        return response

    @classmethod
    def from_event(cls, data: dict) -> OpenAIError:
        """An error the worker reported on the request stream."""
        return cls(data.get("status", 500), data.get("message", "the worker failed"), code=data.get("code"),
                   param=data.get("param"), type=data.get("type", "server_error"))


def invalid_api_key(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key")


def invalid_value(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, code="invalid_value", param=param)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' does not exist or you do not have access to it.",
                       code="model_not_found", param="model")


def no_worker(message: str) -> OpenAIError:
    return OpenAIError(503, message, code="no_worker_available", type="server_error")


def model_load_failed(model: str, reasons: dict[str, str]) -> OpenAIError:
    """The model failed to load on every node that could serve it (``reasons``: node name -> why)."""
    where = "; ".join(f"on node {node}: {reason}" for node, reason in sorted(reasons.items()))
    return OpenAIError(503, f"The model '{model}' cannot be served right now: it failed to load {where}. A node tries "
                       "it again once its file changes, or once an operator clears the mark (POST "
                       f"/api/v1/registry/{model}/clear-load-failures/).", code="model_unavailable", type="server_error")


def worker_lost(message: str) -> OpenAIError:
    return OpenAIError(503, message, code="worker_lost", type="server_error")


def broker_unavailable() -> OpenAIError:
    """Redis does not answer (and only that: a busy gateway waits for a connection instead)."""
    return OpenAIError(503, BROKER_UNAVAILABLE, code="broker_unavailable", type="server_error")
