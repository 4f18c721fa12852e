"""Deep prompt tuning, client-side LoRA and serving what was tuned, on one real loopback swarm: a tiny Llama over
servers 0:2 and 2:4 (both serving LoRA adapter "mine") and 1:3 (no adapter), so every route has several hops.

- gradients for the inputs, the deep prompts and the LoRA factors equal the same model computed locally
  (transformers with the prompts hooked in; peft with the adapter we saved in PEFT format); sessions carry the
  tensors, so generation matches too; malformed trainables are refused with a structured error;
- sessions naming the adapter run only on servers announcing it and give the greedy tokens of the local model with
  the adapter merged by peft; sessions without it give the base model's;
- a few dozen prompt-tuning steps through the swarm lower the loss and change the greedy answer; the real gateway
  then lists ``MODEL:answer`` (the saved prompts, ``--prompts``) and ``MODEL:mine`` and answers with them.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from swarm.client import ClientConfig, SwarmClient
from swarm.errors import BadRequestError
from swarm.head import ModelHead
from swarm.lora import LoraTuning
from swarm.messages import LORA_TARGETS, LoraSpec, TuningSpec
from swarm.model import AutoDistributedModelForCausalLM
from swarm.routing import Hop
from swarm.span_call import call_backward, call_forward
from swarm.span_tensors import SpanTensors
from swarm.tuning import causal_lm_loss
from swarm.weights import resolve_model
from tests.e2e.client_calls import greedy_session, server_info
from tests.e2e.gateway_process import running_gateway
from tests.e2e.test_tuning import ANSWER, make_tunable_tiny_llama, task, train
from tests.helpers import MODEL_CACHE, reference_model
from tests.tuning_reference import deep_prompts_added, peft_factor_grads, peft_model

K = 4
MAX_RANK = 8
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tunable_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-deep")


@pytest.fixture(scope="module")
def adapter(folder, tmp_path_factory) -> Path:
    """A LoRA adapter on q/v/down with non-zero B, saved in PEFT format by ``LoraTuning.save_pretrained``."""
    spec = resolve_model(str(folder), MODEL_CACHE).spec
    lora = LoraTuning.create(spec, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), seed=5)
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_(0, 0.3, generator=torch.Generator().manual_seed(6))
    path = tmp_path_factory.mktemp("adapters") / "mine"
    lora.save_pretrained(path, base_model=str(folder))
    return path


@pytest.fixture(scope="module")
def servers(local_swarm, folder, adapter):
    # (a batch wait makes concurrent sessions' steps share forwards even on a busy machine)
    limits = ("--max-lora-rank", str(MAX_RANK), "--max-prompt-tokens", "16", "--batch-wait-ms", "50")
    with_adapter = ("--adapters", f"mine={adapter}")
    children = [
        local_swarm.start_server(str(folder), "0:2", *limits, *with_adapter, wait=False),
        local_swarm.start_server(str(folder), "2:4", *limits, *with_adapter, wait=False),
        local_swarm.start_server(str(folder), "1:3", *limits, wait=False),
    ]
    for child in children:
        local_swarm.wait_ready(child)
    return children


@pytest.fixture(scope="module")
def swarm(local_swarm, servers):
    return local_swarm


def open_model(swarm, folder, mode: str, **kwargs) -> AutoDistributedModelForCausalLM:
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, tuning_mode=mode, **kwargs
    )


@pytest.fixture(scope="module")
def deep_model(swarm, folder):
    model = open_model(swarm, folder, "deep_ptune", pre_seq_len=K)
    with torch.no_grad():  # they start at zero; random values make the forward depend on them
        model.tuning.deep_prompts.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def lora_model(swarm, folder):
    model = open_model(swarm, folder, "lora", lora={"rank": 4, "alpha": 8.0, "targets": LORA_TARGETS})
    with torch.no_grad():  # B starts at zero; random values make A's gradient non-zero too
        for b in model.tuning.lora_B.values():
            b.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    yield model
    model.shutdown()


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Float32 sums in another order (our blocks vs transformers'): compare at the gradient's own scale."""
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)


