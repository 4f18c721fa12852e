"""Every non-Llama family against transformers: split spans, cached decode, greedy generation, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BloomConfig, FalconConfig

from server.model import BlockSpan, SpanCache
from swarm.config import SUPPORTED_MODEL_TYPES, ModelSpec
from swarm.head import ModelHead
from swarm.weights import ResolvedModel, block_prefix, resolve_model, safetensors_files
from tests.helpers import TinyKind, make_tiny_model, reference_model

FAMILY_KINDS: list[TinyKind] = ["qwen3", "gemma2", "mixtral", "falcon", "falcon_mq", "falcon_seq", "bloom"]
LAYERS, SPLIT = 4, 1  # two "servers": blocks 0:1 and 1:4
ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILY_KINDS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ResolvedModel:
    folder = make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), seed=7)
    return resolve_model(str(folder), tmp_path_factory.mktemp("cache"))


def _spans(resolved: ResolvedModel) -> list[BlockSpan]:
    return [BlockSpan.load(resolved, 0, SPLIT), BlockSpan.load(resolved, SPLIT, LAYERS)]


def _run(spans: list[BlockSpan], hidden: torch.Tensor, caches=None, start: int = 0) -> torch.Tensor:
    for i, span in enumerate(spans):
        hidden = span(hidden, cache=caches[i] if caches else None, start_position=start)
    return hidden


def _caches(resolved: ResolvedModel, spans: list[BlockSpan], batch: int, capacity: int) -> list[SpanCache]:
    return [SpanCache.allocate(resolved.spec, len(s.blocks), batch, capacity, torch.float32, "cpu") for s in spans]


@torch.inference_mode()
def test_split_spans_match_transformers(tiny: ResolvedModel) -> None:
    reference = reference_model(tiny.folder)
    head, spans = ModelHead.load(tiny), _spans(tiny)
    ids = torch.randint(4, tiny.spec.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    got = head.logits(_run(spans, head.embed(ids)))
    torch.testing.assert_close(got, reference(ids).logits, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_cached_decode_matches_full_forward(tiny: ResolvedModel) -> None:
    head, spans = ModelHead.load(tiny), _spans(tiny)
    batch, prefill, steps = 2, 6, 5  # past Gemma's window of 4, so sliding layers drop keys while decoding
    ids = torch.randint(4, tiny.spec.vocab_size, (batch, prefill + steps), generator=torch.Generator().manual_seed(2))
    full = head.logits(_run(spans, head.embed(ids)))  # [B, S, V]
    caches = _caches(tiny, spans, batch, prefill + steps)
    got = [head.logits(_run(spans, head.embed(ids[:, :prefill]), caches, 0))]
    for pos in range(prefill, prefill + steps):
        got.append(head.logits(_run(spans, head.embed(ids[:, pos : pos + 1]), caches, pos), last_only=True))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_greedy_decode_matches_generate(tiny: ResolvedModel) -> None:
    reference = reference_model(tiny.folder)
    head, spans = ModelHead.load(tiny), _spans(tiny)
    ids = torch.randint(4, tiny.spec.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    new_tokens = 8
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    want = out[0, ids.shape[1] :].tolist()
    caches = _caches(tiny, spans, 1, ids.shape[1] + new_tokens)
    logits = head.logits(_run(spans, head.embed(ids), caches, 0), last_only=True)
    got: list[int] = []
    while True:
        got.append(int(logits[0, -1].argmax()))
        if got[-1] in tiny.spec.eos_token_ids or len(got) == new_tokens:
            break
        position = ids.shape[1] + len(got) - 1
        logits = head.logits(_run(spans, head.embed(torch.tensor([got[-1:]])), caches, position), last_only=True)
    assert got == want


def test_spans_hold_the_checkpoint_names(tiny: ResolvedModel) -> None:
    span = BlockSpan.load(tiny, 2, 3)
    prefix = block_prefix(tiny.spec, 2)
    file_names = {n[len(prefix) :] for n in safetensors_files(tiny.folder) if n.startswith(prefix)}
    assert set(span.blocks[0].state_dict()) == file_names


def test_bfloat16_mixtral_stays_close(tmp_path: Path) -> None:
    resolved = resolve_model(str(make_tiny_model("mixtral", tmp_path / "m", num_hidden_layers=2)), tmp_path)
    hidden = torch.randn(2, 5, resolved.spec.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = BlockSpan.load(resolved, 0, 2)(hidden)
        got = BlockSpan.load(resolved, 0, 2).to(torch.bfloat16)(hidden.bfloat16())  # .to() keeps fused views
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_supported_families_are_listed() -> None:
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "mixtral", "falcon", "bloom"):
        assert model_type in SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 4}, "gpt2"),
        (FalconConfig(hidden_size=64, num_attention_heads=4, alibi=True).to_dict(), "alibi"),
        (
            FalconConfig(
                hidden_size=64, num_attention_heads=4, new_decoder_architecture=True, parallel_attn=False
            ).to_dict(),
            "parallel_attn",
        ),
        ({**BloomConfig(hidden_size=64, n_head=4).to_dict(), "layer_types": ["chunked_attention"] * 2}, "chunked"),
    ],
)
def test_unsupported_variants_are_named(config: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ModelSpec.from_hf_config(config)
