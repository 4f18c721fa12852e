"""LoRA adapters a server serves by name (``--adapters NAME=PATH``): PEFT folders, loaded for the hosted blocks."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from server.model.tuning import BlockLora
from swarm.config import ModelSpec
from swarm.lora import LoraTuning

logger = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Adapter names travel in model ids (``model:adapter``) and DHT records: short, no colons or spaces."""


def parse_adapter_option(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (name, path); ValueError with the expected form otherwise."""
    name, sep, path = text.partition("=")
    if not sep or not path or not ADAPTER_NAME.match(name):
        raise ValueError(f"--adapters takes NAME=PATH, NAME matching {ADAPTER_NAME.pattern}; got {text!r}")
    return name, Path(path)


def load_adapters(
    options: list[str],
    spec: ModelSpec,
    start: int,
    end: int,
    supported_targets: tuple[str, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, list[BlockLora]]:
    """name -> one ``BlockLora`` per hosted block [start, end) (the whole model's adapter is read, then sliced)."""
    adapters: dict[str, list[BlockLora]] = {}
    for option in options:
        name, path = parse_adapter_option(option)
        if name in adapters:
            raise ValueError(f"adapter {name!r} is given twice")
        lora = LoraTuning.load(path, spec, dtype)
        unsupported = [t for t in lora.targets if t not in supported_targets]
        if unsupported:
            raise ValueError(f"adapter {name!r} adapts {unsupported}: {spec.model_type} blocks here cannot")
        scale = lora.alpha / lora.rank
        factors = {t: (lora.lora_A[t].detach().to(device), lora.lora_B[t].detach().to(device)) for t in lora.targets}
        adapters[name] = [
            BlockLora({t: (a[i], b[i]) for t, (a, b) in factors.items()}, scale) for i in range(start, end)
        ]
        logger.info("adapter %s from %s: rank %d, targets %s", name, path, lora.rank, ", ".join(lora.targets))
    return adapters
