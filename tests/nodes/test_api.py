"""The node API: status, detail by id or name, cordon and uncordon, delete."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from apps.nodes.models import Node, NodeMetric
from apps.nodes.selectors import node_list_live, node_list_unhealthy, node_list_with_status
from apps.nodes.services import node_heartbeat_record, node_register


def test_a_node_is_found_by_its_id_and_by_its_name(member, make_node):
    node = make_node("detail")
    by_id = member.get(f"/api/v1/nodes/{node.id}/")
    by_name = member.get(f"/api/v1/nodes/{node.name}/")
    assert by_id.status_code == by_name.status_code == 200
    assert by_id.json() == by_name.json()
    assert by_id.json()["name"] == node.name and by_id.json()["status"] == "online"


def test_an_unknown_node_is_a_404_in_the_management_error_shape(member):
    reply = member.get("/api/v1/nodes/999999999/")
    assert reply.status_code == 404 and set(reply.json()) == {"error"}


def test_a_node_named_by_digits_int_cannot_read_is_a_404(member):
    reply = member.get("/api/v1/nodes/\u00b2/")  # "²".isdigit(), but int("²") fails
    assert reply.status_code == 404 and set(reply.json()) == {"error"}


def test_statuses_follow_the_age_of_the_last_heartbeat_and_can_be_filtered(member, make_node):
    online, degraded, offline = make_node("on"), make_node("deg"), make_node("off")
    # The test session beats every second: degraded after 3 s, offline after 20 s (the defaults).
    assert (settings.LLMP_NODE_DEGRADED_SECONDS, settings.LLMP_NODE_OFFLINE_SECONDS) == (3.0, 20.0)
    now = timezone.now()
    Node.objects.filter(pk=degraded.pk).update(last_heartbeat=now - timedelta(seconds=8))
    Node.objects.filter(pk=offline.pk).update(last_heartbeat=now - timedelta(seconds=60))
    node_heartbeat_record(name=online.name, loaded_models=[])
    statuses = dict(node_list_with_status().filter(pk__in=[online.pk, degraded.pk, offline.pk])
                    .values_list("name", "current_status"))
    assert statuses == {online.name: "online", degraded.name: "degraded", offline.name: "offline"}
    assert [Node.objects.get(pk=n.pk).status for n in (online, degraded, offline)] == ["online", "degraded", "offline"]
    listed = member.get("/api/v1/nodes/", params={"status": "degraded", "limit": 500}).json()["results"]
    assert degraded.name in [row["name"] for row in listed]
    assert not {online.name, offline.name} & {row["name"] for row in listed}
    assert member.get("/api/v1/nodes/", params={"status": "sleepy"}).status_code == 400


def test_a_node_that_failed_its_self_test_is_unhealthy_while_it_heartbeats_then_offline(member, make_node):
    error = "the test decode of m.gguf crashed with SIGSEGV while decoding after 0.9 s; restart the worker"
    sick, well = make_node("sick", health_error=error), make_node("well")
    assert Node.objects.get(pk=sick.pk).health_checked_at is not None
    node_heartbeat_record(name=sick.name, loaded_models=[])
    pks = [sick.pk, well.pk]
    assert dict(node_list_with_status().filter(pk__in=pks).values_list("name", "current_status")) == {
        sick.name: "unhealthy", well.name: "online"}
    assert Node.objects.get(pk=sick.pk).status == "unhealthy"
    assert list(node_list_live().filter(pk__in=pks)) == [well]
    assert list(node_list_unhealthy().filter(pk__in=pks)) == [sick]
    shown = member.get(f"/api/v1/nodes/{sick.name}/").json()
    assert (shown["status"], shown["placeable"], shown["health_error"]) == ("unhealthy", False, error)
    assert shown["health_detail"]["ok"] is False and shown["health_checked_at"]
    listed = member.get("/api/v1/nodes/", params={"status": "unhealthy", "limit": 500}).json()["results"]
    assert sick.name in [row["name"] for row in listed] and well.name not in [row["name"] for row in listed]
    # Its heartbeat stops: offline, like any other node.
    Node.objects.filter(pk=sick.pk).update(last_heartbeat=timezone.now() - timedelta(seconds=60))
    assert node_list_with_status().get(pk=sick.pk).current_status == Node.objects.get(pk=sick.pk).status == "offline"
    assert not node_list_unhealthy().filter(pk=sick.pk).exists()


def test_a_restart_that_passes_the_self_test_makes_the_node_healthy_again(make_node):
    sick = make_node("again", health_error="the test decode of m.gguf crashed with SIGSEGV")
    node_register(name=sick.name, hostname="h", gpu_index=None, hardware={},
                  health_detail={"tested": True, "ok": True, "elapsed_s": 0.9})
    again = Node.objects.get(pk=sick.pk)
    assert (again.status, again.health_error, again.health_detail["ok"]) == ("online", "", True)


def test_cordon_and_uncordon_a_whole_node(staff, make_node):
    node = make_node("cordon")
    cordoned = staff.post(f"/api/v1/nodes/{node.name}/cordon/")
    assert cordoned.status_code == 200
    assert (cordoned.json()["cordoned"], cordoned.json()["placeable"]) == (True, False)
    assert Node.objects.get(pk=node.pk).cordoned
    uncordoned = staff.post(f"/api/v1/nodes/{node.id}/uncordon/").json()
    assert (uncordoned["cordoned"], uncordoned["placeable"]) == (False, True)


def test_cordon_one_gpu_of_a_node_that_spans_two(staff, make_node):
    node = make_node("gpus", hardware={"gpus": [{"index": 0}, {"index": 1}]})
    reply = staff.post(f"/api/v1/nodes/{node.name}/cordon/", json={"gpus": [1]}).json()
    assert (reply["cordoned"], reply["cordoned_gpus"], reply["gpus"], reply["placeable"]) == (False, [1], [0, 1], False)
    reply = staff.post(f"/api/v1/nodes/{node.name}/uncordon/", json={"gpus": [1]}).json()
    assert (reply["cordoned_gpus"], reply["placeable"]) == ([], True)


def test_cordoning_a_gpu_the_node_does_not_use_is_a_400(staff, make_node):
    pinned = make_node("pinned", hardware={"gpus": [{"index": 0}, {"index": 1}]}, gpu_index=1)
    reply = staff.post(f"/api/v1/nodes/{pinned.name}/cordon/", json={"gpus": [0]})
    assert reply.status_code == 400 and "no GPU 0" in reply.json()["error"]
    cpu_only = make_node("cpu")
    assert staff.post(f"/api/v1/nodes/{cpu_only.name}/cordon/", json={"gpus": [0]}).status_code == 400
    assert staff.post(f"/api/v1/nodes/{cpu_only.name}/cordon/", json={"gpus": []}).status_code == 400
    assert staff.post(f"/api/v1/nodes/{cpu_only.name}/cordon/", json={"gpus": ["x"]}).status_code == 400
    assert not Node.objects.get(pk=cpu_only.pk).cordoned


def test_only_staff_may_cordon_drain_or_delete(member, make_node):
    node = make_node("guarded")
    for action in ("cordon", "uncordon", "drain"):
        assert member.post(f"/api/v1/nodes/{node.name}/{action}/").status_code == 403
    assert member.delete(f"/api/v1/nodes/{node.name}/").status_code == 403
    assert Node.objects.filter(pk=node.pk, cordoned=False).exists()


def test_deleting_a_node_removes_it_with_its_metrics(staff, make_node):
    node = make_node("doomed")
    NodeMetric.objects.create(node=node, recorded_at=timezone.now())
    assert staff.delete(f"/api/v1/nodes/{node.name}/").status_code == 204
    assert staff.get(f"/api/v1/nodes/{node.id}/").status_code == 404
    assert not NodeMetric.objects.filter(node_id=node.id).exists()


def test_a_live_node_that_is_deleted_comes_back_with_its_next_heartbeat(staff, platform):
    from llmplatform import devstack

    before = Node.objects.get(name=platform.node)
    assert staff.delete(f"/api/v1/nodes/{platform.node}/").status_code == 204
    devstack.wait_until(lambda: Node.objects.filter(name=platform.node).exists(), timeout=10,
                        what="the worker to register its node again")
    back = Node.objects.get(name=platform.node)
    assert back.pk != before.pk and back.hardware == before.hardware and back.queue == before.queue
    assert staff.get(f"/api/v1/nodes/{platform.node}/").json()["status"] == "online"
