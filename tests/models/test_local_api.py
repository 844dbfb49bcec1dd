"""The local LLM API (/api/v1/health, models, upload, delete, sync, generate, cache) on the running platform."""

from __future__ import annotations

import shutil
import socket
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from django.conf import settings

from apps.gateway.models import RequestLog
from apps.models.models import ModelSource, RegisteredModel
from llmplatform.devstack import wait_until
from tests.models.test_gguf import SMALL_KVS, VT, kv, small_gguf
from workers.bundled import bundled_model_path

pytestmark = pytest.mark.live


def _upload(http: httpx.Client, name: str, content) -> httpx.Response:
    return http.post("/api/v1/models", files={"file": (name, content, "application/octet-stream")})


def _leftover_parts() -> list:
    uploads = settings.MODELS_DIR / ".uploads"
    return list(uploads.iterdir()) if uploads.exists() else []


def test_health_answers_as_the_local_llm_api_does(http):
    response = http.get("/api/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy", "service": "Local LLM API", "version": "1.0.0"}


def test_the_local_api_needs_an_api_key(platform):
    response = httpx.get(f"{platform.base_url}/api/v1/models")
    assert response.status_code in (401, 403)
    assert "error" in response.json()


def test_list_shows_the_bundled_model_with_name_path_size_and_modified(http, model_id):
    body = http.get("/api/v1/models").json()
    assert body["count"] == len(body["models"])
    bundled = next(m for m in body["models"] if m["id"] == model_id)
    assert bundled["name"] == bundled_model_path().name
    assert bundled["size"].endswith("MB") and bundled["modified"].endswith("Z")
    assert bundled["architecture"] == "llama" and bundled["file_type"] == "Q4_1"


def test_an_uploaded_gguf_is_registered_from_its_header_and_answers_chat(http, client):
    name = f"upload-{uuid.uuid4().hex[:8]}.gguf"
    with open(bundled_model_path(), "rb") as handle:
        response = _upload(http, name, handle)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == "File uploaded successfully" and body["filename"] == name
    model = RegisteredModel.objects.get(id=name.removesuffix(".gguf"))
    assert model.source == ModelSource.UPLOAD and model.architecture == "llama"
    assert model.parameter_count and 100e6 < model.parameter_count < 200e6
    assert model.size_bytes == bundled_model_path().stat().st_size
    assert (settings.MODELS_DIR / name).stat().st_size == model.size_bytes
    assert _leftover_parts() == []

    completion = client.chat.completions.create(model=model.id, max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "Say hi"}])
    assert completion.model == model.id and completion.usage.completion_tokens > 0

    again = _upload(http, name, open(bundled_model_path(), "rb"))
    assert again.status_code == 409 and again.json() == {"error": "File already exists"}
    assert _leftover_parts() == []


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"GGUF" + b"\0" * 64, "Invalid file type. Only gguf files are allowed"),
    ("model.bin", b"GGUF" + b"\0" * 64, "Invalid file type. Only gguf files are allowed"),
    ("", b"GGUF", None),
])
def test_files_that_are_not_gguf_by_name_are_refused(http, name, content, message):
    response = _upload(http, name, content)
    assert response.status_code == 400
    if message:
        assert response.json()["error"] == message
    assert _leftover_parts() == []


