"""ModelSpec: the family-agnostic shape of a causal LM, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ModelSpec(BaseModel):
    """Everything the block math and the client head need to know about a model."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelSpec:
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        heads = config["num_attention_heads"]
        rope_theta = config.get("rope_theta")
        rope_scaling = config.get("rope_scaling")
        # transformers 5 folds rope_theta into ``rope_parameters``.
        rope_params = config.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta", 10000.0)
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
            None,
            "default",
        ):
            rope_scaling = None
        derived: dict[str, Any] = dict(
            model_type=model_type,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # Qwen2 always has q/k/v biases; its config does not say so.
            attention_bias=config.get("attention_bias", model_type == "qwen2"),
            sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None,
        )
        plain = {k: v for k, v in config.items() if k in cls.model_fields and k not in derived and v is not None}
        return cls(**plain, **derived)

    @classmethod
    def from_folder(cls, folder: Path) -> ModelSpec:
        return cls.from_hf_config(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]
