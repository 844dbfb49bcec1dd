"""An API key for the job-events WebSocket: as a header, a subprotocol or ?api_key=, and never in a log."""

from __future__ import annotations

import json
import logging
import uuid

from django.contrib.auth import get_user_model
from websockets.sync.client import connect

from apps.gateway.services import api_key_create
from llmplatform.logredact import RedactSecrets


def _key(name: str) -> str:
    user = get_user_model().objects.create_user(f"{name}-{uuid.uuid4().hex[:6]}")
    return api_key_create(name=name, user=user)[1]


def _url(platform, query: str) -> str:
    return platform.base_url.replace("http://", "ws://") + f"/ws/jobs/?{query}"


def test_a_browser_can_send_its_key_as_a_subprotocol_and_gets_llmp_back(platform):
    key = _key("ws-subprotocol")
    with connect(_url(platform, "job=*"), subprotocols=["llmp", f"bearer.{key}"]) as ws:
        assert ws.subprotocol == "llmp"  # the key itself is never echoed
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"


def test_a_key_in_the_query_works_but_never_reaches_the_server_log(platform):
    key = _key("ws-query")
    with connect(_url(platform, f"api_key={key}&job=*")) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
    log = platform.server.log()
    assert key not in log
    assert "api_key=[redacted]" in log  # the line is written, without the key


def test_the_filter_redacts_keys_and_tokens_in_any_logged_url():
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", "/ws/jobs/?job=*&api_key=sk-secret123&x=1"), None)
    RedactSecrets().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "WebSocket /ws/jobs/?job=*&api_key=[redacted]&x=1" [accepted]'
    pull = logging.LogRecord("httpx", logging.INFO, __file__, 1, "HTTP Request: GET %s", (
        "http://server/api/v1/blobs/m?token=abc.def",), None)
    RedactSecrets().filter(pull)
    assert "abc.def" not in pull.getMessage() and "token=[redacted]" in pull.getMessage()
