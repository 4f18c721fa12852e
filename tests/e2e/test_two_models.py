"""Two models served in one loopback swarm through one gateway: both are listed, and each answers with exactly
the greedy continuation that transformers computes locally for it."""

from __future__ import annotations

import pytest
import torch
from openai import OpenAI
from transformers import AutoTokenizer

from tests.e2e.gateway_process import running_gateway
from tests.helpers import MODEL_CACHE, make_tiny_model, reference_model

KINDS = ("llama", "qwen2")
MESSAGES = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: make_tiny_model(kind, tmp_path_factory.mktemp("models") / f"duo-{kind}") for kind in KINDS}


@pytest.fixture(scope="module")
def gateway(local_swarm, folders, tmp_path_factory):
    servers = [local_swarm.start_server(str(f), span, wait=False) for f in folders.values() for span in ("0:2", "2:4")]
    refs = [str(folder) for folder in folders.values()]
    with running_gateway(local_swarm, tmp_path_factory.mktemp("gateway"), MODEL_CACHE, refs, servers=servers) as gw:
        yield gw


def test_both_models_are_listed_and_answer_like_local(gateway, folders):
    sdk = OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0)
    assert {m.id for m in sdk.models.list().data} == {f"duo-{kind}" for kind in KINDS}
    for kind, folder in folders.items():
        answer = sdk.chat.completions.create(
            model=f"duo-{kind}", messages=MESSAGES, temperature=0, max_tokens=8,
            logit_bias={"2": -100},  # the tiny tokenizer's end-of-turn token: always generate 8 tokens
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.inference_mode():
            logits_processor_bias = {(2,): -100.0}
            expected = reference_model(folder).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                sequence_bias=logits_processor_bias,
            )  # fmt: skip
        assert answer.usage.completion_tokens == 8
        assert answer.choices[0].message.content == tokenizer.decode(
            expected[0, ids.shape[1] :], skip_special_tokens=True
        )
