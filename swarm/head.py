"""The client-side pieces of a causal LM: token embeddings, the final norm and the LM head (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swarm.config import ModelSpec
from swarm.norm import RMSNorm
from swarm.weights import ResolvedModel, load_tensors

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


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
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype, device=device)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # shared, not copied
        self.requires_grad_(False)

    @classmethod
    def load(
        cls, resolved: ResolvedModel, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> ModelHead:
        """Read only the embeddings, the final norm and (when untied) the LM head from the model folder."""
        spec = resolved.spec
        names = [EMBED, NORM] if spec.tie_word_embeddings else [EMBED, NORM, LM_HEAD]
        tensors = load_tensors(resolved.folder, names, dtype, device)
        with torch.device("meta"):
            head = cls(spec, dtype=dtype)
        head.embed_tokens.weight = nn.Parameter(tensors[EMBED], requires_grad=False)
        head.norm.weight = nn.Parameter(tensors[NORM], requires_grad=False)
        if spec.tie_word_embeddings:
            head.lm_head.weight = head.embed_tokens.weight
        else:
            head.lm_head.weight = nn.Parameter(tensors[LM_HEAD], requires_grad=False)
        return head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, S] -> hidden: [B, S, D]."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """hidden: [B, S, D] -> float32 logits [B, S, V] (or [B, 1, V] for the last position only)."""
        if last_only:
            hidden = hidden[:, -1:]  # [B, 1, D]: decoding needs one row, and the head is the biggest matmul
        return F.linear(self.norm(hidden), self.lm_head.weight).float()
