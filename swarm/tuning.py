"""Client-side fine-tuning pieces: trainable prompts prepended to the input embeddings, and the causal-LM loss.

    model = AutoDistributedModelForCausalLM.from_pretrained(ref, peers, tuning_mode="ptune", pre_seq_len=16)
    loss = model(input_ids, labels=labels).loss      # gradients reach model.tuning.prompts through the swarm
    model.tuning.save("prompts.safetensors")         # later: from_pretrained(..., prompts_path="prompts.safetensors")

Only "ptune" (prompts before the first block) is supported: it needs nothing from servers. "deep_ptune"
(Petals' prompts added to the hidden states before every block) needs servers that take per-block prompts in
rpc_forward / rpc_backward and return their gradients; ours do not, so it is refused here.

Prompts are saved as safetensors under PEFT's prompt-tuning key ``prompt_embeddings`` ([K, D]), so the file is
also readable as the weights half of a PEFT adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from swarm.head import ModelHead

TuningMode = Literal["ptune"]
TUNING_MODES: tuple[str, ...] = get_args(TuningMode)
PROMPTS_KEY = "prompt_embeddings"
IGNORE_INDEX = -100


class PromptTuning(nn.Module):
    """K trainable prompt vectors put in front of every sequence's embeddings."""

    def __init__(self, prompts: torch.Tensor):
        super().__init__()
        self.prompts = nn.Parameter(prompts)  # [K, D]

    @classmethod
    def from_head(cls, head: ModelHead, pre_seq_len: int, seed: int = 0) -> PromptTuning:
        """Start from the embeddings of ``pre_seq_len`` random vocabulary tokens, so the prompts begin in the
        region of embedding space the blocks were trained on (N(0, 1) is far off for most checkpoints)."""
        if pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be at least 1 for prompt tuning, got {pre_seq_len}")
        generator = torch.Generator().manual_seed(seed)
        token_ids = torch.randint(0, head.spec.vocab_size, (1, pre_seq_len), generator=generator)  # [1, K]
        with torch.no_grad():
            return cls(head.embed(token_ids)[0].clone())  # [K, D]

    @classmethod
    def load(cls, path: Path | str, dtype: torch.dtype | None = None) -> PromptTuning:
        """Read prompts saved by ``save``; ``path`` is the file or a folder holding ``adapter_model.safetensors``."""
        path = Path(path)
        if path.is_dir():
            path = path / "adapter_model.safetensors"
        tensors = load_file(path)
        if PROMPTS_KEY not in tensors:
            raise ValueError(f"{path} has no {PROMPTS_KEY!r} tensor (found {sorted(tensors)})")
        prompts = tensors[PROMPTS_KEY]
        return cls(prompts.to(dtype) if dtype is not None else prompts)

    def save(self, path: Path | str) -> None:
        save_file({PROMPTS_KEY: self.prompts.detach().cpu().contiguous()}, str(path))

    @property
    def length(self) -> int:
        return self.prompts.shape[0]

    def prepend(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, D] -> [B, K + S, D]."""
        prompts = self.prompts.to(hidden.dtype).expand(hidden.shape[0], -1, -1)  # [B, K, D]
        return torch.cat([prompts, hidden], dim=1)

    def strip(self, out: torch.Tensor) -> torch.Tensor:
        """[B, K + S, ...] -> [B, S, ...]: drop the prompt positions."""
        return out[:, self.length :]


def make_tuning(
    mode: str | None, head: ModelHead, pre_seq_len: int = 0, prompts_path: Path | str | None = None
) -> PromptTuning | None:
    """The tuning module ``from_pretrained`` asked for; None without a ``mode``."""
    if mode is None:
        if pre_seq_len or prompts_path is not None:
            raise ValueError("pre_seq_len / prompts_path need tuning_mode='ptune'")
        return None
    if mode == "deep_ptune":
        raise NotImplementedError(
            "deep_ptune needs servers that add per-block prompts and return their gradients; "
            "this swarm's servers do not, use tuning_mode='ptune'"
        )
    if mode not in TUNING_MODES:
        raise ValueError(f"unknown tuning_mode {mode!r}; known: {', '.join(TUNING_MODES)}")
    width = head.spec.hidden_size
    if prompts_path is not None:
        tuning = PromptTuning.load(prompts_path, head.embed_tokens.weight.dtype)
        if pre_seq_len and pre_seq_len != tuning.length:
            raise ValueError(f"{prompts_path} holds {tuning.length} prompts, not pre_seq_len={pre_seq_len}")
        if tuning.prompts.shape[1] != width:
            raise ValueError(f"{prompts_path} prompts have width {tuning.prompts.shape[1]}, not {width}")
        return tuning
    return PromptTuning.from_head(head, pre_seq_len)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits [B, S, V] at position i predict labels [B, S] at i + 1;
    labels equal to -100 are ignored (as in transformers)."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B * (S - 1), V]
    targets = labels[:, 1:].reshape(-1).to(shifted.device)  # [B * (S - 1)]
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX)