def test_a_request_without_a_file_part_is_refused(http):
    response = http.post("/api/v1/models", data={"other": "x"}, files={"notfile": ("a.gguf", b"GGUF")})
    assert response.status_code == 400 and response.json()["error"] == "No file part in the request"
    assert http.post("/api/v1/models", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 400


@pytest.mark.parametrize("content", [
    b"PK\x03\x04 this is a zip file, not a model" * 10,
    b"GGUF\x03\x00\x00\x00" + b"\xff" * 8,  # truncated right after the tensor count
    b"GGUF\x03\x00\x00\x00" + (1 << 62).to_bytes(8, "little") + (1).to_bytes(8, "little"),  # absurd tensor count
])
def test_malformed_gguf_content_is_refused_with_400_and_leaves_nothing(http, content):
    name = f"bad-{uuid.uuid4().hex[:8]}.gguf"
    response = _upload(http, name, content)
    assert response.status_code == 400
    assert "GGUF" in response.json()["error"]
    assert not (settings.MODELS_DIR / name).exists()
    assert not RegisteredModel.objects.filter(id=name.removesuffix(".gguf")).exists()
    assert _leftover_parts() == []


@pytest.mark.parametrize("vtype, context_length", [(VT.UINT64, 2**64 - 1), (VT.UINT32, 2**31), (VT.INT32, -1)])
def test_a_gguf_whose_context_length_no_model_has_is_refused_with_400_and_leaves_nothing(http, vtype, context_length):
    kvs = [item for item in SMALL_KVS if b"llama.context_length" not in item]
    name = f"ctx-{uuid.uuid4().hex[:8]}.gguf"
    response = _upload(http, name, small_gguf([*kvs, kv("llama.context_length", vtype, context_length)]))
    assert response.status_code == 400, response.text
    assert "context length" in response.json()["error"]
    assert not (settings.MODELS_DIR / name).exists()
    assert not RegisteredModel.objects.filter(id=name.removesuffix(".gguf")).exists()
    assert _leftover_parts() == []


def test_path_traversal_in_the_file_name_stays_inside_the_models_directory(http):
    suffix = uuid.uuid4().hex[:8]
    response = _upload(http, f"../../etc/evil-{suffix}.gguf", open(bundled_model_path(), "rb"))
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == f"evil-{suffix}.gguf"
    assert (settings.MODELS_DIR / f"evil-{suffix}.gguf").is_file()
    http.delete(f"/api/v1/models/evil-{suffix}")


def test_an_upload_declaring_more_than_the_limit_gets_413_before_it_is_read(platform, api_key):
    host, port = urlsplit(platform.base_url).hostname, urlsplit(platform.base_url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + api_key.encode() +
                     b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: " +
                     str(settings.LLMP_UPLOAD_MAX_BYTES * 2).encode() + b"\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):  # the server closes the connection after its answer
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"File too large" in reply


def test_a_streamed_upload_past_the_limit_gets_413_and_leaves_nothing(http):
    limit = settings.LLMP_UPLOAD_MAX_BYTES
    boundary = "llmpboundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.gguf\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        yield b"GGUF\x03\x00\x00\x00"
        chunk = b"\0" * (4 << 20)
        for _ in range(limit // len(chunk) + 2):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    response = http.post("/api/v1/models", content=body(),
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert not (settings.MODELS_DIR / "huge.gguf").exists()
    assert _leftover_parts() == []


def test_delete_appends_gguf_and_says_how_many_remain(http):
    name = f"todelete-{uuid.uuid4().hex[:8]}"
    assert _upload(http, f"{name}.gguf", open(bundled_model_path(), "rb")).status_code == 200
    response = http.delete(f"/api/v1/models/{name}")
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "Model deleted successfully" and body["filename"] == f"{name}.gguf"
    assert body["remaining_models"] == RegisteredModel.objects.filter(is_active=True).count()
    assert not (settings.MODELS_DIR / f"{name}.gguf").exists()
    missing = http.delete(f"/api/v1/models/{name}.gguf")
    assert missing.status_code == 404 and missing.json() == {"error": "Model not found"}


def test_sync_registers_files_put_in_the_directory_and_forgets_removed_ones(http):
    name = f"synced-{uuid.uuid4().hex[:8]}.gguf"
    path = settings.MODELS_DIR / name
    shutil.copyfile(bundled_model_path(), path)
    (settings.MODELS_DIR / f"junk-{uuid.uuid4().hex[:6]}.gguf").write_bytes(b"not a model")
    body = http.post("/api/v1/models/sync").json()
    assert body["message"] == "Models list synchronized successfully"
    assert name in body["added"] and any(s["name"].startswith("junk-") for s in body["skipped"])
    assert name in [m["name"] for m in body["data"]["models"]]
    path.unlink()
    body = http.post("/api/v1/models/sync").json()
    assert name in body["removed"]
    assert name not in [m["name"] for m in body["data"]["models"]]


def test_generate_answers_with_the_documented_fields_and_is_in_the_request_history(http, model_id, platform):
    response = http.post("/api/v1/generate", json={"question": "What is 2+2?", "model_name": model_id,
                                                   "temperature": 0, "max_tokens": 16})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["response"]
    assert body["model_used"] == bundled_model_path().name
    assert body["token_count"] > 0 and body["processing_time"] > 0
    finished = RequestLog.objects.filter(pk=response.headers["X-Request-Id"], status="succeeded")
    wait_until(finished.exists, timeout=15, what="the request's history row to be closed")
    row = finished.get()
    assert (row.model, row.node, row.path, row.status_code) == (model_id, platform.node, "/api/v1/generate", 200)
    assert row.completion_tokens == body["token_count"]


def test_generate_accepts_the_model_file_name_and_a_custom_template(http):
    response = http.post("/api/v1/generate", json={
        "question": "the sky", "model_name": bundled_model_path().name, "max_tokens": 8,
        "template": "Write one word about {question}:", "n_gpu_layers": 0, "n_batch": 256})
    assert response.status_code == 200, response.text
    assert response.json()["token_count"] > 0


@pytest.mark.parametrize("body, status, error", [
    (None, 400, "Request body is required"),
    ({}, 400, "Request body is required"),
    ({"model_name": "x"}, 400, "Question is required"),
    ({"question": "hi"}, 400, "Model name is required"),
    ({"question": "hi", "model_name": "no-such-model"}, 404, "Model not found"),
    ({"question": "hi", "model_name": "smollm2-135m-instruct", "temperature": 7}, 400,
     "temperature must be a number from 0 to 2"),
    ({"question": "hi", "model_name": "smollm2-135m-instruct", "n_batch": 0}, 400,
     "n_batch must be an integer of at least 1"),
])
def test_generate_errors_are_the_documented_ones(http, body, status, error):
    if body is None:
        response = http.post("/api/v1/generate", content=b"", headers={"Content-Type": "application/json"})
    else:
        response = http.post("/api/v1/generate", json=body)
    assert response.status_code == status
    assert response.json()["error"] == error


def test_cache_status_lists_loaded_models_and_clear_unloads_them(http, model_id, platform):
    http.post("/api/v1/generate", json={"question": "hi", "model_name": model_id, "max_tokens": 2})
    wait_until(lambda: bundled_model_path().name in http.get("/api/v1/cache/status").json()["cached_models"],
               timeout=15, what="the model to show as cached")
    status = http.get("/api/v1/cache/status").json()
    assert status["count"] == len(status["cached_models"])
    cleared = http.post("/api/v1/cache/clear")
    assert cleared.status_code == 200 and cleared.json()["message"] == "Cache cleared successfully"
    assert platform.node in cleared.json()["nodes"]
    wait_until(lambda: http.get("/api/v1/cache/status").json()["cached_models"] == [], timeout=20,
               what="the cache to empty")