def local_deep_greedy(reference, prompts, deep_prompts, input_ids, new_tokens: int) -> torch.Tensor:
    tokens = input_ids
    with torch.inference_mode(), deep_prompts_added(reference, deep_prompts):
        for _ in range(new_tokens):
            embeds = reference.get_input_embeddings()(tokens)  # [B, S, D]
            inputs_embeds = torch.cat([prompts.expand(tokens.shape[0], -1, -1), embeds], dim=1)
            next_ids = reference(inputs_embeds=inputs_embeds).logits[:, -1].argmax(-1)  # [B]
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
    return tokens


def test_deep_prompt_and_input_gradients_match_local(deep_model, folder):
    trainable = sorted(name for name, p in deep_model.named_parameters() if p.requires_grad)
    assert trainable == ["tuning.deep_prompts", "tuning.prompts"]
    input_ids, labels = task(batch=3)
    embeds = deep_model.head.embed(input_ids).detach().requires_grad_(True)  # [B, S, D]
    deep_model.zero_grad()
    out = deep_model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()

    reference = reference_model(folder).requires_grad_(False)
    prompts = deep_model.tuning.prompts.detach().clone().requires_grad_(True)
    deep = deep_model.tuning.deep_prompts.detach().clone().requires_grad_(True)
    local_embeds = embeds.detach().clone().requires_grad_(True)
    with deep_prompts_added(reference, deep):
        inputs_embeds = torch.cat([prompts.expand(3, -1, -1), local_embeds], dim=1)  # [B, K + S, D]
        logits = reference(inputs_embeds=inputs_embeds).logits[:, K:]
    loss = causal_lm_loss(logits, labels)
    loss.backward()

    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)
    assert_grad_close(deep_model.tuning.deep_prompts.grad, deep.grad)
    assert_grad_close(deep_model.tuning.prompts.grad, prompts.grad)
    assert_grad_close(embeds.grad, local_embeds.grad)


def test_sessions_carry_deep_prompts(deep_model, folder):
    questions = task(batch=2, seed=3)[0][:, :4]
    expected = local_deep_greedy(
        reference_model(folder), deep_model.tuning.prompts.detach(), deep_model.tuning.deep_prompts.detach(),
        questions, 5,
    )  # fmt: skip
    assert deep_model.generate(questions, max_new_tokens=5, eos_token_id=[]).tolist() == expected.tolist()


def test_lora_gradients_match_peft(lora_model, folder, tmp_path):
    input_ids, labels = task(batch=3)
    embeds = lora_model.head.embed(input_ids).detach().requires_grad_(True)
    lora_model.zero_grad()
    out = lora_model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()

    reference = peft_model(reference_model(folder), lora_model.tuning, tmp_path / "adapter")
    local_embeds = embeds.detach().clone().requires_grad_(True)
    logits = reference(inputs_embeds=local_embeds).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()

    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)
    assert_grad_close(embeds.grad, local_embeds.grad)
    expected = peft_factor_grads(reference, lora_model.tuning)
    for target in LORA_TARGETS:
        assert_grad_close(lora_model.tuning.lora_A[target].grad, expected[target][0])
        assert_grad_close(lora_model.tuning.lora_B[target].grad, expected[target][1])


