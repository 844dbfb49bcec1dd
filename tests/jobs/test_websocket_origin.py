"""A session cookie opens the job-events WebSocket only from a page of this site: same scheme, host and port."""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


@pytest.fixture
def staff_cookie() -> str:
    browser = Client()
    browser.force_login(get_user_model().objects.create_user(f"staff-{uuid.uuid4().hex[:6]}", is_staff=True))
    return f"sessionid={browser.cookies['sessionid'].value}"


def _open(platform, cookie: str, origin: str | None):
    headers = {"Cookie": cookie} | ({"Origin": origin} if origin is not None else {})
    return connect(platform.base_url.replace("http://", "ws://") + "/ws/jobs/?job=*", additional_headers=headers)


@pytest.mark.parametrize("origin", ["{base}", None])
def test_a_session_cookie_opens_the_websocket_from_this_sites_own_origin(platform, staff_cookie, origin):
    with _open(platform, staff_cookie, origin and origin.format(base=platform.base_url)) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"


@pytest.mark.parametrize("origin", [
    "http://localhost:1234",  # an allowed host name, another port
    "http://{host}:{other_port}",  # this host, another port
    "https://{host}:{port}",  # this host and port, another scheme
    "http://localhost:{port}",  # another allowed host name than the one this page was served from
    "https://evil.example",
    "null",  # a sandboxed or file:// page
])
def test_a_session_cookie_is_refused_from_any_other_origin(platform, staff_cookie, origin):
    url = urlsplit(platform.base_url)
    origin = origin.format(host=url.hostname, port=url.port, other_port=url.port + 1)
    with pytest.raises(InvalidStatus) as refused:
        with _open(platform, staff_cookie, origin) as ws:
            ws.recv(timeout=5)
    assert refused.value.response.status_code == 403
