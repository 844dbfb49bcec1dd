"""The admin in a real browser (Debian's chromium, driven by Playwright), as an operator uses it."""

from __future__ import annotations

import os
import shutil
import uuid

import httpx
import pytest
from django.contrib.auth import get_user_model

from llmplatform import devstack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed machine with no network: no sandbox (root), no GPU, no background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        yield page
        browser.close()


@pytest.fixture
def operator():
    password = uuid.uuid4().hex
    user = get_user_model().objects.create_superuser(f"op-{uuid.uuid4().hex[:6]}", password=password)
    return user.username, password


def test_an_operator_creates_a_key_in_the_admin_and_it_works(platform, operator, browser_page, tmp_path):
    username, password = operator
    page = browser_page
    page.goto(f"{platform.base_url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")
    page.goto(f"{platform.base_url}/admin/gateway/apikey/add/")
    page.fill("#id_name", "made in the browser")
    page.click("input[name=_save]")
    message = page.locator(".messagelist .warning").inner_text()
    page.screenshot(path=str(tmp_path / "admin-key-created.png"), full_page=True)
    raw_key = message.rsplit(" ", 1)[-1]
    assert raw_key.startswith("llmp-")
    # The admin's stylesheet is served, so the page looks like the admin and not bare HTML.
    assert page.evaluate("getComputedStyle(document.querySelector('#header')).backgroundColor") != "rgba(0, 0, 0, 0)"
    reply = httpx.get(f"{platform.base_url}/v1/models", headers={"Authorization": f"Bearer {raw_key}"})
    assert reply.status_code == 200
    request_id = reply.headers["X-Request-Id"]

    def history_shows_it() -> bool:  # the row is written in the background
        page.goto(f"{platform.base_url}/admin/gateway/requestlog/?q={request_id}")
        return page.locator("#result_list").count() == 1 and "/v1/models" in page.locator("#result_list").inner_text()

    devstack.wait_until(history_shows_it, timeout=10, what="the request in the admin's history")
