"""Continuous batching's pure part: which pending inference steps (and how many of their tokens) run next.

The compute thread (``server.backend``) keeps the pending steps; ``plan_batch`` picks one batch from them:
steps over the same block range, short (decode) steps first, long prompts cut into chunks of at most
``prefill_chunk_tokens`` so a long prefill advances one chunk per batch while decode steps keep flowing.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from server.sessions import Session


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 1024
    """Most tokens (rows x length, summed over sessions) one batched forward runs."""
    prefill_chunk_tokens: int = 256
    """Longest slice of one step's sequence that one batch runs; longer steps take several batches."""
    batch_wait_s: float = 0.0
    """How long the compute thread waits for company after a step arrives (0: a lone step runs at once)."""


@dataclass(eq=False)
class PendingStep:
    """One inference step waiting for (or partly through) the compute thread."""

    session: Session
    hidden: torch.Tensor  # [B, S, D], as it arrived (the compute thread moves it to the device)
    position: int
    future: Future[torch.Tensor]
    done: int = 0
    """Tokens (along S) already computed; the cache holds them."""
    outputs: list[torch.Tensor] = field(default_factory=list)  # each [B, S_chunk, D]

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def remaining(self) -> int:
        return self.hidden.shape[1] - self.done

    @property
    def blocks(self) -> tuple[int, int]:
        return self.session.start, self.session.end


def plan_batch(pending: Sequence[PendingStep], limits: BatchLimits) -> list[tuple[PendingStep, int]]:
    """Steps for the next forward and how many tokens of each to run: ``[(step, length), ...]``.

    Only steps over the oldest step's block range join (one forward runs one range). Decode-sized steps go
    first in arrival order, then chunks of longer ones while the token budget lasts. The first pick always
    runs, cut to fit the budget if its rows alone exceed it, so nothing waits forever.
    """
    if not pending:
        return []
    key = pending[0].blocks
    group = [st for st in pending if st.blocks == key]
    chunk = max(1, limits.prefill_chunk_tokens)
    ordered = sorted(group, key=lambda st: st.remaining > chunk)  # stable: arrival order within each class
    plan: list[tuple[PendingStep, int]] = []
    budget = limits.max_batch_tokens
    for st in ordered:
        take = min(st.remaining, chunk, budget // st.rows)
        if take <= 0:
            if plan:
                continue
            take = 1  # one row group larger than the whole budget still has to run
        plan.append((st, take))
        budget -= take * st.rows
    return plan
