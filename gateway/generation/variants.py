"""Served variants of a model, each its own model id ``MODEL:NAME``: a LoRA adapter that servers announce, or a
tuned prompt the gateway holds (``--prompts NAME=PATH``) and puts in front of every prompt in embedding space."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gateway.generation.model import LoadedModel
from swarm.span_tensors import SpanTensors

VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Names after the colon: what ``--adapters`` (servers) and ``--prompts`` (gateway) accept."""


@dataclass(frozen=True)
class ModelVariant:
    """What makes ``MODEL:NAME`` differ from ``MODEL``."""

    name: str
    adapter: str | None = None
    """A LoRA adapter applied by the servers that announce it."""
    prompts: torch.Tensor | None = None
    """[K, D] tuned prompts prepended to the prompt's embeddings."""
    extras: SpanTensors | None = None
    """Deep prompts for every block (``deep_ptune``), sent when each session opens."""

    @property
    def prompt_length(self) -> int:
        return self.prompts.shape[0] if self.prompts is not None else 0


def parse_prompts_option(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not path or not VARIANT_NAME.match(name):
        raise ValueError(f"--prompts takes NAME=PATH, NAME matching {VARIANT_NAME.pattern}; got {text!r}")
    return name, Path(path)


def prompt_variant(model: LoadedModel, name: str, path: Path) -> LoadedModel:
    """``model`` with the prompts saved by ``swarm.tuning`` (ptune or deep_ptune) at ``path``."""
    from swarm.tuning import DEEP_PROMPTS_KEY, DeepPromptTuning, PromptTuning, read_prompts

    tensors = read_prompts(path, torch.float32)
    tuning = DeepPromptTuning.load(path) if DEEP_PROMPTS_KEY in tensors else PromptTuning.load(path)
    prompts = tuning.prompts.detach()  # [K, D]
    width = model.head.embed(torch.zeros(1, 1, dtype=torch.long, device=model.device)).shape[-1]
    if prompts.shape[1] != width:
        raise ValueError(f"{path}: prompts of width {prompts.shape[1]} do not fit {model.model_id} (width {width})")
    extras = tuning.span_tensors()
    if extras is not None and extras.tensors[0].shape[0] != model.num_blocks:
        raise ValueError(f"{path}: deep prompts for {extras.tensors[0].shape[0]} blocks, not {model.num_blocks}")
    variant = ModelVariant(name, prompts=prompts.to(model.device), extras=extras.detached() if extras else None)
    return with_variant(model, variant)


def adapter_variant(model: LoadedModel, adapter: str) -> LoadedModel:
    return with_variant(model, ModelVariant(adapter, adapter=adapter))


def with_variant(model: LoadedModel, variant: ModelVariant) -> LoadedModel:
    # Tuned prompts take positions of the context, so the user's prompt and answer get that much less.
    derived = dataclasses.replace(model, variant=variant, context_length=model.context_length - variant.prompt_length)
    derived.token_text = model.token_text  # same tokenizer: share its decode cache
    return derived


def public_id(model: LoadedModel) -> str:
    return model.model_id if model.variant is None else f"{model.model_id}:{model.variant.name}"
