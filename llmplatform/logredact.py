"""Secrets never reach a log line: API keys and blob tokens in URLs are redacted.

Browsers pass an API key to ``/ws/jobs/`` as ``?api_key=`` and nodes pull model files with
``?token=``; uvicorn writes the path with its query into its log (WebSocket lines even with the
access log off), and so may anything else that logs a URL. The filter rewrites each record's
message before any handler sees it.
"""

from __future__ import annotations

import logging
import re

_SECRET_IN_URL = re.compile(r"(?i)\b(api_key|token|access_token)=[^&\s\"'\]]+")
REDACTED = r"\1=[redacted]"
# Loggers that write request URLs: uvicorn's (its records are not Django's and do not pass the root's
# handlers' filters first) and Django's own request loggers.
_URL_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "django.request", "django.server", "daphne",
                "httpx")  # httpx: a node pulling a model file logs the blob URL, token included


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        redacted = _SECRET_IN_URL.sub(REDACTED, message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_logs() -> None:
    """Install the filter on the root logger's handlers and on every logger that writes URLs (idempotent)."""
    for logger in [logging.getLogger(name) for name in _URL_LOGGERS] + [logging.getLogger()]:
        targets = [logger, *logger.handlers]
        for target in targets:
            if not any(isinstance(f, RedactSecrets) for f in target.filters):
                target.addFilter(RedactSecrets())
