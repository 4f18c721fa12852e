"""Hugging Face style front end: embeddings and head run locally, every transformer block runs in the swarm.

    model = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m-instruct", initial_peers=[...])
    logits = model(input_ids).logits
    tokens = model.generate(input_ids, max_new_tokens=32)
    with model.inference_session(max_length=64) as session: ...

    # prompt tuning (swarm.tuning): gradients come back through the swarm (swarm.remote_autograd)
    model = AutoDistributedModelForCausalLM.from_pretrained(ref, peers, tuning_mode="ptune", pre_seq_len=16)
    model(input_ids, labels=input_ids).loss.backward()

The synchronous API drives the async ``SwarmClient`` on a private event-loop thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from swarm.client import ClientConfig, SwarmClient
from swarm.head import ModelHead
from swarm.remote_autograd import RemoteBlocks
from swarm.sampling import SamplingParams, sample
from swarm.session import InferenceSession
from swarm.tuning import Tuning, causal_lm_loss, make_tuning
from swarm.weights import ResolvedModel, resolve_model

T = TypeVar("T")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "petals-next"


class _LoopThread:
    """A daemon thread running one asyncio loop; ``run`` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class SyncInferenceSession:
    """Blocking wrapper over ``swarm.session.InferenceSession`` for step-by-step use."""

    def __init__(self, model: AutoDistributedModelForCausalLM, session: InferenceSession):
        self._model = model
        self.session = session

    @property
    def position(self) -> int:
        return self.session.position

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._model._loop.run(self.session.step(hidden))

    def close(self) -> None:
        self._model._loop.run(self.session.close())

    def __enter__(self) -> SyncInferenceSession:
        self._model._loop.run(self.session.open())
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AutoDistributedModelForCausalLM(torch.nn.Module):
    def __init__(
        self,
        resolved: ResolvedModel,
        head: ModelHead,
        client: SwarmClient,
        loop: _LoopThread,
        tuning: Tuning | None = None,
    ):
        super().__init__()
        self.resolved = resolved
        self.config = resolved.spec
        self.head = head  # frozen; ``model.head.requires_grad_(True)`` to train it too
        self.tuning = tuning
        self.client = client
        self._loop = loop
        self.blocks = RemoteBlocks(
            client, resolved.model_id, 0, resolved.spec.num_hidden_layers, loop.run, spot_checker=client.spot_checker
        )

    @classmethod
    def from_pretrained(
        cls,
        ref: str,
        initial_peers: Sequence[str],
        *,
        model_id: str | None = None,
        cache_dir: Path | None = None,
        dtype: torch.dtype = torch.float32,
        client_config: ClientConfig | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        prompts_path: Path | str | None = None,
        lora: dict | None = None,
        adapter: str | None = None,
    ) -> AutoDistributedModelForCausalLM:
        """``tuning_mode="ptune"`` / ``"deep_ptune"`` add ``pre_seq_len`` trainable prompts (or those saved at
        ``prompts_path``); ``"lora"`` adds LoRA factors, ``lora={"rank": 8, "alpha": 16, "targets": (...)}`` or
        ``lora={"path": peft_folder}`` (``swarm.tuning.make_tuning``). ``adapter`` names a LoRA adapter that
        servers serve (``--adapters``): inference sessions then run on servers announcing it."""
        resolved = resolve_model(ref, cache_dir or DEFAULT_CACHE_DIR, model_id)
        head = ModelHead.load(resolved, dtype, "cpu")
        tuning = make_tuning(tuning_mode, head, pre_seq_len, prompts_path, lora)
        loop = _LoopThread()
        config = client_config or ClientConfig(initial_peers=list(initial_peers))
        client = loop.run(SwarmClient.create(config))
        model = cls(resolved, head, client, loop, tuning)
        model.adapter = adapter
        return model

    @property
    def adapter(self) -> str | None:
        """A LoRA adapter served by name (``--adapters``) for forward, backward and sessions; None: the base model."""
        return self.blocks.adapter

    @adapter.setter
    def adapter(self, name: str | None) -> None:
        self.blocks.adapter = name

    @property
    def model_id(self) -> str:
        return self.resolved.model_id

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Full-sequence forward (no cache): input_ids [B, S] (or inputs_embeds [B, S, D]) -> logits [B, S, V]
        of those tokens (trained prompts are prepended, their positions dropped from the logits); with labels
        [B, S] also the causal-LM loss. Differentiable: gradients flow back through the swarm."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.head.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [B, S, D]
        extras = None
        if self.tuning is not None:
            hidden = self.tuning.prepend(hidden)  # [B, K + S, D]
            extras = self.tuning.span_tensors()  # deep prompts / LoRA factors, sent to the servers
        hidden = self.blocks(hidden, extras)
        if self.tuning is not None:
            hidden = self.tuning.strip(hidden)  # [B, S, D]
        logits = self.head.logits(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def inference_session(self, max_length: int, batch_size: int = 1) -> SyncInferenceSession:
        """A session that applies the tuning's per-block tensors (deep prompts, LoRA) as they are now."""
        extras = self.tuning.span_tensors() if self.tuning is not None else None
        session = self.client.inference_session(
            self.model_id, max_length=max_length, batch_size=batch_size, extras=extras, adapter=self.adapter
        )
        return SyncInferenceSession(self, session)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        session: SyncInferenceSession | None = None,
    ) -> torch.Tensor:
        """Greedy or sampled continuation: returns [B, S + new] token ids (stops early when all rows hit EOS)."""
        eos = (
            self.config.eos_token_ids
            if eos_token_id is None
            else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        )
        params = SamplingParams(temperature=temperature if do_sample else 0.0, top_p=top_p, top_k=top_k)
        batch = input_ids.shape[0]
        own_session = session is None
        prompt_len = self.tuning.length if self.tuning is not None else 0
        if own_session:
            length = prompt_len + input_ids.shape[1] + max_new_tokens
            session = self.inference_session(length, batch_size=batch).__enter__()
        try:
            tokens = input_ids
            new_ids = input_ids
            done = torch.zeros(batch, dtype=torch.bool)
            for _ in range(max_new_tokens):
                hidden = self.head.embed(new_ids)
                if self.tuning is not None and session.position == 0:
                    hidden = self.tuning.prepend(hidden)  # the prompts open a fresh session
                hidden = session.step(hidden)
                logits = self.head.logits(hidden, last_only=True)[:, -1]
                next_ids = sample(logits, params, generator)
                if eos:
                    next_ids = torch.where(done, torch.tensor(eos[0]), next_ids)
                    done |= torch.isin(next_ids, torch.tensor(eos))
                tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
                new_ids = next_ids[:, None]
                if eos and bool(done.all()):
                    break
            return tokens
        finally:
            if own_session:
                session.close()

    def shutdown(self) -> None:
        self._loop.run(self.client.shutdown())