def test_lora_generation_and_the_saved_adapter(lora_model, swarm, folder, tmp_path):
    questions = task(batch=2, seed=4)[0][:, :4]
    merged = peft_model(reference_model(folder), lora_model.tuning, tmp_path / "adapter").merge_and_unload()
    with torch.inference_mode():
        expected = merged.generate(questions, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    generated = lora_model.generate(questions, max_new_tokens=5, eos_token_id=[])
    assert generated.tolist() == expected.tolist()

    saved = LoraTuning.load(tmp_path / "adapter", lora_model.config)
    for target in LORA_TARGETS:
        torch.testing.assert_close(saved.lora_A[target], lora_model.tuning.lora_A[target].detach())
        torch.testing.assert_close(saved.lora_B[target], lora_model.tuning.lora_B[target].detach())
    loaded = open_model(swarm, folder, "lora", lora={"path": tmp_path / "adapter"})
    try:
        assert loaded.generate(questions, max_new_tokens=5, eos_token_id=[]).tolist() == generated.tolist()
    finally:
        loaded.shutdown()


def lora_tensors(rank: int, targets: tuple[str, ...], blocks: int = 2) -> list[torch.Tensor]:
    shapes = {"q_proj": (64, 64), "v_proj": (64, 32)}
    return [
        t
        for tg in targets
        for t in (torch.zeros(blocks, rank, shapes[tg][0]), torch.zeros(blocks, shapes[tg][1], rank))
    ]


BAD_TRAINABLES = {
    "prompts of the wrong width": (TuningSpec(prompts=2), [torch.zeros(2, 2, 65)], "deep prompts must have shape"),
    "prompts for the wrong blocks": (TuningSpec(prompts=2), [torch.zeros(3, 2, 64)], "deep prompts must have shape"),
    "too many prompts": (TuningSpec(prompts=17), [torch.zeros(2, 17, 64)], "over this server's limit of 16"),
    "NaN prompts": (TuningSpec(prompts=1), [torch.full((2, 1, 64), float("nan"))], "NaN"),
    "integer prompts": (TuningSpec(prompts=1), [torch.zeros(2, 1, 64, dtype=torch.int64)], "dtype"),
    "a missing tensor": (TuningSpec(prompts=1), [], "tensor(s)"),
    "an unknown target": (
        TuningSpec(lora=LoraSpec(rank=2, alpha=4, targets=("qkv_proj",))),
        [torch.zeros(2, 2, 64), torch.zeros(2, 64, 2)],
        "unknown LoRA target",
    ),
    "rank over the limit": (
        TuningSpec(lora=LoraSpec(rank=MAX_RANK + 1, alpha=4, targets=("q_proj",))),
        lora_tensors(MAX_RANK + 1, ("q_proj",)),
        f"limit of {MAX_RANK}",
    ),
    "LoRA B of the wrong shape": (
        TuningSpec(lora=LoraSpec(rank=2, alpha=4, targets=("q_proj", "v_proj"))),
        lora_tensors(2, ("q_proj",)) + lora_tensors(2, ("q_proj",)),
        "v_proj lora_B must have shape [2, 32, 2]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRAINABLES))
def test_servers_refuse_malformed_trainables_and_keep_serving(lora_model, case):
    spec, tensors, message = BAD_TRAINABLES[case]
    run, client = lora_model._loop.run, lora_model.client
    coverage = run(client.model_coverage(lora_model.model_id))
    hop = Hop(next(srv for srv in coverage.servers if (srv.start, srv.end) == (0, 2)), 0, 2)
    hidden = torch.randn(1, 3, 64)
    with pytest.raises(BadRequestError, match=re.escape(message)):
        run(call_forward(client, lora_model.model_id, hop, hidden, SpanTensors(spec, tuple(tensors))))
    with pytest.raises(BadRequestError, match=re.escape(message)):
        run(call_backward(client, lora_model.model_id, hop, hidden, hidden, SpanTensors(spec, tuple(tensors))))
    good = SpanTensors(TuningSpec(prompts=2), (torch.zeros(hop.end - hop.start, 2, 64),))
    torch.testing.assert_close(
        run(call_forward(client, lora_model.model_id, hop, hidden, good)),
        run(call_forward(client, lora_model.model_id, hop, hidden)),
    )


def merged_greedy(folder: Path, adapter: Path | None, input_ids: torch.Tensor) -> torch.Tensor:
    reference = reference_model(folder)
    if adapter is not None:
        reference = PeftModel.from_pretrained(reference, adapter).merge_and_unload()
    with torch.inference_mode():
        return reference.generate(
            input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )


def test_adapter_sessions_use_its_servers_and_match_the_merged_model(swarm, servers, folder, adapter):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), swarm.initial_peers, adapter="mine")
    try:
        plain_peer = servers[2].peer_id
        for _ in range(3):  # jittered routes: none of them may use the server without the adapter
            route = model._loop.run(model.client.route(model.model_id, adapter="mine", fresh=True))
            assert [(h.start, h.end) for h in route] == [(0, 2), (2, 4)]
            assert all("mine" in h.server.record.adapters for h in route)
            assert plain_peer not in [h.peer_id for h in route]
        questions = task(batch=2, seed=7)[0][:, :4]
        generated = model.generate(questions, max_new_tokens=NEW_TOKENS, eos_token_id=[])
        assert generated.tolist() == merged_greedy(folder, adapter, questions).tolist()
        # forward (rpc_forward, as training on top of the adapter would use) applies it too
        merged = PeftModel.from_pretrained(reference_model(folder), adapter).merge_and_unload()
        with torch.inference_mode():
            torch.testing.assert_close(model(generated).logits, merged(generated).logits, atol=1e-4, rtol=1e-4)
        model.adapter = None
        base = model.generate(questions, max_new_tokens=NEW_TOKENS, eos_token_id=[])
        assert base.tolist() == merged_greedy(folder, None, questions).tolist()
        assert base.tolist() != generated.tolist()
    finally:
        model.shutdown()


def test_prompt_tuning_then_serving_through_the_gateway(swarm, folder, adapter, tmp_path, request):
    model = open_model(swarm, folder, "ptune", pre_seq_len=K)
    input_ids, labels = task()
    questions = input_ids[:2, :4]
    try:
        before = model.generate(questions, max_new_tokens=len(ANSWER), eos_token_id=[])
        losses = train(model, [model.tuning.prompts], input_ids, labels)
        after = model.generate(questions, max_new_tokens=len(ANSWER), eos_token_id=[])
        model_id = model.model_id
        model.tuning.save(tmp_path / "answer.safetensors")
    finally:
        model.shutdown()
    print("losses:", [round(x, 3) for x in losses])
    assert losses[-1] < losses[0] / 2
    assert after[:, 4:].tolist() == [ANSWER] * 2 and before[:, 4:].tolist() != [ANSWER] * 2

    failures = lambda: request.session.testsfailed  # noqa: E731
    prompts = ("--prompts", f"answer={tmp_path / 'answer.safetensors'}")
    with running_gateway(swarm, tmp_path, MODEL_CACHE, [str(folder)], *prompts, failures=failures) as gateway:
        with httpx.Client(base_url=gateway.base_url, timeout=60) as http:
            ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
            assert ids == [model_id, f"{model_id}:answer", f"{model_id}:mine"]

            def complete(name: str, question: list[int], new_tokens: int) -> str:
                body = {"model": name, "prompt": question, "max_tokens": new_tokens, "temperature": 0}
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            tokenizer = reference_tokenizer(folder)
            for row in range(2):
                question = questions[row].tolist()
                assert complete(f"{model_id}:answer", question, len(ANSWER)) == tokenizer.decode(ANSWER)
                base = merged_greedy(folder, None, questions[row : row + 1])[0, 4:].tolist()
                assert complete(model_id, question, NEW_TOKENS) == tokenizer.decode(base, skip_special_tokens=True)
                merged = merged_greedy(folder, adapter, questions[row : row + 1])[0, 4:].tolist()
                assert complete(f"{model_id}:mine", question, NEW_TOKENS) == tokenizer.decode(
                    merged, skip_special_tokens=True
                )


def reference_tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(folder)


def test_sessions_with_different_adapters_share_batches(swarm, servers, folder):
    """An adapter session, a plain one and one with its own LoRA factors, on the same two servers at once: each
    gets what it gets alone, and the servers ran their steps in shared forwards. (Three sessions of three kinds:
    any shared forward mixes kinds. Whether all three share one depends on how their first steps arrive: one
    that arrives alone runs alone, and the groups then keep their pace.)"""
    resolved = resolve_model(str(folder), MODEL_CACHE)
    head = ModelHead.load(resolved)
    lora = LoraTuning.create(resolved.spec, rank=2, alpha=4.0, targets=("k_proj", "up_proj"), seed=8)
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    kinds = [{"adapter": "mine"}, {}, {"extras": lora.span_tensors().detached()}]
    prompts = [task(batch=b, seed=10 + i)[0][:, :4] for i, b in enumerate((1, 2, 1))]

    async def run() -> tuple[list, list, list]:
        client = await SwarmClient.create(ClientConfig(initial_peers=swarm.initial_peers, max_retries=0))
        try:
            client.bans.ban(servers[2].peer_id)  # keep every session on the two servers with the adapter
            runs = list(zip(prompts, kinds, strict=True))
            model_id = resolved.model_id
            with torch.inference_mode():
                alone = [await greedy_session(client, head, model_id, p, NEW_TOKENS, **k) for p, k in runs]
                together = await asyncio.gather(
                    *(greedy_session(client, head, model_id, p, NEW_TOKENS, **k) for p, k in runs)
                )
            return alone, list(together), [await server_info(client, s.peer_id) for s in servers[:2]]
        finally:
            await client.shutdown()

    alone, together, infos = asyncio.run(run())
    assert together == alone
    assert len({str(x) for x in alone}) == 3  # three different models, in effect
    for info in infos:
        assert info.max_batch_sessions_seen >= 2 and info.batched_steps > 0, info
