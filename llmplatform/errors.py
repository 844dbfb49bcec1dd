"""The management API's one application error: what a service raises when a request cannot be done.

Services raise an ``ApplicationError`` (or a subclass of their app) with the HTTP status that says
why; views let it through, and ``llmplatform.api_errors`` turns it into ``{"error": ...}``, the one
place that does. ``BROKER_ERRORS`` (Redis not answering) become ``BrokerUnavailable`` there, a 503.
The /v1 surface has its own error type (``apps.gateway.errors.OpenAIError``).
"""

from __future__ import annotations

from kombu.exceptions import OperationalError as CeleryBrokerError
from redis.exceptions import RedisError

# Redis does not answer: met directly (the Redis clients) or through Celery publishing a task.
BROKER_ERRORS = (RedisError, CeleryBrokerError)
BROKER_UNAVAILABLE = "The platform's message broker (Redis) is unavailable."


class ApplicationError(Exception):
    """A request that cannot be done: ``status`` (400 unless a subclass or the caller says otherwise),
    ``message``, and optionally ``code`` (a machine-readable name) and ``param`` (the request field at
    fault, reported the way a validation error of that field is)."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def body(self) -> dict:
        """The error as the management API answers it."""
        if self.param is None:
            body = {"error": self.message}
        else:
            body = {"error": f"{self.param}: {self.message}", "detail": {self.param: [self.message]}}
        if self.code is not None:
            body["code"] = self.code
        return body


class BrokerUnavailable(ApplicationError):
    """What one of ``BROKER_ERRORS`` means to a client: come back later."""

    status = 503
    code = "broker_unavailable"

    def __init__(self) -> None:
        super().__init__(BROKER_UNAVAILABLE)
