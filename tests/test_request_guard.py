"""The ASGI guard (llmplatform/request_guard.py) on real uvicorn servers, over real sockets: credentials and
body caps are checked before a body is read, a stalled body gets 408, and refused keys are rate limited
per client address, counted in Redis across gateway processes.

The servers here run without a worker: nothing below needs inference.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from apps.gateway.models import RequestLog
from apps.gateway.services import api_key_create
from llmplatform import devstack
from tests.environment import RUN

pytestmark = pytest.mark.live


def _server(log_dir: Path, **env: str) -> tuple[str, devstack.Process]:
    """A uvicorn server on the session's database, with ``env`` on top of the test environment."""
    return devstack.server_start_live(env=devstack.child_env(**env), log_dir=log_dir, what="the guarded server")


@pytest.fixture(scope="module")
def gateway(django_db_setup, tmp_path_factory):
    base_url, server = _server(tmp_path_factory.mktemp("guard"))
    yield base_url
    server.stop()


def _user(*, staff: bool = False, password: str | None = None):
    return get_user_model().objects.create_user(f"guard-{uuid.uuid4().hex[:8]}", password=password, is_staff=staff)


@pytest.fixture(scope="module")
def key(django_db_setup, django_db_blocker) -> str:
    with django_db_blocker.unblock():
        _, raw_key = api_key_create(name="guard tests", user=_user())
    return raw_key


def _exchange(base_url: str, request: bytes, *, timeout: float = 15.0) -> tuple[int, dict[str, str], bytes, float]:
    """Send ``request`` as it is, then read until the server closes the connection. Returns the status,
    headers, body and the seconds from the last byte sent to the end of the reply. Reading past the
    reply fails with a timeout if the server keeps the connection (or waits for more body)."""
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):  # answered and closed before taking it all
            pass
        sent = time.monotonic()
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:  # closed with our unread body in its buffer: the reply came first
            assert reply, "the server reset the connection without answering"
        elapsed = time.monotonic() - sent
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunked(body)
    return int(status_line.split()[1]), headers, body, elapsed


def _dechunked(data: bytes) -> bytes:
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body
        body, data = body + data[:size], data[size + 2:]


def _head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


