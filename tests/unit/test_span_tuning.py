"""Tuning applied by the server's block math: deep prompts equal transformers with the prompts hooked in, LoRA
equals peft (loading our PEFT-format save), adapters load per hosted block, and sessions with different tunings
packed into one forward get what each gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.adapters import load_adapters, parse_adapter_option
from server.model import BlockSpan, SpanCache
from server.model.span import SpanStep
from server.model.tuning import SpanTuning
from swarm.lora import LoraTuning
from swarm.messages import LORA_TARGETS, TuningSpec
from swarm.weights import ResolvedModel, resolve_model
from tests.helpers import reference_model
from tests.tuning_reference import deep_prompts_added, peft_model

ATOL = 1e-5


@pytest.fixture
def tiny(tiny_llama_dir: Path, tmp_path: Path) -> ResolvedModel:
    return resolve_model(str(tiny_llama_dir), tmp_path)


def random_lora(resolved: ResolvedModel, seed: int, targets=LORA_TARGETS) -> LoraTuning:
    lora = LoraTuning.create(resolved.spec, rank=4, alpha=8.0, targets=targets, seed=seed)
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    return lora


def client_tuning(lora: LoraTuning | None = None, prompts: torch.Tensor | None = None) -> SpanTuning:
    tensors = list(lora.span_tensors().tensors) if lora is not None else []
    spec = TuningSpec(
        prompts=prompts.shape[1] if prompts is not None else 0, lora=lora.span_tensors().spec.lora if lora else None
    )
    return SpanTuning.from_tensors(spec, ([prompts] if prompts is not None else []) + [t.detach() for t in tensors])


def final_hidden(reference, x: torch.Tensor) -> torch.Tensor:
    """transformers' last hidden state before the final norm (ours ends at the last block)."""
    captured = {}
    norm = next(module for name, module in reference.named_modules() if name.endswith("model.norm"))
    handle = norm.register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0]))
    try:
        reference(inputs_embeds=x)
    finally:
        handle.remove()
    return captured["h"]


@torch.inference_mode()
def test_deep_prompts_match_transformers_with_hooks(tiny: ResolvedModel) -> None:
    span, reference = BlockSpan.load(tiny, 0, 4), reference_model(tiny.folder)
    x, prompts = torch.randn(2, 6, 64), torch.randn(4, 3, 64)
    with deep_prompts_added(reference, prompts):
        expected = final_hidden(reference, x)
    torch.testing.assert_close(span(x, tuning=client_tuning(prompts=prompts)), expected, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_lora_on_every_target_matches_peft(tiny: ResolvedModel, tmp_path: Path) -> None:
    span, lora = BlockSpan.load(tiny, 0, 4), random_lora(tiny, seed=1)
    reference = peft_model(reference_model(tiny.folder), lora, tmp_path / "adapter")
    x = torch.randn(2, 6, 64)
    expected = final_hidden(reference, x)
    assert not torch.allclose(span(x), expected, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(span(x, tuning=client_tuning(lora)), expected, atol=ATOL, rtol=0)


def test_adapters_load_for_the_hosted_blocks_only(tiny: ResolvedModel, tmp_path: Path) -> None:
    lora = random_lora(tiny, seed=2, targets=("q_proj", "down_proj"))
    lora.save_pretrained(tmp_path / "a")
    adapters = load_adapters([f"mine={tmp_path / 'a'}"], tiny.spec, 1, 3, LORA_TARGETS, torch.float32, "cpu")
    assert list(adapters) == ["mine"] and len(adapters["mine"]) == 2
    torch.testing.assert_close(adapters["mine"][0].factors["q_proj"][0], lora.lora_A["q_proj"][1].detach())
    assert adapters["mine"][1].scale == 2.0
    for bad in ("noequals", "=path", "has space=x", "a:b=x"):
        with pytest.raises(ValueError, match="NAME=PATH"):
            parse_adapter_option(bad)
    with pytest.raises(ValueError, match="cannot"):
        load_adapters([f"x={tmp_path / 'a'}"], tiny.spec, 0, 4, ("q_proj",), torch.float32, "cpu")


@torch.inference_mode()
def test_sessions_with_different_tunings_share_a_packed_forward(tiny: ResolvedModel) -> None:
    span = BlockSpan.load(tiny, 0, 4)
    assert span.packs_sessions
    tunings = [
        client_tuning(random_lora(tiny, seed=3, targets=("q_proj", "v_proj"))),
        None,
        client_tuning(random_lora(tiny, seed=4), prompts=torch.randn(4, 2, 64)),
        SpanTuning(prompts=torch.randn(4, 5, 64)),
    ]
    shapes = [(1, 3), (2, 4), (1, 5), (1, 2)]
    inputs = [torch.randn(b, s, 64) for b, s in shapes]
    caches = [SpanCache.allocate(tiny.spec, 4, b, 16, torch.float32) for b, _ in shapes]
    alone = [SpanCache.allocate(tiny.spec, 4, b, 16, torch.float32) for b, _ in shapes]
    packed = span.forward_packed([SpanStep(x, c, 0, t) for x, c, t in zip(inputs, caches, tunings, strict=True)])
    for x, c, t, out in zip(inputs, alone, tunings, packed, strict=True):
        torch.testing.assert_close(out, span(x, c, 0, tuning=t), atol=ATOL, rtol=0)
    # a decode step of each, packed again, at their own positions (session 3 is still inside its 5 prompts)
    steps = [torch.randn(b, 1, 64) for b, _ in shapes]
    packed = span.forward_packed(
        [SpanStep(x, c, s, t) for x, c, (_, s), t in zip(steps, caches, shapes, tunings, strict=True)]
    )
    for x, c, (_, s), t, out in zip(steps, alone, shapes, tunings, packed, strict=True):
        torch.testing.assert_close(out, span(x, c, s, tuning=t), atol=ATOL, rtol=0)
