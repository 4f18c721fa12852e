"""Client-side LoRA files are PEFT's format (standard key names, adapter_config.json), and the wire spec of
per-block trainables counts its tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swarm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraTuning
from swarm.messages import ForwardRequest, LoraSpec, TuningSpec
from swarm.weights import ResolvedModel, resolve_model


@pytest.fixture
def tiny(tiny_llama_dir: Path, tmp_path: Path) -> ResolvedModel:
    return resolve_model(str(tiny_llama_dir), tmp_path / "cache")


def test_saved_adapter_uses_peft_names_and_loads_back(tiny: ResolvedModel, tmp_path: Path) -> None:
    lora = LoraTuning.create(tiny.spec, rank=2, alpha=4.0, targets=("q_proj", "gate_proj"))
    assert lora.lora_A["q_proj"].shape == (4, 2, 64) and lora.lora_B["gate_proj"].shape == (4, 128, 2)
    assert not lora.lora_B["q_proj"].any()  # B starts at zero: the adapted model starts as the base
    lora.save_pretrained(tmp_path / "a", base_model="tiny")
    keys = set(load_file(tmp_path / "a" / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.mlp.gate_proj.lora_B.weight" in keys
    assert len(keys) == 4 * 2 * 2
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 4.0)
    assert config["target_modules"] == ["q_proj", "gate_proj"]
    loaded = LoraTuning.load(tmp_path / "a", tiny.spec)
    for target in ("q_proj", "gate_proj"):
        torch.testing.assert_close(loaded.lora_A[target], lora.lora_A[target].detach())


def test_unsupported_adapters_are_refused_with_their_reason(tiny: ResolvedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoraTuning.create(tiny.spec, targets=("qkv",))
    LoraTuning.create(tiny.spec, rank=2, targets=("v_proj",)).save_pretrained(tmp_path / "a")
    config_path = tmp_path / "a" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        LoraTuning.load(tmp_path / "a", tiny.spec)
    config_path.write_text(json.dumps({**config, "target_modules": ["o_proj"]}))
    with pytest.raises(ValueError, match="lacks"):
        LoraTuning.load(tmp_path / "a", tiny.spec)


def test_tuning_spec_counts_its_tensors_and_travels_in_requests() -> None:
    spec = TuningSpec(prompts=4, lora=LoraSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")))
    assert spec.num_tensors == 1 + 2 * 2 and spec.lora.scale == 2.0
    request = ForwardRequest(model_id="m", start=0, end=2, tuning=spec, adapter=None)
    assert ForwardRequest.decode(request.encode()).tuning == spec
    assert ForwardRequest.decode(b'{"model_id": "m", "start": 0, "end": 2}').tuning is None
