"""Shared fixtures: tiny random-weight models of each supported shape, and the real SmolLM2 model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# tests/ has no __init__.py, so pytest puts tests/ (not the repo) on sys.path; make tests.helpers importable.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from swarm.weights import BUILTIN_SMOLLM2, ResolvedModel, resolve_model  # noqa: E402
from tests.helpers import MODEL_CACHE, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with GQA (4 heads, 2 kv heads), 4 layers, hidden 64, vocab 128, untied embeddings."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 with q/k/v biases and tied embeddings."""
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with Llama 3.1 rope scaling."""
    return make_tiny_model("llama3", tmp_path_factory.mktemp("tiny-llama3"))


@pytest.fixture(scope="session")
def smollm2() -> ResolvedModel:
    """The built-in SmolLM2-135M-Instruct, converted once into ``<repo>/.cache/models`` and reused."""
    return resolve_model(BUILTIN_SMOLLM2, MODEL_CACHE)
