"""The client-side pieces of a causal LM: token embeddings, the final norm and the LM head (pure torch).

What the pieces are follows the family (``swarm.families``): RMSNorm, Gemma's (1 + w) RMSNorm or LayerNorm;
BLOOM's LayerNorm after the embeddings; Gemma's embedding scale and final logit soft-capping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swarm.config import ModelSpec
from swarm.norm import make_norm
from swarm.weights import ResolvedModel, load_tensors


class ModelHead(nn.Module):
    """Turns token ids into hidden states before the blocks, and hidden states into logits after them."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.spec = spec
        family, d, eps = spec.family, spec.hidden_size, spec.norm_eps
        self.embed_tokens = nn.Embedding(spec.vocab_size, d, dtype=dtype, device=device)
        self.embed_norm = make_norm("layer", d, eps, dtype=dtype, device=device) if family.embed_norm else None
        self.norm = make_norm(family.norm, d, eps, dtype=dtype, device=device)
        self.lm_head = nn.Linear(d, spec.vocab_size, bias=False, dtype=dtype, device=device)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # shared, not copied
        self.embed_scale: torch.Tensor | None
        if spec.embedding_multiplier != 1.0:
            # A tensor, rounded to the weights' dtype before use, exactly as transformers' Gemma does.
            self.register_buffer("embed_scale", torch.tensor(spec.embedding_multiplier), persistent=False)
        else:
            self.embed_scale = None
        self.requires_grad_(False)

    @staticmethod
    def tensor_names(spec: ModelSpec) -> dict[str, str]:
        """Our state-dict names -> the checkpoint's, for every tensor the head loads."""
        family = spec.family
        names = {"embed_tokens.weight": family.embed, "norm.weight": f"{family.final_norm}.weight"}
        if family.norm == "layer":
            names["norm.bias"] = f"{family.final_norm}.bias"
        if family.embed_norm:
            names["embed_norm.weight"] = f"{family.embed_norm}.weight"
            names["embed_norm.bias"] = f"{family.embed_norm}.bias"
        if not spec.tie_word_embeddings:
            names["lm_head.weight"] = family.lm_head
        return names

    @classmethod
    def load(
        cls, resolved: ResolvedModel, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> ModelHead:
        """Read only the embeddings, the norms and (when untied) the LM head from the model folder."""
        spec = resolved.spec
        names = cls.tensor_names(spec)
        tensors = load_tensors(resolved.folder, names.values(), dtype, device)
        with torch.device("meta"):
            head = cls(spec, dtype=dtype)
        for ours, theirs in names.items():
            module_name, _, param_name = ours.rpartition(".")
            setattr(head.get_submodule(module_name), param_name, nn.Parameter(tensors[theirs], requires_grad=False))
        if spec.tie_word_embeddings:
            head.lm_head.weight = head.embed_tokens.weight
        if head.embed_scale is not None:
            head.embed_scale = torch.tensor(spec.embedding_multiplier, device=device)
        return head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, S] -> hidden: [B, S, D]."""
        hidden = self.embed_tokens(input_ids)  # [B, S, D]
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale.to(hidden.dtype)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return hidden

    def logits(self, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """hidden: [B, S, D] -> float32 logits [B, S, V] (or [B, 1, V] for the last position only)."""
        if last_only:
            hidden = hidden[:, -1:]  # [B, 1, D]: decoding needs one row, and the head is the biggest matmul
        logits = F.linear(self.norm(hidden), self.lm_head.weight).float()
        cap = self.spec.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap  # Gemma 2: squash into (-cap, cap)
        return logits
