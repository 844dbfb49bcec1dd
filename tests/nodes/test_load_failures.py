"""A model that passed its checks at upload but fails to load on a node (its file changed on disk
since): the real worker marks it failed on that node, the gateway answers 503 model_unavailable
without trying the node again, and the node tries again once the file changes or staff clear the mark."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from apps.gateway.dispatch import node_choose
from apps.gateway.errors import OpenAIError
from apps.models.models import ModelCopy, RegisteredModel
from apps.models.services import model_load_failure_clear, model_load_failure_record
from apps.nodes.models import Node
from llmplatform import devstack
from tests.fixtures.tiny_gguf import tiny_gguf, tiny_tokens

pytestmark = pytest.mark.live

ARCHITECTURE_VALUE = b"\x05\x00\x00\x00\x00\x00\x00\x00llama"  # general.architecture's string, as GGUF stores it


def upload_tiny(staff: httpx.Client, tmp_path) -> tuple[str, bytes]:
    model_id = f"loadfail-{uuid.uuid4().hex[:8]}"
    good = tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    response = staff.post("/api/v1/models", files={"file": (f"{model_id}.gguf", good, "application/octet-stream")})
    assert response.status_code == 200, response.text
    return model_id, good


def complete(staff: httpx.Client, model_id: str) -> httpx.Response:
    return staff.post("/v1/completions", json={"model": model_id, "prompt": "hello world", "max_tokens": 3,
                                               "temperature": 0})


def mark(model_id: str, node: str) -> ModelCopy | None:
    return ModelCopy.objects.filter(model_id=model_id, node__name=node, load_failed_at__isnull=False).first()


def runners_started(platform, model_id: str) -> int:
    return len(re.findall(rf"runner \d+ started for model {re.escape(model_id)} ", platform.worker.log()))


def assert_names_no_server_path(message: str) -> None:
    assert str(settings.DATA_DIR) not in message and str(settings.BASE_DIR) not in message
    assert "/" not in re.sub(r"/api/v1/\S+", "", message), message  # the API hint is the only path


def wait_for_heartbeats(node: str, count: int = 2) -> None:
    """Until the node's worker has heartbeated ``count`` more times (each beat rechecks its failures)."""
    seen = Node.objects.get(name=node).last_heartbeat
    for _ in range(count):
        devstack.wait_until(lambda: Node.objects.get(name=node).last_heartbeat > seen, timeout=15,
                            what=f"a heartbeat of {node}")
        seen = Node.objects.get(name=node).last_heartbeat


def test_a_model_whose_runner_aborts_loading_it_is_marked_failed_on_the_node_until_its_file_changes(
        platform, staff, tmp_path):
    model_id, good = upload_tiny(staff, tmp_path)
    path = settings.MODELS_DIR / f"{model_id}.gguf"
    tokens = tiny_tokens()
    tokens[-1] = tokens[-2]
    path.write_bytes(tiny_gguf(tmp_path / "broken.gguf", tokens=tokens).read_bytes())  # llama.cpp aborts on it

    first = complete(staff, model_id)
    assert first.status_code == 503, first.text
    error = first.json()["error"]
    assert error["code"] == "model_unavailable"
    assert f"Model {model_id} failed to load on node {platform.node}: its runner died while loading it, SIGABRT" \
        in error["message"]
    assert_names_no_server_path(error["message"])
    devstack.wait_until(lambda: mark(model_id, platform.node), timeout=10, what="the node's load-failure mark")
    copy = mark(model_id, platform.node)
    assert "SIGABRT" in copy.load_error and copy.load_failed_file["size"] == path.stat().st_size
    devstack.wait_until(lambda: model_id not in Node.objects.get(name=platform.node).loaded_models, timeout=10,
                        what="the heartbeat to drop the failed model")

    again = complete(staff, model_id)  # the gateway itself refuses: the node is not asked again
    assert again.status_code == 503 and again.json()["error"]["code"] == "model_unavailable"
    assert again.json()["error"]["message"].startswith(
        f"The model '{model_id}' cannot be served right now: it failed to load on node {platform.node}: ")
    assert f"/api/v1/registry/{model_id}/clear-load-failures/" in again.json()["error"]["message"]
    assert_names_no_server_path(again.json()["error"]["message"])
    assert runners_started(platform, model_id) == 1
    held = {entry["model"]: entry for entry in staff.get(f"/api/v1/nodes/{platform.node}/cache").json()["held"]}
    assert "SIGABRT" in held[model_id]["load_error"] and held[model_id]["load_failed_at"]

    path.write_bytes(good)  # a new file: the node's next heartbeat sees it and clears the mark
    devstack.wait_until(lambda: mark(model_id, platform.node) is None, timeout=15, what="the mark to clear")
    answer = complete(staff, model_id)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1
    assert runners_started(platform, model_id) == 2
    staff.delete(f"/api/v1/models/{model_id}")


