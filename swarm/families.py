"""Per-``model_type`` naming: where a family keeps its blocks and client-head tensors, and its norm kind.

This is the family knowledge both sides need (the server to find a block's tensors, the client head to find
the embeddings, norms and LM head); the block math itself lives in ``server/model/<family>.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

NormKind = Literal["rms", "rms_plus_one", "layer"]
"""``rms``: ``w * x / rms(x)``; ``rms_plus_one``: Gemma's ``(1 + w) * x / rms(x)``; ``layer``: LayerNorm with bias."""


@dataclass(frozen=True)
class Family:
    """How one model family names its tensors in a Hugging Face checkpoint, and what its client head holds."""

    block_prefix_format: str  # formatted with ``i``: the state-dict prefix of decoder layer ``i``
    embed: str  # token embedding weight
    final_norm: str  # module prefix of the final norm (``.weight``, plus ``.bias`` for LayerNorm)
    norm: NormKind = "rms"
    embed_norm: str | None = None  # module prefix of a LayerNorm right after the embeddings (BLOOM)
    lm_head: str = "lm_head.weight"
    tie_word_embeddings: bool = False  # the default when ``config.json`` does not say

    def block_prefix(self, i: int) -> str:
        return self.block_prefix_format.format(i=i)


_LLAMA_LIKE = Family(
    block_prefix_format="model.layers.{i}.", embed="model.embed_tokens.weight", final_norm="model.norm"
)
_FALCON = Family(
    block_prefix_format="transformer.h.{i}.",
    embed="transformer.word_embeddings.weight",
    final_norm="transformer.ln_f",
    norm="layer",
    tie_word_embeddings=True,
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "gemma2": replace(_LLAMA_LIKE, norm="rms_plus_one", tie_word_embeddings=True),
    "falcon": _FALCON,
    "bloom": replace(_FALCON, embed_norm="transformer.word_embeddings_layernorm"),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family_of(model_type: str) -> Family:
    """The naming of ``model_type``; ``ValueError`` naming it (and what is supported) when unknown."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return family
