"""Tiny random-weight models saved as Hugging Face folders, and the transformers reference for them.

Plain functions (not only fixtures) so that subprocess-based swarm tests can build and check models too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

MODEL_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "models"
"""Where tests, benchmarks and their servers keep converted models (gitignored), so each converts only once."""

TinyKind = Literal[
    "llama", "qwen2", "llama3", "qwen3", "gemma2", "mixtral", "falcon", "falcon_mq", "falcon_seq", "bloom"
]
TINY_KINDS: tuple[TinyKind, ...] = get_args(TinyKind)
_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "llama3": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "mixtral": MixtralForCausalLM,
    "falcon": FalconForCausalLM,
    "falcon_mq": FalconForCausalLM,
    "falcon_seq": FalconForCausalLM,
    "bloom": BloomForCausalLM,
}

_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def _tiny_config(kind: TinyKind, num_hidden_layers: int) -> PretrainedConfig:
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if kind == "llama":
        return LlamaConfig(**shape, tie_word_embeddings=False)
    if kind == "llama3":
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )
        return LlamaConfig(**shape, tie_word_embeddings=False, rope_parameters=rope)
    if kind == "qwen2":
        return Qwen2Config(**shape, tie_word_embeddings=True)
    other = _other_family_config(kind, num_hidden_layers)
    if other is not None:
        return other
    raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(TINY_KINDS)}")


def _other_family_config(kind: TinyKind, num_hidden_layers: int) -> PretrainedConfig | None:
    """Tiny configs of the non-Llama families; small windows and caps so that their effects show."""
    common = dict(
        hidden_size=64, num_hidden_layers=num_hidden_layers, num_attention_heads=4, vocab_size=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    gqa = dict(common, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen3":
        return Qwen3Config(**gqa, head_dim=24, attention_bias=True, tie_word_embeddings=False)
    if kind == "gemma2":
        return Gemma2Config(
            **gqa,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            attn_logit_softcapping=0.05,  # random scores are small: a tiny cap makes the tanh bite
            final_logit_softcapping=1.5,
        )
    if kind == "mixtral":
        return MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    if kind == "falcon":  # new decoder architecture (Falcon-40B style): grouped kv heads, ln_attn + ln_mlp
        return FalconConfig(**common, new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=96)
    if kind == "falcon_mq":  # Falcon-7B style: multi-query, parallel attention/MLP, one LayerNorm
        return FalconConfig(**common, new_decoder_architecture=False, multi_query=True, parallel_attn=True)
    if kind == "falcon_seq":  # old architecture, multi-head, sequential attention then MLP, with biases
        return FalconConfig(**common, new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True)
    if kind == "bloom":
        return BloomConfig(**common)
    return None


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with ChatML specials: ids fit a 128-token vocab."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + ["\n"] + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=_SPECIALS[1:3],
        chat_template=_CHATML,
    )


def make_tiny_model(
    kind: TinyKind,
    folder: Path,
    max_shard_size: str | None = None,
    seed: int = 0,
    num_hidden_layers: int = 4,
) -> Path:
    """Save a seeded random-weight model of ``kind`` (and a tiny tokenizer) as a Hugging Face folder.

    ``max_shard_size`` (e.g. ``"100KB"``) makes a sharded folder with a ``model.safetensors.index.json``.
    """
    config = _tiny_config(kind, num_hidden_layers)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[kind](config).eval()
    # Default init makes norms exactly 1 (Gemma: 0) and biases 0; perturb them so the tests notice a missed weight.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def reference_model(folder: Path) -> PreTrainedModel:
    """The transformers model for ``folder`` in float32 eval mode: the ground truth for our pieces."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def greedy_reference(
    folder: Path, new_tokens: int, seed: int, prompt_tokens: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random prompt [1, prompt_tokens] of ids in 4..127 and the local model's greedy continuation of exactly
    ``new_tokens`` tokens (prompt included): what a distributed generation must reproduce."""
    input_ids = torch.randint(4, 128, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        tokens = reference_model(folder).generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False,
        )  # fmt: skip
    return input_ids, tokens