def _openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _management_error(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error
    return error


# --- credentials before the body ------------------------------------------------------------------


def test_a_large_chunked_v1_post_without_a_key_is_refused_before_its_body_is_read(gateway):
    # The first 64 KiB chunk of what would be a 1 GiB body: the 401 comes back while the rest is unsent,
    # so the server cannot have read (or spooled) it; the view still answers, and records, the refusal.
    first_chunk = b"%x\r\n" % (64 << 10) + b"x" * (64 << 10) + b"\r\n"
    status, headers, body, _ = _exchange(gateway, _head(
        "POST", "/v1/chat/completions", "Content-Type: application/json", "Transfer-Encoding: chunked") + first_chunk)
    assert status == 401
    assert _openai_error(body)["code"] == "invalid_api_key"
    assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
    row = RequestLog.objects.filter(pk=uuid.UUID(headers["x-request-id"]))
    devstack.wait_until(row.exists, timeout=10, what="the refused request's history row")
    assert (row.get().status_code, row.get().error_code) == (401, "invalid_api_key")


@pytest.mark.parametrize("authorization", [None, "Bearer llmp-not-a-key", "Bearer "])
def test_a_large_chunked_management_post_without_good_credentials_is_refused_before_its_body_is_read(
        gateway, authorization):
    first_chunk = b"%x\r\n" % (64 << 10) + b"x" * (64 << 10) + b"\r\n"
    extra = [f"Authorization: {authorization}"] if authorization else []
    status, headers, body, _ = _exchange(gateway, _head(
        "POST", "/api/v1/keys/", "Content-Type: application/json", "Transfer-Encoding: chunked", *extra) + first_chunk)
    assert status == 401
    message = _management_error(body)
    assert ("Incorrect API key" in message) if authorization == "Bearer llmp-not-a-key" else "not provided" in message
    assert headers["connection"] == "close"


def test_a_session_cookie_that_is_not_logged_in_is_refused_before_the_body_is_read(gateway):
    status, _, body, _ = _exchange(gateway, _head(
        "POST", "/api/v1/keys/", "Content-Type: application/json", "Content-Length: 1000000",
        "Cookie: sessionid=nosuchsession0123456789abcdefgh"))
    assert status == 401 and "not provided" in _management_error(body)


def test_the_management_api_and_the_browsable_api_take_a_session_cookie(gateway):
    password = uuid.uuid4().hex
    user = _user(password=password)
    with httpx.Client(base_url=gateway, timeout=30) as browser:
        login_page = browser.get("/api-auth/login/")
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page.text).group(1)
        logged_in = browser.post("/api-auth/login/", data={"username": user.username, "password": password,
                                                           "csrfmiddlewaretoken": csrf, "next": "/api/v1/"})
        assert logged_in.status_code == 302, logged_in.text
        created = browser.post("/api/v1/keys/", json={"name": "from a session"},
                               headers={"X-CSRFToken": browser.cookies["csrftoken"]})
        assert created.status_code == 201, created.text
        assert created.json()["key"].startswith("llmp-")
        page = browser.get("/api/v1/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "<html" in page.text and user.username in page.text


def test_the_management_api_takes_a_key_with_a_body_and_without(gateway, key):
    with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        assert client.post("/api/v1/keys/", json={"name": "from a key"}).status_code == 201
        listed = client.get("/api/v1/keys/")
        assert listed.status_code == 200 and "from a key" in [row["name"] for row in listed.json()["results"]]


def test_v1_still_answers_a_good_key_and_refuses_a_bad_one_on_a_read(gateway, key):
    assert httpx.get(f"{gateway}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    refused = httpx.get(f"{gateway}/v1/models", headers={"Authorization": "Bearer llmp-wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


# --- body caps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, limit_setting", [
    ("/v1/chat/completions", "DATA_UPLOAD_MAX_MEMORY_SIZE"),
    ("/api/v1/keys/", "LLMP_API_MAX_REQUEST_BYTES"),
    ("/health", None),
])
def test_a_body_declared_over_its_routes_cap_is_a_413_before_it_is_read(gateway, key, path, limit_setting):
    declared = getattr(settings, limit_setting) + 1 if limit_setting else 64 * 1024 + 1
    status, headers, body, _ = _exchange(gateway, _head(
        "POST", path, f"Authorization: Bearer {key}", "Content-Type: application/json", f"Content-Length: {declared}"))
    assert status == 413 and headers["connection"] == "close"
    if path.startswith("/v1/"):
        assert _openai_error(body)["code"] == "request_too_large"
    else:
        assert "too large" in _management_error(body)


def test_a_streamed_v1_body_past_the_cap_is_a_413_in_openai_shape(gateway, key):
    def body():
        yield b'{"model": "m", "prompt": "'
        for _ in range(settings.DATA_UPLOAD_MAX_MEMORY_SIZE // (1 << 20) + 2):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(f"{gateway}/v1/completions", content=body(), timeout=30,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "LLMP_MAX_REQUEST_BYTES" in error["message"]


def test_an_upload_still_reaches_the_view_and_one_declared_over_its_cap_does_not(gateway):
    _, staff_key = api_key_create(name="guard uploader", user=_user(staff=True))
    auth = {"Authorization": f"Bearer {staff_key}"}
    refused = httpx.post(f"{gateway}/api/v1/models", headers=auth, timeout=30,
                         files={"file": ("notes.txt", b"GGUF" + b"\0" * 64, "application/octet-stream")})
    assert refused.status_code == 400 and refused.json()["error"] == "Invalid file type. Only gguf files are allowed"
    status, _, body, _ = _exchange(gateway, _head(
        "POST", "/api/v1/models", f"Authorization: Bearer {staff_key}",
        "Content-Type: multipart/form-data; boundary=b", f"Content-Length: {settings.LLMP_UPLOAD_MAX_BYTES * 2}"))
    assert status == 413 and "File too large" in _management_error(body)


# --- stalled bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path, content_type, declared", [
    ("/api/v1/models", "multipart/form-data; boundary=b", 50_000_000),  # an upload declaring 50 MB
    ("/v1/chat/completions", "application/json", 4096),
])
def test_a_body_that_stalls_gets_a_408_within_the_deadline_and_the_connection_closes(
        gateway, key, path, content_type, declared):
    timeout = settings.LLMP_BODY_RECEIVE_TIMEOUT
    status, headers, body, elapsed = _exchange(gateway, _head(
        "POST", path, f"Authorization: Bearer {key}", f"Content-Type: {content_type}",
        f"Content-Length: {declared}") + b"x" * 1024, timeout=timeout + 20)
    assert status == 408 and headers["connection"] == "close"
    assert timeout - 0.5 <= elapsed < timeout + 10
    if path.startswith("/v1/"):
        assert _openai_error(body)["code"] == "request_timeout"
    else:
        assert "LLMP_BODY_RECEIVE_TIMEOUT" in _management_error(body)


