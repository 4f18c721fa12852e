"""ModelSpec: the family-agnostic shape of a causal LM, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from swarm.families import SUPPORTED_MODEL_TYPES, Family, family_of

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelSpec"]

LAYER_TYPES = ("full_attention", "sliding_attention")

# Older or family-specific config keys -> ModelSpec field names (used when the field's own key is absent).
_ALIASES = {
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_embed": "hidden_size",
    "layer_norm_epsilon": "layer_norm_eps",
    "activation": "hidden_act",  # Falcon
}


class ModelSpec(BaseModel):
    """Everything the block math and the client head need to know about a model."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # heads in the KV cache (BLOOM and multi-head Falcon: all of them)
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5  # for LayerNorm families (Falcon, BLOOM)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    alibi: bool = False  # ALiBi biases instead of rotary positions (BLOOM)
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # bias on the q/k/v projections
    attention_out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" / "sliding_attention"; None: all slide
    query_pre_attn_scalar: float | None = None  # attention scale is its inverse square root (Gemma 2)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    embedding_multiplier: float = 1.0  # token embeddings are scaled by this (Gemma: sqrt(hidden_size))
    num_local_experts: int = 0  # mixture of experts (Mixtral); 0: a dense MLP
    num_experts_per_tok: int = 0
    parallel_attn: bool = False  # attention and MLP read the same input and are summed (Falcon)
    num_ln_in_parallel_attn: int = 1  # Falcon: 2 means separate ln_attn / ln_mlp
    apply_residual_connection_post_layernorm: bool = False  # BLOOM
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelSpec:
        model_type = config.get("model_type", "llama")
        family = family_of(model_type)  # ValueError naming an unsupported model_type
        config = dict(config)
        for alias, name in _ALIASES.items():
            if config.get(name) is None and config.get(alias) is not None:
                config[name] = config[alias]
        heads = config["num_attention_heads"]
        derived: dict[str, Any] = dict(
            model_type=model_type,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            **_rope_fields(config),
            # Qwen2 always has q/k/v biases; its config does not say so. Its o_proj never has one.
            attention_bias=config.get("attention_bias", model_type == "qwen2"),
            attention_out_bias=bool(config.get("attention_bias")) and model_type != "qwen2",
            sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None,
            tie_word_embeddings=config.get("tie_word_embeddings", family.tie_word_embeddings),
        )
        derived.update(_FAMILY_FIELDS.get(model_type, _no_fields)(config, family))
        plain = {k: v for k, v in config.items() if k in cls.model_fields and k not in derived and v is not None}
        spec = cls(**plain, **derived)
        spec._check_layer_types()
        return spec

    @classmethod
    def from_folder(cls, folder: Path) -> ModelSpec:
        return cls.from_hf_config(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def family(self) -> Family:
        return family_of(self.model_type)

    @property
    def norm_eps(self) -> float:
        """The epsilon of this family's norms (LayerNorm families read ``layer_norm_epsilon``)."""
        return self.layer_norm_eps if self.family.norm == "layer" else self.rms_norm_eps

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def sliding_window_for(self, layer: int) -> int | None:
        """The attention window of decoder layer ``layer`` (None: it sees every earlier token)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            return
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"unsupported layer types {unknown}; supported: {', '.join(LAYER_TYPES)}")


def _rope_fields(config: dict[str, Any]) -> dict[str, Any]:
    rope_theta = config.get("rope_theta")
    rope_scaling = config.get("rope_scaling")
    # transformers 5 folds rope_theta into ``rope_parameters``.
    rope_params = config.get("rope_parameters") or {}
    if rope_theta is None:
        rope_theta = rope_params.get("rope_theta", 10000.0)
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
        rope_scaling = None
    return dict(rope_theta=rope_theta, rope_scaling=rope_scaling)


def _no_fields(config: dict[str, Any], family: Family) -> dict[str, Any]:
    return {}


def _gemma2_fields(config: dict[str, Any], family: Family) -> dict[str, Any]:
    if config.get("use_bidirectional_attention"):
        raise ValueError("gemma2 with use_bidirectional_attention=True is not supported (causal LMs only)")
    layers = config["num_hidden_layers"]
    # transformers' default: even layers (0, 2, ...) slide, odd ones see everything.
    default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    return dict(
        hidden_act=config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh",
        layer_types=tuple(config.get("layer_types") or default_types),
        embedding_multiplier=config["hidden_size"] ** 0.5,
        query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
    )


def _falcon_fields(config: dict[str, Any], family: Family) -> dict[str, Any]:
    if config.get("alibi"):
        raise ValueError("falcon with alibi=True is not supported (only rotary Falcon models are)")
    heads = config["num_attention_heads"]
    new_arch = bool(config.get("new_decoder_architecture", False))
    parallel = bool(config.get("parallel_attn", True))
    num_ln = config.get("num_ln_in_parallel_attn")
    if new_arch:
        if not parallel:
            raise ValueError("falcon with new_decoder_architecture=True and parallel_attn=False is not supported")
        kv_heads = config.get("num_kv_heads") or heads
        num_ln = 2 if num_ln is None else num_ln
    else:
        if num_ln not in (None, 1):
            raise ValueError(f"falcon with num_ln_in_parallel_attn={num_ln} needs new_decoder_architecture=True")
        kv_heads = 1 if config.get("multi_query", True) else heads
        num_ln = 1
    bias = bool(config.get("bias", False))
    hidden = config["hidden_size"]
    return dict(
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=config.get("ffn_hidden_size") or 4 * hidden,
        hidden_act=config.get("hidden_act") or "gelu",
        parallel_attn=parallel,
        num_ln_in_parallel_attn=num_ln,
        attention_bias=bias,
        attention_out_bias=bias,
        mlp_bias=bias,
    )


def _bloom_fields(config: dict[str, Any], family: Family) -> dict[str, Any]:
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    return dict(
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        hidden_act="gelu_pytorch_tanh",  # BLOOM's own tanh-approximated GELU
        alibi=True,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
    )


_FAMILY_FIELDS: dict[str, Callable[[dict[str, Any], Family], dict[str, Any]]] = {
    "gemma2": _gemma2_fields,
    "falcon": _falcon_fields,
    "bloom": _bloom_fields,
}
