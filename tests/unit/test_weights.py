"""Model references and lazy, selective weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from server.model import BlockSpan
from swarm.config import ModelSpec
from swarm.head import ModelHead
from swarm.weights import block_prefix, load_tensors, resolve_model, safetensors_files
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharded") / "tiny-sharded"
    return make_tiny_model("llama", folder, max_shard_size="100KB", num_hidden_layers=6)


def test_resolve_local_folder_defaults_id_to_folder_name(tiny_llama_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(tiny_llama_dir), tmp_path)
    assert resolved.model_id == tiny_llama_dir.name
    assert resolved.folder == tiny_llama_dir.resolve()
    assert resolved.spec.num_hidden_layers == 4 and resolved.spec.num_key_value_heads == 2
    assert resolve_model(str(tiny_llama_dir), tmp_path, model_id="mine").model_id == "mine"


def test_resolve_sharded_folder_and_load_across_shards(sharded_dir: Path, tmp_path: Path) -> None:
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    files = safetensors_files(sharded_dir)
    assert len(set(files.values())) > 1
    resolved = resolve_model(str(sharded_dir), tmp_path)
    assert resolved.model_id == "tiny-sharded" and resolved.spec.num_hidden_layers == 6
    names = ["model.embed_tokens.weight", "lm_head.weight", block_prefix(resolved.spec, 3) + "mlp.down_proj.weight"]
    assert len({files[n] for n in names}) > 1
    tensors = load_tensors(sharded_dir, names, torch.float32)
    assert set(tensors) == set(names)
    with safe_open(str(files[names[2]]), framework="pt") as f:
        torch.testing.assert_close(tensors[names[2]], f.get_tensor(names[2]))


def test_load_tensors_reads_only_requested(tiny_llama_dir: Path) -> None:
    prefix = block_prefix(ModelSpec.from_folder(tiny_llama_dir), 1)
    tensors = load_tensors(tiny_llama_dir, lambda n: n.startswith(prefix), torch.float64)
    assert tensors and all(n.startswith(prefix) for n in tensors)
    assert all(t.dtype == torch.float64 for t in tensors.values())
    assert list(load_tensors(tiny_llama_dir, ["model.norm.weight"], torch.float32)) == ["model.norm.weight"]
    with pytest.raises(KeyError, match="model.nothing"):
        load_tensors(tiny_llama_dir, ["model.norm.weight", "model.nothing"], torch.float32)


def test_span_holds_only_its_blocks(sharded_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(sharded_dir), tmp_path)
    all_block_bytes = 0
    for name, file in safetensors_files(sharded_dir).items():
        if name.startswith("model.layers."):
            with safe_open(str(file), framework="pt") as f:
                t = f.get_slice(name)
                all_block_bytes += torch.Size(t.get_shape()).numel() * 4
    span = BlockSpan.load(resolved, 2, 4)  # a third of the 6 blocks
    span_bytes = sum(p.numel() * p.element_size() for p in span.parameters())
    assert span_bytes == all_block_bytes // 3
    assert sum(p.numel() for p in span.parameters()) == sum(p.numel() for p in span.state_dict().values())


def test_head_ties_embeddings_without_copy(tiny_qwen2_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    tied = ModelHead.load(resolve_model(str(tiny_qwen2_dir), tmp_path))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    untied = ModelHead.load(resolve_model(str(tiny_llama_dir), tmp_path))
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_block_state_dict_has_hf_names(tiny_llama_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(tiny_llama_dir), tmp_path)
    span, prefix = BlockSpan.load(resolved, 0, 1), block_prefix(resolved.spec, 0)
    file_names = {n[len(prefix) :] for n in safetensors_files(tiny_llama_dir) if n.startswith(prefix)}
    assert set(span.blocks[0].state_dict()) == file_names
    # The fused q/k/v weight and its HF-named views stay one storage after a dtype change.
    block = span.blocks[0].to(torch.float64)
    attn = block.self_attn
    assert attn.q_proj.weight.dtype == torch.float64
    assert attn.q_proj.weight.data_ptr() == attn.fused_weight.data_ptr()


@pytest.mark.parametrize("ref", ["no-such-model", "/definitely/not/here.gguf"])
def test_bad_reference_names_itself(ref: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=ref):
        resolve_model(ref, tmp_path)


def test_folder_without_weights_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        resolve_model(str(tmp_path / "empty"), tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        resolve_model(str(tmp_path / "notes.txt"), tmp_path)
