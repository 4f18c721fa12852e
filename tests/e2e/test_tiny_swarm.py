"""Tiny random-weight Llama (grouped-query attention) and Qwen2 (qkv bias) models, each split over two real
server processes in one swarm: distributed results equal the same model run locally."""

from __future__ import annotations

import pytest
import torch

from swarm.model import AutoDistributedModelForCausalLM
from tests.helpers import make_tiny_model, reference_model

KINDS = ("llama", "qwen2")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return {kind: make_tiny_model(kind, tmp_path_factory.mktemp("models") / f"tiny-{kind}") for kind in KINDS}


@pytest.fixture(scope="module")
def swarm(local_swarm, tiny_models):
    servers = [local_swarm.start_server(str(folder), span, wait=False)
               for folder in tiny_models.values() for span in ("0:2", "2:4")]  # fmt: skip
    for server in servers:
        local_swarm.wait_ready(server)
    return local_swarm


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_matches_local(swarm, tiny_models, kind):
    folder = tiny_models[kind]
    model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
    reference = reference_model(folder)
    try:
        input_ids = torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=1e-5, rtol=1e-4)
            ours = model.generate(input_ids, max_new_tokens=12, eos_token_id=[])
            theirs = reference.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
            )
        assert ours.tolist() == theirs.tolist()
        route = model._loop.run(model.client.route(model.model_id))
        assert [(hop.start, hop.end) for hop in route] == [(0, 2), (2, 4)]
    finally:
        model.shutdown()
