"""Calibration through the real worker: loading and generating record what the node measured."""

from __future__ import annotations

import pytest

from apps.fit.models import FitMeasurement
from llmplatform import devstack

pytestmark = pytest.mark.live


def test_a_real_generation_makes_the_nodes_estimate_measured(platform, http, model_id):
    reply = http.post("/v1/completions", json={"model": model_id, "prompt": "List the numbers from 1 to 50:",
                                               "max_tokens": 24, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 8

    def measured():
        row = FitMeasurement.objects.filter(node__name=platform.node, model_id=model_id).first()
        return row if row and row.tokens_per_second and row.memory_bytes else None

    devstack.wait_until(lambda: measured() is not None, timeout=30, what="the worker's fit measurement")
    row = measured()
    assert row.tokens_per_second > 1 and row.memory_bytes > 0
    fit = http.get(f"/api/v1/nodes/{platform.node}/models/{model_id}").json()["models"]
    mine = next(r for r in fit if r["name"] == model_id)
    assert mine["estimate_source"] == "measured" and set(mine["measured"]) == {"memory", "tps"}
    assert mine["estimated_tps"] == round(row.tokens_per_second, 1)
