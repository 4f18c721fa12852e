"""LoadedModel: one served model's tokenizer, head and limits; ``load_model`` builds it from a reference."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from gateway.generation.combining_head import CombiningHead
from gateway.generation.protocols import ModelHeadLike
from gateway.generation.token_text import TokenText
from gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from gateway.generation.variants import ModelVariant

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything the gateway holds for one model; the blocks themselves live in the swarm."""

    ref: str
    model_id: str
    num_blocks: int
    tokenizer: PreTrainedTokenizerBase
    head: ModelHeadLike
    context_length: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    variant: ModelVariant | None = None
    """Set on a served variant ``MODEL:NAME`` (an adapter or tuned prompts; ``gateway.generation.variants``)."""
    token_text: TokenText = field(init=False)

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.tokenizer)


ModelLoader = Callable[[str, GatewaySettings], LoadedModel]
"""(model reference, settings) -> LoadedModel; blocking, called off the event loop at start-up."""


def load_model(ref: str, settings: GatewaySettings) -> LoadedModel:
    """Resolve (download/convert once) a model, then load its tokenizer and local head."""
    from swarm.head import ModelHead
    from swarm.weights import resolve_model

    resolved = resolve_model(ref, settings.cache_dir)
    logger.info("loading tokenizer and head of %s from %s", resolved.model_id, resolved.folder)
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.folder))
    device = torch.device(settings.device)
    # Concurrent requests' logits run as one matmul (see combining_head); a lone request computes at once.
    head = CombiningHead(ModelHead.load(resolved, dtype=getattr(torch, settings.dtype), device=device))
    spec = resolved.spec
    eos = set(spec.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return LoadedModel(
        ref=ref,
        model_id=resolved.model_id,
        num_blocks=spec.num_hidden_layers,
        tokenizer=tokenizer,
        head=head,
        context_length=spec.max_position_embeddings,
        vocab_size=spec.vocab_size,
        eos_token_ids=frozenset(eos),
        device=device,
    )
