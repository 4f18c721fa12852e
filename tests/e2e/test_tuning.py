"""Prompt tuning through a real loopback swarm (a tiny Llama over two servers, 0:2 and 2:4): the gradients that
come back for the prompts equal transformers' on the same model with the prompts prepended via inputs_embeds;
a few dozen Adam steps teach a fixed answer; generation and saved prompts honour what was trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.model import AutoDistributedModelForCausalLM
from swarm.tuning import IGNORE_INDEX, causal_lm_loss
from tests.helpers import make_tiny_model, reference_model

K = 8
ANSWER = [70, 71, 72, 73]


def make_tunable_tiny_llama(folder: Path) -> Path:
    """The tiny random Llama with larger block and head weights: at the default init (std 0.02) its logits are
    nearly uniform whatever the hidden states, so no prompt could move the loss much."""
    make_tiny_model("llama", folder)
    model = reference_model(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(5)
            elif name == "lm_head.weight":
                param.mul_(50)
    model.save_pretrained(folder)
    return folder


def local_greedy(reference, prompts: torch.Tensor, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy continuation with the prompts prepended via inputs_embeds (no cache, full recompute)."""
    tokens = input_ids
    with torch.inference_mode():
        for _ in range(new_tokens):
            embeds = reference.get_input_embeddings()(tokens)  # [B, S, D]
            inputs_embeds = torch.cat([prompts.expand(tokens.shape[0], -1, -1), embeds], dim=1)
            next_ids = reference(inputs_embeds=inputs_embeds).logits[:, -1].argmax(-1)  # [B]
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
    return tokens


def task(batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four random 'question' tokens, then the fixed answer; the loss counts the answer only."""
    questions = torch.randint(4, 64, (batch, 4), generator=torch.Generator().manual_seed(seed))
    input_ids = torch.cat([questions, torch.tensor([ANSWER]).expand(batch, -1)], dim=1)  # [B, 8]
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return input_ids, labels


def train(model, parameters: list[torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """30 Adam steps (lr 0.03) on the task through the swarm; the loss of each step."""
    optimizer = torch.optim.Adam(parameters, lr=0.03)
    losses = []
    for _ in range(30):
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tunable_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-tunable")


@pytest.fixture(scope="module")
def swarm(local_swarm, folder):
    servers = [local_swarm.start_server(str(folder), span, wait=False) for span in ("0:2", "2:4")]
    for server in servers:
        local_swarm.wait_ready(server)
    return local_swarm


@pytest.fixture
def model(swarm, folder):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, tuning_mode="ptune", pre_seq_len=K
    )
    yield model
    model.shutdown()


def test_prompt_gradients_match_local(model, folder):
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["tuning.prompts"]
    input_ids, labels = task(batch=3)
    out = model(input_ids, labels=labels)
    out.loss.backward()
    assert [(hop.start, hop.end) for hop in model._loop.run(model.client.route(model.model_id))] == [(0, 2), (2, 4)]

    reference = reference_model(folder).requires_grad_(False)
    prompts = model.tuning.prompts.detach().clone().requires_grad_(True)
    embeds = reference.get_input_embeddings()(input_ids)  # [B, S, D]
    inputs_embeds = torch.cat([prompts.expand(input_ids.shape[0], -1, -1), embeds], dim=1)  # [B, K + S, D]
    logits = reference(inputs_embeds=inputs_embeds).logits[:, K:]
    loss = causal_lm_loss(logits, labels)
    loss.backward()

    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)
    assert prompts.grad.abs().max() > 0
    # Float32 sums in another order (our blocks vs transformers'): compare at the gradient's own scale.
    scale = prompts.grad.abs().max().item()
    torch.testing.assert_close(model.tuning.prompts.grad, prompts.grad, atol=1e-5 * scale, rtol=1e-4)


def test_training_lowers_the_loss_and_generation_uses_the_prompts(model, swarm, folder, tmp_path):
    input_ids, labels = task()
    head_before = model.head.lm_head.weight.clone()
    losses = train(model, [p for p in model.parameters() if p.requires_grad], input_ids, labels)
    print("losses:", [round(x, 3) for x in losses])
    assert losses[-1] < losses[0] / 2
    assert torch.equal(model.head.lm_head.weight, head_before)  # frozen

    questions = input_ids[:3, :4]
    generated = model.generate(questions, max_new_tokens=len(ANSWER), eos_token_id=[])
    assert generated[:, 4:].tolist() == [ANSWER] * 3
    unseen = task(batch=2, seed=1)[0][:, :4]
    assert (
        model.generate(unseen, max_new_tokens=6, eos_token_id=[]).tolist()
        == local_greedy(reference_model(folder), model.tuning.prompts.detach(), unseen, 6).tolist()
    )

    path = tmp_path / "prompts.safetensors"
    model.tuning.save(path)
    loaded = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, tuning_mode="ptune", prompts_path=path
    )
    try:
        torch.testing.assert_close(loaded.tuning.prompts, model.tuning.prompts.detach())
        assert loaded.generate(questions, max_new_tokens=len(ANSWER), eos_token_id=[]).tolist() == generated.tolist()
        assert loaded(input_ids, labels=labels).loss.item() < losses[0] / 2
    finally:
        loaded.shutdown()
