"""Client-side LoRA over remote blocks: the client owns the A/B factors, servers apply them per request.

    lora = LoraTuning.create(spec, rank=8, alpha=16, targets=("q_proj", "v_proj"))
    lora.span_tensors()                    # SpanTensors for every block, sent with rpc_forward / rpc_backward
    lora.save_pretrained("out/")           # PEFT format: adapter_config.json + adapter_model.safetensors
    LoraTuning.load("out/", spec)          # back again (also reads adapters trained with peft itself)

Each target's factors are stacked over blocks: A [N, rank, in], B [N, out, rank]. Like PEFT, A starts random and
B at zero, so training starts at the base model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from swarm.config import ModelSpec
from swarm.messages import LORA_TARGETS, LoraSpec, TuningSpec
from swarm.span_tensors import SpanTensors
from swarm.weights import block_prefix

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MODULE_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def lora_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """target -> (in_features, out_features) of that linear in a Llama-style block of ``spec``."""
    d, i = spec.hidden_size, spec.intermediate_size
    dq, dkv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    return {
        "q_proj": (d, dq),
        "k_proj": (d, dkv),
        "v_proj": (d, dkv),
        "o_proj": (dq, d),
        "gate_proj": (d, i),
        "up_proj": (d, i),
        "down_proj": (i, d),
    }


def check_targets(targets: tuple[str, ...]) -> None:
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; known: {', '.join(LORA_TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets repeat: {list(targets)}")


def peft_key(spec: ModelSpec, block: int, target: str, factor: str) -> str:
    """PEFT's name for a factor: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""
    return f"base_model.model.{block_prefix(spec, block)}{_MODULE_PATHS[target]}.lora_{factor}.weight"


class LoraTuning(nn.Module):
    """Trainable LoRA factors for every block of the model; the blocks themselves stay on the servers."""

    def __init__(self, spec: ModelSpec, rank: int, alpha: float, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        check_targets(tuple(factors))
        self.spec = spec
        self.rank = rank
        self.alpha = alpha
        self.targets = tuple(factors)
        self.lora_A = nn.ParameterDict({t: nn.Parameter(a) for t, (a, _) in factors.items()})  # each [N, r, in]
        self.lora_B = nn.ParameterDict({t: nn.Parameter(b) for t, (_, b) in factors.items()})  # each [N, out, r]

    @classmethod
    def create(
        cls, spec: ModelSpec, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = ("q_proj", "v_proj"),
        seed: int = 0, dtype: torch.dtype = torch.float32,
    ) -> LoraTuning:  # fmt: skip
        """A random (PEFT's kaiming-uniform bound 1 / sqrt(in)), B zero: the adapted model starts as the base."""
        check_targets(targets)
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        n, shapes = spec.num_hidden_layers, lora_shapes(spec)
        factors = {}
        for target in targets:
            d_in, d_out = shapes[target]
            bound = 1 / math.sqrt(d_in)
            a = (torch.rand(n, rank, d_in, generator=generator) * 2 - 1) * bound  # [N, r, in]
            factors[target] = (a.to(dtype), torch.zeros(n, d_out, rank, dtype=dtype))  # B: [N, out, r]
        return cls(spec, rank, alpha, factors)

    @property
    def length(self) -> int:
        return 0  # no prompt positions

    def prepend(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def strip(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def span_tensors(self) -> SpanTensors:
        spec = TuningSpec(lora=LoraSpec(rank=self.rank, alpha=self.alpha, targets=self.targets))
        tensors = [x for t in self.targets for x in (self.lora_A[t], self.lora_B[t])]
        return SpanTensors(spec, tuple(tensors))

    def save_pretrained(self, folder: Path | str, base_model: str = "") -> None:
        """Write ``folder`` as a PEFT LoRA adapter (loadable with ``peft.PeftModel.from_pretrained``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for t in self.targets:
            for i in range(self.spec.num_hidden_layers):
                tensors[peft_key(self.spec, i, t, "A")] = self.lora_A[t][i].detach().cpu().contiguous()
                tensors[peft_key(self.spec, i, t, "B")] = self.lora_B[t][i].detach().cpu().contiguous()
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": list(self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path | str, spec: ModelSpec, dtype: torch.dtype = torch.float32) -> LoraTuning:
        """Read a PEFT LoRA adapter folder (plain LoRA on every block: no per-layer ranks, no rank patterns)."""
        folder = Path(folder)
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{folder} is not a LoRA adapter (peft_type {config.get('peft_type')!r})")
        if (
            config.get("rank_pattern")
            or config.get("alpha_pattern")
            or config.get("use_rslora")
            or config.get("use_dora")
        ):
            raise ValueError(f"{folder}: rank/alpha patterns, rsLoRA and DoRA are not supported")
        targets = config["target_modules"]
        targets = tuple(t for t in LORA_TARGETS if t in targets) if isinstance(targets, list) else ()
        if not targets:
            raise ValueError(f"{folder}: target_modules {config['target_modules']!r} name none of {LORA_TARGETS}")
        weights = load_file(folder / ADAPTER_WEIGHTS)
        n = spec.num_hidden_layers
        factors = {}
        for t in targets:
            try:
                a = torch.stack([weights[peft_key(spec, i, t, "A")] for i in range(n)])  # [N, r, in]
                b = torch.stack([weights[peft_key(spec, i, t, "B")] for i in range(n)])  # [N, out, r]
            except KeyError as e:
                raise ValueError(f"{folder} lacks {e.args[0]!r}") from None
            factors[t] = (a.to(dtype), b.to(dtype))
        return cls(spec, int(config["r"]), float(config["lora_alpha"]), factors)
