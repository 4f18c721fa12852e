"""Our pure-torch head and block spans against transformers: full forward, cached decode, sub-ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from server.model import BlockSpan, SpanCache
from server.model.rotary import inverse_frequencies
from swarm.config import ModelSpec
from swarm.head import ModelHead
from swarm.weights import ResolvedModel, resolve_model
from tests.helpers import reference_model

TINY_FIXTURES = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_llama3_dir"]
ATOL = 1e-5


@pytest.fixture(params=TINY_FIXTURES)
def tiny(request: pytest.FixtureRequest, tmp_path: Path) -> ResolvedModel:
    return resolve_model(str(request.getfixturevalue(request.param)), tmp_path)


def _two_servers(resolved: ResolvedModel) -> list[BlockSpan]:
    return [BlockSpan.load(resolved, 0, 2), BlockSpan.load(resolved, 2, 4)]


def _run(spans: list[BlockSpan], hidden: torch.Tensor, caches=None, start: int = 0) -> torch.Tensor:
    for i, span in enumerate(spans):
        hidden = span(hidden, cache=caches[i] if caches else None, start_position=start)
    return hidden


@torch.inference_mode()
def test_full_forward_matches_transformers(tiny: ResolvedModel) -> None:
    reference = reference_model(tiny.folder)
    head, spans = ModelHead.load(tiny), _two_servers(tiny)
    ids = torch.randint(0, tiny.spec.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    logits = head.logits(_run(spans, head.embed(ids)))
    torch.testing.assert_close(logits, reference(ids).logits, atol=ATOL, rtol=0)
    assert head.logits(_run(spans, head.embed(ids)), last_only=True).shape == (1, 1, tiny.spec.vocab_size)


@torch.inference_mode()
def test_cached_decode_matches_full_forward(tiny: ResolvedModel) -> None:
    head, spans = ModelHead.load(tiny), _two_servers(tiny)
    batch, prefill, steps = 2, 5, 4
    ids = torch.randint(0, tiny.spec.vocab_size, (batch, prefill + steps), generator=torch.Generator().manual_seed(2))
    full = head.logits(_run(spans, head.embed(ids)))  # [B, S, V]
    caches = [SpanCache.allocate(tiny.spec, 2, batch, 16, torch.float32, "cpu") for _ in spans]
    got = [head.logits(_run(spans, head.embed(ids[:, :prefill]), caches, 0))]
    for pos in range(prefill, prefill + steps):
        got.append(head.logits(_run(spans, head.embed(ids[:, pos : pos + 1]), caches, pos), last_only=True))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_chunked_prefill_with_cache_uses_causal_mask(tiny_llama_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(tiny_llama_dir), tmp_path)
    span = BlockSpan.load(resolved, 0, 4)
    hidden = torch.randn(1, 9, resolved.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    cache = SpanCache.allocate(resolved.spec, 4, 1, 9, torch.float32, "cpu")
    chunks = [span(hidden[:, :4], cache, 0), span(hidden[:, 4:], cache, 4)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), span(hidden), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_sub_range_of_hosted_blocks(tiny_llama_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(tiny_llama_dir), tmp_path)
    whole = BlockSpan.load(resolved, 0, 4)
    hidden = torch.randn(2, 6, resolved.spec.hidden_size, generator=torch.Generator().manual_seed(4))
    # blocks= takes absolute model block indices: 1:3 on a span hosting 0:4 equals spans 0:1 + 1:3 + 3:4.
    middle = whole(whole(hidden, blocks=slice(0, 1)), blocks=slice(1, 3))
    torch.testing.assert_close(whole(middle, blocks=slice(3, 4)), whole(hidden), atol=ATOL, rtol=0)
    torch.testing.assert_close(middle, _run([BlockSpan.load(resolved, 0, 3)], hidden), atol=ATOL, rtol=0)
    cache = SpanCache.allocate(resolved.spec, 2, 2, 8, torch.float32, "cpu")  # covers only the blocks run
    first = whole(hidden[:, :5], cache, 0, blocks=slice(1, 3))
    step = whole(hidden[:, 5:], cache, 5, blocks=slice(1, 3))
    torch.testing.assert_close(torch.cat([first, step], 1), whole(hidden, blocks=slice(1, 3)), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="0:4"):
        whole(hidden, blocks=slice(2, 6))
    with pytest.raises(ValueError, match="cache covers"):
        whole(hidden, cache, 0)


def test_span_cache_sizes(tiny_llama_dir: Path) -> None:
    spec = ModelSpec.from_folder(tiny_llama_dir)
    cache = SpanCache.allocate(spec, 3, 2, 10, torch.float32, "cpu")
    per_token = SpanCache.bytes_per_token(spec, 3, torch.float32)
    assert per_token == 2 * 3 * spec.num_key_value_heads * spec.head_dim * 4
    assert cache.nbytes == per_token * 2 * 10


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_scaling_matches_transformers(rope: dict) -> None:
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters={"rope_theta": 500000.0, **rope})
    want, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
    got = inverse_frequencies(ModelSpec.from_hf_config(config.to_dict()))
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)


def test_unsupported_rope_type_is_named() -> None:
    spec = ModelSpec.from_hf_config(LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()).model_copy(
        update={"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    )
    with pytest.raises(ValueError, match="yarn"):
        inverse_frequencies(spec)


@torch.inference_mode()
def test_smollm2_matches_transformers_and_greedy_generate(smollm2: ResolvedModel) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]  # [1, S]
    reference = reference_model(smollm2.folder)
    head = ModelHead.load(smollm2)
    spans = [BlockSpan.load(smollm2, 0, 15), BlockSpan.load(smollm2, 15, 30)]

    torch.testing.assert_close(head.logits(_run(spans, head.embed(ids))), reference(ids).logits, atol=1e-4, rtol=0)

    new_tokens = 8
    want = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
    capacity = ids.shape[1] + new_tokens
    caches = [SpanCache.allocate(smollm2.spec, 15, 1, capacity, torch.float32, "cpu") for _ in spans]
    logits = head.logits(_run(spans, head.embed(ids), caches, 0), last_only=True)
    got: list[int] = []
    for _ in range(new_tokens):
        token = int(logits[0, -1].argmax())
        got.append(token)
        if token in smollm2.spec.eos_token_ids or len(got) == new_tokens:
            break
        position = ids.shape[1] + len(got) - 1
        hidden = _run(spans, head.embed(torch.tensor([[token]])), caches, position)
        logits = head.logits(hidden, last_only=True)
    assert got == want[: len(got)]
    assert "Paris" in tokenizer.decode(got)


@torch.inference_mode()
def test_mistral_sliding_window_matches_transformers(tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        sliding_window=4,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    resolved = resolve_model(str(tmp_path / "mistral"), tmp_path)
    assert resolved.spec.sliding_window == 4
    head, span = ModelHead.load(resolved), BlockSpan.load(resolved, 0, 2)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    want = reference_model(resolved.folder)(ids).logits
    torch.testing.assert_close(head.logits(span(head.embed(ids))), want, atol=ATOL, rtol=0)
    cache = SpanCache.allocate(resolved.spec, 2, 1, 10, torch.float32, "cpu")
    steps = [head.logits(span(head.embed(ids[:, :6]), cache, 0))]
    steps += [head.logits(span(head.embed(ids[:, p : p + 1]), cache, p)) for p in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_bfloat16_span_stays_close_to_float32(tiny_llama_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(tiny_llama_dir), tmp_path)
    hidden = torch.randn(1, 6, resolved.spec.hidden_size, generator=torch.Generator().manual_seed(6))
    want = BlockSpan.load(resolved, 0, 4)(hidden)
    got = BlockSpan.load(resolved, 0, 4, dtype=torch.bfloat16)(hidden.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
