"""Test doubles for the gateway: a tiny random head with SmolLM2's vocabulary and a fake swarm client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch

from gateway.generation.model import LoadedModel
from swarm.errors import BadRequestError
from swarm.records import ModelCoverage, RemoteServer

MODEL_ID = "tiny-smollm"
VOCAB = 49152
HIDDEN = 16
NUM_BLOCKS = 4
CONTEXT = 256
EOS = 2


class TinyHead:
    """A random tied-embedding head with the tokenizer's vocabulary; logits are sharp to avoid near-ties."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(VOCAB, HIDDEN, generator=g)  # [V, D]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[input_ids]  # [B, S, D]

    def logits(self, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        if last_only:
            hidden = hidden[:, -1:, :]  # [B, 1, D]
        normed = hidden / hidden.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        return (normed @ self.weight.T * 2.0).float()  # [B, S, V]


@dataclass
class FakeSession:
    batch_size: int
    max_length: int
    mixer: torch.Tensor  # [D, D]
    fail_at_step: int | None = None
    error: BaseException | None = None
    step_delay_s: float = 0.0
    position: int = 0
    steps: int = 0
    closed: bool = False
    adapter: str | None = None
    extras: object = None
    first_length: int | None = None
    """Length of the first step (the prompt, plus tuned prompts of a prompt variant)."""

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, S, D]
        if self.step_delay_s:
            await asyncio.sleep(self.step_delay_s)
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise self.error or RuntimeError("injected")
        batch, length, _ = hidden.shape
        if batch != self.batch_size or self.position + length > self.max_length:
            raise BadRequestError(f"bad step shape {tuple(hidden.shape)} at position {self.position}")
        if self.first_length is None:
            self.first_length = length
        self.position += length
        self.steps += 1
        return torch.tanh(hidden @ self.mixer)  # [B, S, D]


@dataclass
class FakeSwarm:
    """Records every session; errors can be injected at open time or at a given step."""

    missing: list[int] = field(default_factory=list)
    open_error: BaseException | None = None
    step_error: BaseException | None = None
    fail_at_step: int | None = None
    step_delay_s: float = 0.0
    sessions: list[FakeSession] = field(default_factory=list)
    servers: list[RemoteServer] = field(default_factory=list)
    """What coverage lookups report as announced servers (their records' adapters become model variants)."""
    shut_down: bool = False

    def __post_init__(self) -> None:
        self.mixer = torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(1)) / HIDDEN**0.5

    async def model_coverage(self, model_id: str) -> ModelCoverage:
        return ModelCoverage(
            model_id=model_id, num_blocks=NUM_BLOCKS, missing=list(self.missing), servers=list(self.servers)
        )

    @asynccontextmanager
    async def inference_session(
        self, model_id: str, *, max_length: int, batch_size: int, extras=None, adapter: str | None = None
    ) -> AsyncIterator[FakeSession]:
        if self.open_error is not None:
            raise self.open_error
        session = FakeSession(batch_size, max_length, self.mixer, self.fail_at_step, self.step_error, self.step_delay_s)
        session.adapter, session.extras = adapter, extras  # what a variant asked for
        self.sessions.append(session)
        try:
            yield session
        finally:
            session.closed = True

    async def shutdown(self) -> None:
        self.shut_down = True


def parse_sse(body: str) -> list[dict | str]:
    """SSE body -> list of decoded ``data:`` payloads ('[DONE]' stays a string)."""
    events: list[dict | str] = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def tiny_loaded_model(tokenizer, context_length: int = CONTEXT) -> LoadedModel:
    """The gateway's view of the tiny model: the real SmolLM2 tokenizer and a tiny random head."""
    return LoadedModel(
        ref="tiny",
        model_id=MODEL_ID,
        num_blocks=NUM_BLOCKS,
        tokenizer=tokenizer,
        head=TinyHead(),
        context_length=context_length,
        vocab_size=VOCAB,
        eos_token_ids=frozenset({EOS}),
    )
