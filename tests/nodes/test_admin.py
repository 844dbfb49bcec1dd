"""The node admin: status column and filter, maintenance actions, metrics pages."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.nodes.models import Node


@pytest.fixture
def admin_client() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_superuser(f"nodeadmin-{uuid.uuid4().hex[:6]}", password="x"))
    return client


@pytest.mark.parametrize("url", ["/admin/nodes/node/", "/admin/nodes/node/?status=degraded&cordoned__exact=1",
                                 "/admin/nodes/node/?status=unhealthy", "/admin/nodes/nodemetric/"])
def test_every_node_admin_page_opens(admin_client, url):
    assert admin_client.get(url).status_code == 200


def test_the_admin_shows_status_and_cordons_and_uncordons(admin_client, make_node):
    node = make_node("admin")
    reply = admin_client.get("/admin/nodes/node/", {"q": node.name})
    assert [(row.name, row.current_status) for row in reply.context["cl"].result_list] == [(node.name, "online")]
    assert '<td class="field-node_status">online</td>' in reply.content.decode()
    admin_client.post("/admin/nodes/node/", {"action": "cordon", "_selected_action": [node.pk]})
    assert Node.objects.get(pk=node.pk).cordoned
    admin_client.post("/admin/nodes/node/", {"action": "uncordon", "_selected_action": [node.pk]})
    assert not Node.objects.get(pk=node.pk).cordoned


def test_the_admin_shows_and_filters_an_unhealthy_node_with_its_self_test_error(admin_client, make_node):
    error = "the test decode of m.gguf crashed with SIGSEGV while decoding after 0.9 s"
    sick, well = make_node("adminsick", health_error=error), make_node("adminwell")
    listed = admin_client.get("/admin/nodes/node/", {"status": "unhealthy"}).context["cl"].result_list
    assert sick.name in [row.name for row in listed] and well.name not in [row.name for row in listed]
    page = admin_client.get("/admin/nodes/node/", {"q": sick.name}).content.decode()
    assert '<td class="field-node_status">unhealthy</td>' in page and error in page
    assert error in admin_client.get(f"/admin/nodes/node/{sick.pk}/change/").content.decode()
