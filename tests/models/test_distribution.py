"""Distribution: the blob endpoint (HTTP Range, tokens) and a node with its own cache pulling a model it lacks."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from apps.models.models import ModelCopy, RegisteredModel
from apps.models.services import blob_token
from apps.nodes.models import Node
from apps.nodes.services import node_cordon, node_uncordon
from llmplatform import devstack
from tests.environment import RUN
from workers.bundled import bundled_model_path
from workers.distribution import model_pull

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def bundled_bytes() -> bytes:
    return bundled_model_path().read_bytes()


def test_the_blob_endpoint_serves_whole_files_and_byte_ranges(http, model_id, bundled_bytes):
    size = len(bundled_bytes)
    whole = http.get(f"/api/v1/blobs/{model_id}")
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert whole.content == bundled_bytes
    middle = http.get(f"/api/v1/blobs/{model_id}", headers={"Range": "bytes=100-199"})
    assert middle.status_code == 206 and middle.content == bundled_bytes[100:200]
    assert middle.headers["content-range"] == f"bytes 100-199/{size}"
    tail = http.get(f"/api/v1/blobs/{model_id}", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == bundled_bytes[-10:]
    beyond = http.get(f"/api/v1/blobs/{model_id}", headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"


def test_the_blob_endpoint_takes_a_signed_token_for_exactly_one_model(platform, model_id):
    url = f"{platform.base_url}/api/v1/blobs/{model_id}"
    assert httpx.get(url, headers={"Range": "bytes=0-3"}).status_code == 401
    assert httpx.get(url, params={"token": blob_token(model_id)}, headers={"Range": "bytes=0-3"}).content == b"GGUF"
    assert httpx.get(url, params={"token": blob_token("other-model")}).status_code == 403
    assert httpx.get(url, params={"token": "forged"}).status_code == 403
    assert httpx.get(f"{platform.base_url}/api/v1/blobs/nope", params={"token": blob_token("nope")}).status_code == 404


def test_a_pull_resumes_a_partial_file_and_refetches_a_corrupt_one(platform, model_id, bundled_bytes, tmp_path):
    url = f"{platform.base_url}/api/v1/blobs/{model_id}?token={blob_token(model_id)}"
    sha256 = hashlib.sha256(bundled_bytes).hexdigest()
    dest = tmp_path / "resumed.gguf"
    half = len(bundled_bytes) // 2
    dest.with_name(dest.name + ".part").write_bytes(bundled_bytes[:half])
    seen: list[int] = []
    model_pull(url=url, dest=dest, size=len(bundled_bytes), sha256=sha256, progress=lambda done, total: seen.append(done))
    assert dest.read_bytes() == bundled_bytes
    assert seen[0] > half, "the pull started from zero instead of the partial file"

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.with_name(corrupt.name + ".part").write_bytes(b"X" * half)
    model_pull(url=url, dest=corrupt, size=len(bundled_bytes), sha256=sha256)
    assert corrupt.read_bytes() == bundled_bytes
    assert not list(tmp_path.glob("*.part"))


@pytest.fixture
def remote_node(platform, tmp_path_factory):
    """A worker on 'another machine': its own models directory, pulling from the platform's server,
    and the server's secret given to it in DJANGO_SECRET_KEY, as a remote worker needs."""
    models_dir = Path(tmp_path_factory.mktemp("remote-models"))
    name = f"remote-{RUN}"
    worker = devstack.start_worker(name, env=devstack.child_env(LLMP_MODELS_DIR=str(models_dir),
                                                                LLMP_SERVER_URL=platform.base_url,
                                                                DJANGO_SECRET_KEY=settings.SECRET_KEY),
                                   log_dir=Path(tmp_path_factory.mktemp("remote-logs")), extra=["--no-default-queue"])
    devstack.wait_ready(platform.base_url, nodes={name}, timeout=60, processes=(worker,))
    local = Node.objects.get(name=platform.node)
    node_cordon(node=local)  # so that requests go to the remote node
    try:
        yield Node.objects.get(name=name), models_dir
    finally:
        node_uncordon(node=Node.objects.get(name=platform.node))
        worker.stop()


def test_a_node_with_its_own_cache_pulls_a_model_it_lacks_and_serves_it(http, client, remote_node, bundled_bytes):
    node, models_dir = remote_node
    name = f"pulled-{uuid.uuid4().hex[:8]}"
    assert http.post("/api/v1/models", files={"file": (f"{name}.gguf", bundled_bytes)}).status_code == 200
    assert not (models_dir / f"{name}.gguf").exists()

    reply = client.chat.completions.create(model=name, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens > 0
    assert (models_dir / f"{name}.gguf").read_bytes() == bundled_bytes
    devstack.wait_until(lambda: ModelCopy.objects.filter(model_id=name, node=node).exists(), timeout=15,
                        what="the node's copy to be recorded")
    cache = http.get(f"/api/v1/nodes/{node.name}/cache").json()
    assert name in [held["model"] for held in cache["held"]]

    deleted = http.delete(f"/api/v1/nodes/{node.name}/cache/{name}")
    assert deleted.status_code == 202
    devstack.wait_until(lambda: not (models_dir / f"{name}.gguf").exists(), timeout=20, what="the copy to go")
    assert RegisteredModel.objects.filter(id=name).exists(), "deleting a node's copy must keep the model"

    refused = http.post("/api/v1/quantize", json={"model": name, "qtype": "Q8_0", "node": node.name})
    assert refused.status_code == 400 and "own model cache" in refused.json()["error"]


def test_node_cache_errors_are_clear(http, platform, model_id):
    assert http.get("/api/v1/nodes/no-such-node/cache").status_code == 404
    shared = http.delete(f"/api/v1/nodes/{platform.node}/cache/{model_id}")
    assert shared.status_code in (400, 404)
    assert http.post(f"/api/v1/nodes/{platform.node}/cache/unload", json={"models": "all"}).status_code == 400
    for not_an_object in (b'["%s"]' % model_id.encode(), b'"everything"', b"7", b"null"):  # never "unload all"
        refused = http.post(f"/api/v1/nodes/{platform.node}/cache/unload", content=not_an_object,
                            headers={"Content-Type": "application/json"})
        assert refused.status_code == 400 and "JSON object" in refused.json()["error"], not_an_object
    unload = http.post(f"/api/v1/nodes/{platform.node}/cache/unload", json={"models": [model_id]})
    assert unload.status_code == 202 and unload.json()["models"] == [model_id]
