"""The /v1 endpoints through the official openai client, against the real platform processes."""

from __future__ import annotations

import base64
import math
import struct
import uuid

import openai
import pytest

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
PROMPT = "The three primary colours are"


def test_models_lists_the_bundled_model(client, model_id):
    models = client.models.list()
    assert model_id in [m.id for m in models.data]
    assert client.models.retrieve(model_id).id == model_id


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_chat_completion_answers_with_usage(client, model_id):
    reply = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = ""
    for chunk in chunks:
        if chunk.choices:
            choice = chunk.choices[0]
            text += (choice.delta.content or "") if hasattr(choice, "delta") else choice.text
    return text, chunks


def test_streamed_chat_equals_the_unstreamed_answer_at_temperature_zero(client, model_id):
    args = dict(model=model_id, messages=CHAT, max_tokens=40, temperature=0, seed=7)
    whole = client.chat.completions.create(**args)
    text, chunks = _stream_text(client.chat.completions.create(**args, stream=True,
                                                               stream_options={"include_usage": True}))
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_equals_the_unstreamed_one_with_a_seed(client, model_id):
    args = dict(model=model_id, prompt=PROMPT, max_tokens=30, temperature=0.8, top_p=0.9, seed=1234)
    whole = client.completions.create(**args)
    text, chunks = _stream_text(client.completions.create(**args, stream=True))
    assert whole.object == "text_completion"
    assert text == whole.choices[0].text
    assert all(chunk.usage is None for chunk in chunks)
    again = client.completions.create(**args)
    assert again.choices[0].text == whole.choices[0].text


def test_max_tokens_ends_the_answer_with_length(client, model_id):
    reply = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_a_stop_sequence_cuts_the_answer_before_it(client, model_id):
    args = dict(model=model_id, prompt="Count: 1, 2, 3, 4,", max_tokens=30, temperature=0)
    free = client.completions.create(**args).choices[0].text
    stop = free[len(free) // 3: len(free) // 3 + 3]
    assert stop.strip(), f"the free answer {free!r} is too short to pick a stop sequence"
    cut = client.completions.create(**args, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed, _ = _stream_text(client.completions.create(**args, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_embeddings_give_one_normalised_vector_per_input(client, model_id):
    single = client.embeddings.create(model=model_id, input="the sea is blue")
    batch = client.embeddings.create(model=model_id, input=["the sea is blue", "tax returns are due"])
    assert len(single.data) == 1 and len(batch.data) == 2
    assert [item.index for item in batch.data] == [0, 1]
    vector = single.data[0].embedding
    assert len(vector) > 100
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-3)
    assert batch.data[0].embedding == pytest.approx(vector, abs=1e-4)
    assert batch.data[1].embedding != pytest.approx(vector, abs=1e-2)
    assert single.usage.prompt_tokens > 0
    assert batch.usage.prompt_tokens > single.usage.prompt_tokens
    assert batch.usage.total_tokens == batch.usage.prompt_tokens


def test_embeddings_as_floats_match_the_base64_encoding(http, model_id):
    floats = http.post("/v1/embeddings", json={"model": model_id, "input": "hello", "encoding_format": "float"})
    packed = http.post("/v1/embeddings", json={"model": model_id, "input": "hello", "encoding_format": "base64"})
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(floats.json()["data"][0]["embedding"], abs=1e-6)


def _worker_finished(request_id: str) -> bool:
    """Whether the worker has written the end of this request's stream yet."""
    import redis
    from django.conf import settings

    from workers import protocol

    entries = redis.Redis.from_url(settings.REDIS_URL).xrange(
        protocol.stream_key(settings.LLMP_REDIS_PREFIX, uuid.UUID(request_id).hex))
    return any(protocol.decode(fields)[0] == protocol.EVENT_DONE for _, fields in entries)


def test_two_streams_run_side_by_side(client, model_id):
    short_args = dict(model=model_id, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
                      temperature=0)
    expected_short = client.chat.completions.create(**short_args).choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(
        model=model_id, max_tokens=400, temperature=0.7, seed=11, stream=True,
        messages=[{"role": "user", "content": "Tell me a long story."}])
    long_id = raw.headers["X-Request-Id"]
    long_chunks = iter(raw.parse())
    assert next(long_chunks).choices[0].delta.role == "assistant"
    short_text, _ = _stream_text(client.chat.completions.create(**short_args, stream=True))
    # The short stream ran start to finish while the worker was still generating the long one.
    assert not _worker_finished(long_id)
    rest = list(long_chunks)
    assert short_text == expected_short
    assert len([c for c in rest if c.choices and c.choices[0].delta.content]) > 50
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
