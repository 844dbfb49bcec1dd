"""What request history keeps of bodies: LLMP_REQUEST_LOG_BODIES = full, redacted or metadata."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync

from apps.gateway.history import RequestRecord
from apps.gateway.models import RequestLog, RequestStatus
from llmplatform.env import ImproperlyConfiguredEnv, env_choice

BODY = {"model": "m", "max_tokens": 8, "temperature": 0.5,
        "messages": [{"role": "system", "content": "secret system prompt"},
                     {"role": "user", "content": [{"type": "text", "text": "my password is hunter2"}]}]}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "usage": {"prompt_tokens": 9, "completion_tokens": 3},
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hunter2 noted", "refusal": None},
                       "finish_reason": "stop"}]}


def record(body: dict, answer: dict) -> RequestLog:
    async def go() -> RequestRecord:
        rec = RequestRecord(method="POST", path="/v1/chat/completions")
        rec.open(model="m", node="n", stream=False, request_body=body)
        rec.close(status=RequestStatus.SUCCEEDED, status_code=200, response_body=answer)
        await rec.written()
        return rec

    return RequestLog.objects.get(pk=async_to_sync(go)().id)


def test_full_keeps_bodies_as_sent_and_answered(settings):
    settings.LLMP_REQUEST_LOG_BODIES = "full"
    row = record(BODY, ANSWER)
    assert row.request_body == BODY and row.response_body == ANSWER


def test_redacted_keeps_the_shape_and_lengths_but_none_of_the_text(settings):
    settings.LLMP_REQUEST_LOG_BODIES = "redacted"
    row = record(BODY, ANSWER)
    assert "hunter2" not in str(row.request_body) + str(row.response_body)
    assert "secret system prompt" not in str(row.request_body)
    assert row.request_body["max_tokens"] == 8 and row.request_body["messages"][0] == {
        "role": "system", "content": "[20 characters]"}
    assert row.request_body["messages"][1]["content"] == [{"type": "text", "text": "[22 characters]"}]
    assert row.response_body["choices"][0]["message"]["content"] == "[13 characters]"
    assert row.response_body["usage"] == ANSWER["usage"]


def test_metadata_keeps_parameters_and_usage_only(settings):
    settings.LLMP_REQUEST_LOG_BODIES = "metadata"
    row = record(BODY, ANSWER)
    assert row.request_body == {"model": "m", "max_tokens": 8, "temperature": 0.5}
    assert "content" not in row.response_body["choices"][0]["message"]
    assert row.response_body["choices"][0]["finish_reason"] == "stop" and row.response_body["usage"]


def test_an_unknown_policy_stops_start_up(monkeypatch):
    monkeypatch.setenv("LLMP_REQUEST_LOG_BODIES", "some")
    with pytest.raises(ImproperlyConfiguredEnv, match="full, redacted, metadata"):
        env_choice("LLMP_REQUEST_LOG_BODIES", "full", ("full", "redacted", "metadata"))