# --- refused keys are rate limited ------------------------------------------------------------------

FAILURE_LIMIT, FAILURE_WINDOW = 3, 4


@pytest.fixture
def two_gateways(django_db_setup, tmp_path_factory):
    """Two gateway processes sharing one failure count (their own Redis prefix), limit 3 per 4 s."""
    env = {"LLMP_AUTH_FAILURE_LIMIT": str(FAILURE_LIMIT), "LLMP_AUTH_FAILURE_WINDOW": str(FAILURE_WINDOW),
           "LLMP_REDIS_PREFIX": f"llmptest-{RUN}-limit-{uuid.uuid4().hex[:6]}"}
    log_dir = tmp_path_factory.mktemp("rate-limit")
    first, first_server = _server(log_dir, **env)
    try:
        second, second_server = _server(log_dir, **env)
    except BaseException:
        first_server.stop()
        raise
    yield first, second
    first_server.stop()
    second_server.stop()


def _models(base_url: str, raw_key: str) -> httpx.Response:
    return httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {raw_key}"}, timeout=30)


def test_refused_keys_from_one_address_get_429_across_processes_until_the_window_ends(two_gateways, key):
    first, second = two_gateways
    assert [_models(first, "llmp-guess-1").status_code, _models(first, "llmp-guess-2").status_code] == [401, 401]
    assert _models(second, key).status_code == 200  # under the limit: the good key works
    assert _models(second, "llmp-guess-3").status_code == 401  # the third refusal, counted with the first two

    blocked = _models(second, key)
    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(blocked.headers["Retry-After"]) <= FAILURE_WINDOW
    management = httpx.get(f"{second}/api/v1/keys/", headers={"Authorization": f"Bearer {key}"})
    assert management.status_code == 429 and "Too many failed" in management.json()["error"]
    assert httpx.get(f"{second}/health").status_code == 200  # routes without credentials stay open

    # The first process learns of the block at its next refusal, from the shared count.
    assert _models(first, "llmp-guess-4").status_code == 401
    assert _models(first, key).status_code == 429

    devstack.wait_until(lambda: _models(second, key).status_code == 200, timeout=FAILURE_WINDOW + 10,
                        interval=0.5, what="the block to end")
    devstack.wait_until(lambda: _models(first, key).status_code == 200, timeout=10, interval=0.5,
                        what="the block to end in the other process")
    assert _models(first, "llmp-guess-5").status_code == 401  # a new window: one refusal is not a block
    assert _models(first, key).status_code == 200


def test_keys_guessed_over_the_websocket_count_and_a_blocked_address_is_refused_there_too(two_gateways, key):
    import json

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    first, _ = two_gateways
    url = first.replace("http://", "ws://") + "/ws/jobs/?job=*"

    def connects(raw_key: str) -> bool:
        try:
            with connect(url, additional_headers={"Authorization": f"Bearer {raw_key}"}) as ws:
                return json.loads(ws.recv(timeout=10))["type"] == "subscribed"
        except InvalidStatus as refused:  # refused at the handshake
            assert refused.response.status_code == 403
            return False

    assert connects(key)
    assert [connects(f"llmp-ws-guess-{guess}") for guess in range(FAILURE_LIMIT)] == [False] * FAILURE_LIMIT
    assert not connects(key)  # the address is blocked now: even the good key is refused
    assert _models(first, key).status_code == 429  # over HTTP too
    devstack.wait_until(lambda: connects(key), timeout=FAILURE_WINDOW + 10, interval=0.5, what="the block to end")


def test_a_refused_key_is_a_401_not_a_500_when_redis_is_down(django_db_setup, tmp_path_factory, key):
    base_url, server = _server(tmp_path_factory.mktemp("guard-no-redis"),
                               REDIS_URL=f"redis://127.0.0.1:{devstack.free_port()}/0")
    try:
        refused = _models(base_url, "llmp-guess")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        refused = httpx.post(f"{base_url}/api/v1/keys/", json={"name": "x"},
                             headers={"Authorization": "Bearer llmp-guess"}, timeout=30)
        assert refused.status_code == 401 and "Incorrect API key" in refused.json()["error"]
    finally:
        server.stop()
