"""Model variants as their own model ids: ``MODEL:NAME`` for tuned prompts the gateway holds (``--prompts``) and
for LoRA adapters that servers announce; listed in /v1/models and used by the sessions of requests naming them."""

from __future__ import annotations

import pytest
import torch

from gateway.settings import GatewaySettings
from swarm.records import RemoteServer, ServerRecord, ServerState
from swarm.tuning import DeepPromptTuning, PromptTuning
from tests.gateway.fakes import HIDDEN, MODEL_ID, NUM_BLOCKS


def announce(fake_swarm, *spans: tuple[int, int, list[str]]) -> None:
    fake_swarm.servers = [
        RemoteServer(f"peer{i}", ServerRecord(model_id=MODEL_ID, start=s, end=e, state=ServerState.ONLINE, adapters=a))
        for i, (s, e, a) in enumerate(spans)
    ]


async def complete(client, model: str) -> dict:
    r = await client.post("/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 4,
                                                   "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


async def test_prompt_variants_prepend_their_prompts(make_client, settings, fake_swarm, tmp_path):
    PromptTuning(torch.randn(3, HIDDEN) * 5).save(tmp_path / "p.safetensors")
    DeepPromptTuning(torch.randn(2, HIDDEN), torch.randn(NUM_BLOCKS, 2, HIDDEN)).save(tmp_path / "d.safetensors")
    options = [f"shallow={tmp_path / 'p.safetensors'}", f"deep={tmp_path / 'd.safetensors'}"]
    async with make_client(settings.model_copy(update={"prompts": options})) as client:
        ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        assert ids == [MODEL_ID, f"{MODEL_ID}:shallow", f"{MODEL_ID}:deep"]
        base = await complete(client, MODEL_ID)
        shallow = await complete(client, f"{MODEL_ID}:shallow")
        await complete(client, f"{MODEL_ID}:deep")
        assert shallow["model"] == f"{MODEL_ID}:shallow"
        assert (await client.get(f"/v1/models/{MODEL_ID}:deep")).json()["id"] == f"{MODEL_ID}:deep"
    plain, with_prompts, with_deep = fake_swarm.sessions
    assert (plain.first_length, with_prompts.first_length, with_deep.first_length) == (3, 6, 5)
    assert plain.extras is None and with_prompts.extras is None
    assert with_deep.extras.spec.prompts == 2 and with_deep.extras.tensors[0].shape == (NUM_BLOCKS, 2, HIDDEN)
    # (the fake swarm mixes no positions, so the answer itself cannot show the prompts: the e2e test does)
    assert shallow["usage"]["prompt_tokens"] == base["usage"]["prompt_tokens"] == 3  # the user's tokens only


def test_prompts_option_is_checked():
    with pytest.raises(ValueError, match="NAME=PATH"):
        GatewaySettings(prompts=["no-path"])


async def test_adapter_variants_follow_what_servers_announce(client, fake_swarm):
    # "mine" is on servers covering every block; "partial" only on blocks 0:2
    announce(fake_swarm, (0, 2, ["mine", "partial"]), (2, 4, ["mine"]), (0, 4, []))
    ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert ids == [MODEL_ID, f"{MODEL_ID}:mine"]
    assert (await client.get(f"/v1/models/{MODEL_ID}:mine")).status_code == 200
    missing = await client.get(f"/v1/models/{MODEL_ID}:partial")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    await complete(client, f"{MODEL_ID}:mine")
    assert fake_swarm.sessions[-1].adapter == "mine"
    await complete(client, MODEL_ID)
    assert fake_swarm.sessions[-1].adapter is None
