"""Chat completions through the ASGI app with a fake swarm: streaming, n, stops, seeds, logprobs, usage."""

from __future__ import annotations

from tests.gateway.fakes import MODEL_ID, parse_sse

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


async def chat(client, **fields):
    body = {"model": MODEL_ID, "messages": MESSAGES, **fields}
    return await client.post("/v1/chat/completions", json=body)


def stream_text(events: list, index: int = 0) -> str:
    return "".join(
        c["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict)
        for c in e.get("choices", [])
        if c["index"] == index
    )


async def test_non_streamed_shape_and_usage(client, fake_swarm):
    r = await chat(client, max_tokens=8, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    session = fake_swarm.sessions[0]
    assert session.closed and session.batch_size == 1
    assert session.max_length == body["usage"]["prompt_tokens"] + 8
    assert r.headers["x-request-id"]


async def test_streamed_equals_non_streamed_greedy(client):
    plain = (await chat(client, max_tokens=12, temperature=0)).json()
    r = await chat(client, max_tokens=12, temperature=0, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    first = events[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream_text(events) == plain["choices"][0]["message"]["content"]
    finals = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert [c["finish_reason"] for c in finals] == ["length"] and finals[0]["delta"] == {}
    assert all("usage" not in e or e["usage"] is None for e in events[:-1])


async def test_include_usage_chunk(client):
    r = await chat(client, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True})
    events = parse_sse(r.text)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5


async def test_n_runs_as_one_batched_session(client, fake_swarm):
    r = await chat(client, max_tokens=6, n=3, temperature=1.0, seed=7)
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len(fake_swarm.sessions) == 1 and fake_swarm.sessions[0].batch_size == 3
    assert body["usage"]["completion_tokens"] == sum(1 for _ in range(3)) * 6
    r = await chat(client, max_tokens=6, n=3, temperature=1.0, seed=7, stream=True)
    events = parse_sse(r.text)
    for i in range(3):
        assert stream_text(events, i) == body["choices"][i]["message"]["content"]


async def test_seed_determinism(client):
    a = (await chat(client, max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123)).json()
    b = (await chat(client, max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123)).json()
    c = (await chat(client, max_tokens=10, temperature=1.5, seed=124)).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert c["choices"][0]["message"] != a["choices"][0]["message"]


async def test_stop_strings_never_in_output(client):
    full = (await chat(client, max_tokens=20, temperature=0)).json()["choices"][0]["message"]["content"]
    assert len(full) > 10
    # A stop string that starts inside one token and ends in a later one.
    stop = full[5:12]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        r = await chat(client, max_tokens=20, temperature=0, stop=[stop, "\x00never"], stream=stream)
        if stream:
            events = parse_sse(r.text)
            text = stream_text(events)
            reasons = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        else:
            choice = r.json()["choices"][0]
            text, reasons = choice["message"]["content"], [choice["finish_reason"]]
        assert text == expected and stop not in text
        assert reasons == ["stop"]


async def test_eos_finishes_with_stop(client):
    r = await chat(client, max_tokens=10, temperature=0, logit_bias={"2": 100})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 1


async def test_logprobs_shape(client):
    r = await chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0 and isinstance(entry["bytes"], list)
        assert len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert abs(entry["top_logprobs"][0]["logprob"] - entry["logprob"]) < 1e-5
    r = await chat(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2, stream=True)
    events = parse_sse(r.text)
    entries = [x for e in events[:-1] for c in e["choices"] if c.get("logprobs") for x in c["logprobs"]["content"]]
    assert [e["token"] for e in entries] == [e["token"] for e in content[:3]]


async def test_penalties_and_content_parts(client):
    messages = [
        {"role": "developer", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    r = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL_ID, "messages": messages, "max_tokens": 8, "frequency_penalty": 2.0,
              "presence_penalty": 1.0, "temperature": 0, "some_unknown_field": {"a": 1}, "user": "u1"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
