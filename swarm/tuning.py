"""Client-side fine-tuning pieces: trainable prompts, the tuning modes, and the causal-LM loss.

    model = AutoDistributedModelForCausalLM.from_pretrained(ref, peers, tuning_mode="ptune", pre_seq_len=16)
    loss = model(input_ids, labels=labels).loss      # gradients reach model.tuning.prompts through the swarm
    model.tuning.save("prompts.safetensors")         # later: from_pretrained(..., prompts_path="prompts.safetensors")

Modes:
  ptune       K prompts before the first block; needs nothing from servers.
  deep_ptune  as ptune, plus per-block prompts [N, K, D] added to the hidden states of positions [0, K) at the
              input of every block (Petals' deep prompt tuning); servers get their span's rows with each
              request and return their gradients.
  lora        client-side LoRA factors for chosen linears of every block (``swarm.lora``).

Prompts are saved as safetensors under PEFT's prompt-tuning key ``prompt_embeddings`` ([K, D]), so the file is
also readable as the weights half of a PEFT adapter; deep prompts add ``deep_prompt_embeddings`` ([N, K, D]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from swarm.head import ModelHead
from swarm.lora import LoraTuning
from swarm.messages import TuningSpec
from swarm.span_tensors import SpanTensors

TuningMode = Literal["ptune", "deep_ptune", "lora"]
TUNING_MODES: tuple[str, ...] = get_args(TuningMode)
PROMPTS_KEY = "prompt_embeddings"
DEEP_PROMPTS_KEY = "deep_prompt_embeddings"
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
        prompts = read_prompts(path, dtype)
        return cls(prompts[PROMPTS_KEY])

    def save(self, path: Path | str) -> None:
        save_file({PROMPTS_KEY: self.prompts.detach().cpu().contiguous()}, str(path))

    def span_tensors(self) -> SpanTensors | None:
        """Per-block tensors for the servers: none, the prompts only enter before the first block."""
        return None

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


class DeepPromptTuning(PromptTuning):
    """Prompt tuning plus per-block prompts added to positions [0, K) at every block's input (Petals' deep_ptune).

    The per-block prompts start at zero (as in Petals), so training starts from plain prompt tuning.
    """

    def __init__(self, prompts: torch.Tensor, deep_prompts: torch.Tensor):
        super().__init__(prompts)
        if deep_prompts.ndim != 3 or deep_prompts.shape[1:] != prompts.shape:
            raise ValueError(f"deep prompts {list(deep_prompts.shape)} do not match prompts {list(prompts.shape)}")
        self.deep_prompts = nn.Parameter(deep_prompts)  # [N, K, D]

    @classmethod
    def from_head(cls, head: ModelHead, pre_seq_len: int, seed: int = 0) -> DeepPromptTuning:
        prompts = PromptTuning.from_head(head, pre_seq_len, seed).prompts.detach()  # [K, D]
        return cls(prompts, torch.zeros(head.spec.num_hidden_layers, *prompts.shape, dtype=prompts.dtype))

    @classmethod
    def load(cls, path: Path | str, dtype: torch.dtype | None = None) -> DeepPromptTuning:
        tensors = read_prompts(path, dtype)
        if DEEP_PROMPTS_KEY not in tensors:
            raise ValueError(f"{path} has no {DEEP_PROMPTS_KEY!r} tensor: saved by plain prompt tuning?")
        return cls(tensors[PROMPTS_KEY], tensors[DEEP_PROMPTS_KEY])

    def save(self, path: Path | str) -> None:
        tensors = {PROMPTS_KEY: self.prompts, DEEP_PROMPTS_KEY: self.deep_prompts}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))

    def span_tensors(self) -> SpanTensors:
        return SpanTensors(TuningSpec(prompts=self.length), (self.deep_prompts,))


Tuning = PromptTuning | LoraTuning
"""What ``make_tuning`` returns: each has ``length`` (prompt positions), ``prepend``, ``strip``, ``span_tensors``."""


def read_prompts(path: Path | str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The tensors of a prompts file saved by ``PromptTuning.save`` (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    tensors = load_file(path)
    if PROMPTS_KEY not in tensors:
        raise ValueError(f"{path} has no {PROMPTS_KEY!r} tensor (found {sorted(tensors)})")
    return {k: v.to(dtype) if dtype is not None else v for k, v in tensors.items()}


def make_tuning(
    mode: str | None,
    head: ModelHead,
    pre_seq_len: int = 0,
    prompts_path: Path | str | None = None,
    lora: dict | None = None,
) -> Tuning | None:
    """The tuning module ``from_pretrained`` asked for; None without a ``mode``.

    ``lora`` (mode "lora"): ``{"rank": 8, "alpha": 16, "targets": ("q_proj", "v_proj")}`` for fresh factors, or
    ``{"path": folder}`` for a saved PEFT adapter.
    """
    if mode is None:
        if pre_seq_len or prompts_path is not None or lora:
            raise ValueError("pre_seq_len / prompts_path / lora need a tuning_mode")
        return None
    if mode not in TUNING_MODES:
        raise ValueError(f"unknown tuning_mode {mode!r}; known: {', '.join(TUNING_MODES)}")
    dtype = head.embed_tokens.weight.dtype
    if mode == "lora":
        options = dict(lora or {})
        if "path" in options:
            return LoraTuning.load(options["path"], head.spec, dtype)
        return LoraTuning.create(head.spec, dtype=dtype, **options)
    kind = DeepPromptTuning if mode == "deep_ptune" else PromptTuning
    width = head.spec.hidden_size
    if prompts_path is not None:
        tuning = kind.load(prompts_path, dtype)
        if pre_seq_len and pre_seq_len != tuning.length:
            raise ValueError(f"{prompts_path} holds {tuning.length} prompts, not pre_seq_len={pre_seq_len}")
        if tuning.prompts.shape[1] != width:
            raise ValueError(f"{prompts_path} prompts have width {tuning.prompts.shape[1]}, not {width}")
        return tuning
    return kind.from_head(head, pre_seq_len)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits [B, S, V] at position i predict labels [B, S] at i + 1;
    labels equal to -100 are ignored (as in transformers)."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B * (S - 1), V]
    targets = labels[:, 1:].reshape(-1).to(shifted.device)  # [B * (S - 1)]
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX)
