"""Download jobs from a (fake) Hugging Face hub: live events over WebSocket and SSE, replay,
cancellation, retry, and a worker killed mid-download that resumes from its partial file."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from functools import cache

import pytest
from django.conf import settings
from websockets.sync.client import connect

from apps.jobs.models import Job, JobStatus
from apps.models.models import ModelSource, RegisteredModel
from llmplatform.devstack import wait_until
from tests.jobs.conftest import BROKEN_FILE, GGUF_FILE, GGUF_REPO
from workers.bundled import bundled_model_path

pytestmark = pytest.mark.live
FINAL = {"job.succeeded", "job.failed", "job.cancelled"}


@cache
def _bundled_sha256() -> str:
    return hashlib.sha256(bundled_model_path().read_bytes()).hexdigest()


def _register(http, hub_node, filename=GGUF_FILE, **extra) -> dict:
    response = http.post("/api/v1/hf/register", json={"repo_id": GGUF_REPO, "filename": filename,
                                                      "node": hub_node.name, "name": f"dl-{uuid.uuid4().hex[:8]}",
                                                      **extra})
    assert response.status_code == 202, response.text
    return response.json()


def _ws_url(platform, query: str) -> str:
    return platform.base_url.replace("http://", "ws://") + "/ws/jobs/?" + query


def _events_until_final(ws, *, job_id: str | None = None, timeout: float = 120) -> list[dict]:
    """Events received until the final one of ``job_id`` (of any job when None)."""
    received = []
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if message["type"].startswith("job."):
            received.append(message)
            if message["type"] in FINAL and job_id in (None, message["job"]):
                return received


def _wait_job(job_id, predicate, *, timeout=120, what="the job") -> Job:
    wait_until(lambda: predicate(Job.objects.get(pk=job_id)), timeout=timeout, what=what)
    return Job.objects.get(pk=job_id)


def test_a_download_streams_its_progress_in_order_over_websocket_and_registers_a_working_model(
        platform, api_key, http, client, hub, hub_node):
    hub.throttle_bps = 40 * 1024 * 1024
    try:
        job = _register(http, hub_node)
        with connect(_ws_url(platform, f"job={job['id']}"), additional_headers={"Authorization": f"Bearer {api_key}"}) as ws:
            subscribed = json.loads(ws.recv(timeout=10))
            assert subscribed["type"] == "subscribed"
            events = _events_until_final(ws)
    finally:
        hub.throttle_bps = None
    types = [event["type"] for event in events]
    assert types[0] == "job.created" and "job.started" in types and types[-1] == "job.succeeded", types
    ids = [tuple(map(int, event["id"].split("-"))) for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    stages = [event["data"]["stage"] for event in events if event["type"] == "job.stage"]
    assert stages == ["downloading", "registering"]  # the download checked the Hub's sha256: no second hashing
    logged = [event["data"]["line"] for event in events if event["type"] == "job.log"]
    assert any(line.endswith(f"sha256 {_bundled_sha256()}, as the Hub's") for line in logged), logged
    download = []
    for event in events:
        if event["type"] == "job.stage" and event["data"]["stage"] != "downloading" and download:
            break
        if event["type"] == "job.progress" and event["stage"] == "downloading":
            download.append(event["data"])
    size = bundled_model_path().stat().st_size
    assert len(download) >= 2
    assert [p["done"] for p in download] == sorted(p["done"] for p in download)
    assert download[-1]["done"] == download[-1]["total"] == size

    model = RegisteredModel.objects.get(id=job["params"]["model_id"])
    assert model.source == ModelSource.HUGGINGFACE and model.hf_repo == GGUF_REPO and model.hf_filename == GGUF_FILE
    assert model.sha256 == _bundled_sha256() and model.architecture == "llama"
    assert not (settings.MODELS_DIR / ".jobs" / job["id"]).exists()
    reply = client.chat.completions.create(model=model.id, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens > 0

    # A client that reconnects with the last id it saw gets exactly what it missed.
    seen = events[2]["id"]
    with connect(_ws_url(platform, f"job={job['id']}&last_event_id={seen}"),
                 additional_headers={"Authorization": f"Bearer {api_key}"}) as ws:
        assert json.loads(ws.recv(timeout=10)) == {"type": "subscribed", "job": job["id"], "replayed": len(events) - 3}
        replayed = [json.loads(ws.recv(timeout=10)) for _ in range(len(events) - 3)]
    assert [event["id"] for event in replayed] == [event["id"] for event in events[3:]]

    # The same history over SSE, from a Last-Event-ID.
    with http.stream("GET", f"/api/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": events[1]["id"]}) as sse:
        assert sse.headers["content-type"].startswith("text/event-stream")
        frames = [json.loads(line[len("data: "):]) for line in sse.iter_lines() if line.startswith("data: ")]
    assert [event["id"] for event in frames] == [event["id"] for event in events[2:]]

    polled = http.get(f"/api/v1/jobs/{job['id']}/").json()
    assert polled["status"] == "succeeded" and polled["result_model"] == model.id and polled["progress_fraction"] == 1.0


def test_a_worker_killed_mid_download_is_redelivered_and_resumes_from_its_partial_file(http, hub, hub_node):
    size = bundled_model_path().stat().st_size
    hub.throttle_bps = 12 * 1024 * 1024
    hub.clear_requests()
    try:
        job = _register(http, hub_node)
        _wait_job(job["id"], lambda j: j.status == JobStatus.RUNNING and j.progress_done > size // 4, timeout=60,
                  what="a quarter of the download")
        hub_node.kill()
        hub.throttle_bps = None
        hub_node.start()
        done = _wait_job(job["id"], lambda j: j.is_terminal, timeout=120, what="the resumed job to end")
    finally:
        hub.throttle_bps = None
    assert done.status == JobStatus.SUCCEEDED, (done.error, done.log)
    assert done.attempts == 2
    starts = [r.range_start for r in hub.file_requests(GGUF_REPO, GGUF_FILE) if r.range_start]
    assert starts and max(starts) >= size // 4, "the second attempt did not resume with a Range request"
    assert RegisteredModel.objects.get(id=job["params"]["model_id"]).sha256 == _bundled_sha256()


def test_cancelling_a_running_download_stops_it_and_removes_its_files(http, hub, hub_node):
    hub.throttle_bps = 5 * 1024 * 1024
    try:
        job = _register(http, hub_node)
        _wait_job(job["id"], lambda j: j.progress_done > 0, timeout=60, what="the download to start")
        cancelled = http.post(f"/api/v1/jobs/{job['id']}/cancel/")
        assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"] is True
        done = _wait_job(job["id"], lambda j: j.is_terminal, timeout=30, what="the job to stop")
    finally:
        hub.throttle_bps = None
    assert done.status == JobStatus.CANCELLED
    assert not (settings.MODELS_DIR / ".jobs" / job["id"]).exists()
    assert not RegisteredModel.objects.filter(id=job["params"]["model_id"]).exists()
    again = http.post(f"/api/v1/jobs/{job['id']}/cancel/")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]


def test_a_file_that_is_not_valid_gguf_fails_the_job_and_registers_nothing_and_retry_runs_it_again(http, hub_node):
    job = _register(http, hub_node, filename=BROKEN_FILE)
    done = _wait_job(job["id"], lambda j: j.is_terminal, timeout=60, what="the job to fail")
    assert done.status == JobStatus.FAILED and "Invalid GGUF file" in done.error
    assert not RegisteredModel.objects.filter(id=job["params"]["model_id"]).exists()
    assert not (settings.MODELS_DIR / f"{job['params']['model_id']}.gguf").exists()
    retried = http.post(f"/api/v1/jobs/{job['id']}/retry/")
    assert retried.status_code == 200 and retried.json()["status"] in ("queued", "running", "failed")
    again = _wait_job(job["id"], lambda j: j.is_terminal and j.attempts == 1, timeout=60, what="the retried job")
    assert again.status == JobStatus.FAILED
    assert http.post(f"/api/v1/jobs/{job['id']}/cancel/").status_code == 409


def test_register_refuses_bad_requests_clearly(http, hub_node, model_id):
    assert http.post("/api/v1/hf/register", json={"repo_id": GGUF_REPO}).status_code == 400
    conflict = http.post("/api/v1/hf/register", json={"repo_id": GGUF_REPO, "filename": GGUF_FILE, "name": model_id})
    assert conflict.status_code == 409 and model_id in conflict.json()["error"]
    unknown = http.post("/api/v1/hf/register", json={"repo_id": GGUF_REPO, "filename": GGUF_FILE,
                                                     "node": "no-such-node", "name": "x-" + uuid.uuid4().hex[:6]})
    assert unknown.status_code == 404
    not_gguf = http.post("/api/v1/hf/register", json={"repo_id": GGUF_REPO, "filename": "README.md"})
    assert not_gguf.status_code == 400


def test_hub_files_and_search_go_through_the_hub(http, hub_node, platform):
    # The server process has no HF_ENDPOINT of the fake hub, so these ask the worker-less server; only
    # the error path is checked here (the hub is unreachable from the server in this test setup).
    response = http.get("/api/v1/hf/files")
    assert response.status_code == 400 and response.json() == {"error": "repo is required"}
    assert http.get("/api/v1/hf/search").status_code == 400


def test_other_users_cannot_see_or_follow_a_job(platform, http, hub_node):
    from django.contrib.auth import get_user_model

    from apps.gateway.services import api_key_create

    job = _register(http, hub_node, filename=BROKEN_FILE)
    stranger = get_user_model().objects.create_user(f"stranger-{uuid.uuid4().hex[:6]}")
    _, key = api_key_create(name="stranger", user=stranger)
    import httpx

    assert httpx.get(f"{platform.base_url}/api/v1/jobs/{job['id']}/",
                     headers={"Authorization": f"Bearer {key}"}).status_code == 404
    with connect(_ws_url(platform, f"job={job['id']}"), additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "error"
    with pytest.raises(Exception):
        with connect(_ws_url(platform, f"job={job['id']}")) as ws:
            ws.recv(timeout=5)


def test_a_session_cookie_opens_the_websocket_only_from_this_sites_pages(platform, http, hub_node):
    from django.test import Client

    job = _register(http, hub_node, filename=BROKEN_FILE)
    owner = Job.objects.get(pk=job["id"]).created_by
    browser = Client()
    browser.force_login(owner)
    cookie = f"sessionid={browser.cookies['sessionid'].value}"
    with connect(_ws_url(platform, f"job={job['id']}"),
                 additional_headers={"Cookie": cookie, "Origin": platform.base_url}) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
    with pytest.raises(Exception):
        with connect(_ws_url(platform, f"job={job['id']}"),
                     additional_headers={"Cookie": cookie, "Origin": "https://evil.example"}) as ws:
            ws.recv(timeout=5)


def test_subscribing_to_every_job_delivers_a_new_jobs_events_and_only_to_those_who_may_see_it(
        platform, api_key, http, hub_node):
    from django.contrib.auth import get_user_model

    from apps.gateway.services import api_key_create

    stranger = get_user_model().objects.create_user(f"watcher-{uuid.uuid4().hex[:6]}")
    _, stranger_key = api_key_create(name="watcher", user=stranger)
    with connect(_ws_url(platform, "job=*"), additional_headers={"Authorization": f"Bearer {api_key}"}) as mine, \
            connect(_ws_url(platform, "job=*"), additional_headers={"Authorization": f"Bearer {stranger_key}"}) as theirs:
        assert json.loads(mine.recv(timeout=10))["type"] == "subscribed"
        assert json.loads(theirs.recv(timeout=10))["type"] == "subscribed"
        job = _register(http, hub_node, filename=BROKEN_FILE)
        events = [e for e in _events_until_final(mine, job_id=job["id"], timeout=60) if e["job"] == job["id"]]
        assert events[0]["type"] == "job.created" and events[-1]["type"] == "job.failed"
        with pytest.raises(TimeoutError):
            theirs.recv(timeout=1)
