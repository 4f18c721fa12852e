"""Legacy completions (logprobs, stream, token-id prompts), /v1/models and /health with partial coverage."""

from __future__ import annotations

from tests.gateway.fakes import MODEL_ID, NUM_BLOCKS, parse_sse


async def test_completion_logprobs_and_token_prompt(client):
    r = await client.post(
        "/v1/completions", json={"model": MODEL_ID, "prompt": [1, 2, 3, 4], "max_tokens": 3, "logprobs": 2,
                                 "temperature": 0},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(len(top) <= 2 for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0


async def test_completion_stream_with_usage_and_stop(client):
    plain = (await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "abc", "max_tokens": 10,
                                                        "temperature": 0})).json()  # fmt: skip
    full = plain["choices"][0]["text"]
    stop = full[3:6]
    r = await client.post(
        "/v1/completions",
        json={"model": MODEL_ID, "prompt": ["abc"], "max_tokens": 10, "temperature": 0, "stop": stop,
              "stream": True, "stream_options": {"include_usage": True}},
    )  # fmt: skip
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens"] > 0
    text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
    assert text == full[: full.index(stop)]
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]] == ["stop"]


async def test_models_list_only_complete(client, fake_swarm):
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == [MODEL_ID]
    health = (await client.get("/health")).json()
    assert health["status"] == "ok" and health["models"][MODEL_ID]["complete"] is True
    fake_swarm.missing = [NUM_BLOCKS - 1]
    assert (await client.get("/v1/models")).json()["data"] == []
    assert (await client.get(f"/v1/models/{MODEL_ID}")).status_code == 404
    health = await client.get("/health")
    assert health.status_code == 200 and health.json()["models"][MODEL_ID]["missing"] == [NUM_BLOCKS - 1]


async def test_lifespan_shuts_the_client_down(make_client, settings, fake_swarm):
    async with make_client(settings):
        pass
    assert fake_swarm.shut_down
