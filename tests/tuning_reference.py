"""Local ground truth for tuning through the swarm: transformers with deep prompts hooked in, and peft's LoRA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from swarm.lora import LoraTuning


@contextmanager
def deep_prompts_added(reference: PreTrainedModel, deep_prompts: torch.Tensor) -> Iterator[None]:
    """While open, decoder layer i adds deep_prompts[i] ([K, D]) to positions [0, K) of its input."""

    def hook_for(i: int):
        def add(module, args):
            hidden, *rest = args  # hidden: [B, S, D]
            k = deep_prompts.shape[1]
            return (torch.cat([hidden[:, :k] + deep_prompts[i], hidden[:, k:]], dim=1), *rest)

        return add

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(reference.model.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def peft_model(reference: PreTrainedModel, lora: LoraTuning, folder: Path) -> PeftModel:
    """``reference`` with ``lora`` as saved in PEFT format and loaded back by peft itself."""
    lora.save_pretrained(folder)
    return PeftModel.from_pretrained(reference, folder, is_trainable=True).eval()


def peft_factor_grads(model: PeftModel, lora: LoraTuning) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's LoRA gradients, stacked over blocks like ``LoraTuning``'s: target -> (dA [N, r, in], dB [N, out, r])."""
    grads: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {t: ([], []) for t in lora.targets}
    for layer in model.base_model.model.model.layers:
        for target in lora.targets:
            parent = layer.self_attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            module = getattr(parent, target)
            grads[target][0].append(module.lora_A["default"].weight.grad)
            grads[target][1].append(module.lora_B["default"].weight.grad)
    return {t: (torch.stack(a), torch.stack(b)) for t, (a, b) in grads.items()}