def test_a_model_llama_cpp_refuses_on_the_node_stays_off_it_until_staff_clear_the_mark(
        platform, staff, member, tmp_path):
    model_id, good = upload_tiny(staff, tmp_path)
    path = settings.MODELS_DIR / f"{model_id}.gguf"
    path.write_bytes(good.replace(ARCHITECTURE_VALUE, ARCHITECTURE_VALUE[:-1] + b"x", 1))  # an unknown architecture
    broken = path.stat()

    first = complete(staff, model_id)
    assert first.status_code == 503 and first.json()["error"]["code"] == "model_unavailable", first.text
    assert_names_no_server_path(first.json()["error"]["message"])
    devstack.wait_until(lambda: mark(model_id, platform.node), timeout=10, what="the node's load-failure mark")
    assert "could not be loaded" in mark(model_id, platform.node).load_error

    path.write_bytes(good)  # repaired in place, with the broken file's size and mtime: nothing the node can see
    os.utime(path, ns=(broken.st_atime_ns, broken.st_mtime_ns))
    wait_for_heartbeats(platform.node)
    assert mark(model_id, platform.node) is not None
    assert complete(staff, model_id).status_code == 503

    refused = member.post(f"/api/v1/registry/{model_id}/clear-load-failures/", json={})
    assert refused.status_code == 403
    cleared = staff.post(f"/api/v1/registry/{model_id}/clear-load-failures/", json={"node": platform.node})
    assert cleared.status_code == 200 and cleared.json() == {"model": model_id, "cleared": [platform.node]}
    assert mark(model_id, platform.node) is None
    started = time.monotonic()
    answer = complete(staff, model_id)
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - started < 30
    staff.delete(f"/api/v1/models/{model_id}")


def test_the_gateway_skips_nodes_where_the_model_failed_to_load_and_answers_503_when_none_is_left(make_node):
    model = RegisteredModel.objects.create(id=f"choice-{uuid.uuid4().hex[:8]}", source="upload", file_name="x.gguf")
    first, second = make_node("first"), make_node("second")
    nodes = list(Node.objects.filter(pk__in=[first.pk, second.pk]))
    try:
        model_load_failure_record(model_id=model.id, node_name=first.name, file={"size": 1, "mtime_ns": 2},
                                  error="its runner died while loading it, SIGABRT")
        placement = asyncio.run(node_choose(model, nodes))
        assert placement.node.name == second.name and f"{first.name} failed to load it" in placement.reason

        model_load_failure_record(model_id=model.id, node_name=second.name, file={"size": 1, "mtime_ns": 2},
                                  error="model x could not be loaded: llama.cpp could not load x.gguf")
        with pytest.raises(OpenAIError) as caught:
            asyncio.run(node_choose(model, nodes))
        assert (caught.value.status, caught.value.code) == (503, "model_unavailable")
        assert f"on node {first.name}: its runner died while loading it, SIGABRT" in caught.value.message
        assert f"on node {second.name}: model x could not be loaded" in caught.value.message

        assert model_load_failure_clear(model_id=model.id, node_name=first.name) == [first.name]
        assert asyncio.run(node_choose(model, nodes)).node.name == first.name
    finally:
        model.delete()


def test_staff_see_and_clear_a_load_failure_in_the_admin(make_node):
    model = RegisteredModel.objects.create(id=f"admin-{uuid.uuid4().hex[:8]}", source="upload", file_name="x.gguf")
    node = make_node("admin")
    try:
        model_load_failure_record(model_id=model.id, node_name=node.name, file={"size": 1, "mtime_ns": 2},
                                  error="its runner died while loading it, SIGABRT")
        admin = Client()
        admin.force_login(get_user_model().objects.create_superuser(f"admin-{uuid.uuid4().hex[:6]}", password="x"))
        page = admin.get("/admin/llm_models/modelcopy/", {"load_failed": "yes"})
        assert page.status_code == 200
        assert model.id in page.content.decode() and "SIGABRT" in page.content.decode()
        copy = ModelCopy.objects.get(model=model, node=node)
        done = admin.post("/admin/llm_models/modelcopy/", {"action": "clear_load_failure",
                                                           "_selected_action": [copy.pk]}, follow=True)
        assert done.status_code == 200 and "Cleared 1 load-failure mark(s)." in done.content.decode()
        copy.refresh_from_db()
        assert (copy.load_failed_at, copy.load_error, copy.load_failed_file) == (None, "", {})
    finally:
        model.delete()
