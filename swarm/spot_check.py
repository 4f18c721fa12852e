"""Spot-checks: rerun a span's step on another server that hosts it, and ban a server caught returning wrong outputs.

A checked step on blocks [start, end) served by X is recomputed statelessly (``rpc_forward``) on a server Y that
also hosts [start, end); for an inference step Y is given the span's whole input history (the session keeps it
for failover anyway), and the last positions of its output are compared with X's. From two answers one cannot
tell who lies, so a mismatch is settled by a third server Z: whoever disagrees with Z is banned for
``spot_check_ban_s`` and never routed through meanwhile. Without a third server the mismatch is logged and
counted, and no one is banned. The caller redoes the span on other servers when X was the liar (the session
exactly as on a failover), so the output is unaffected.

Cost: a checked step adds one stateless forward of the span's history on Y (and, on a mismatch, one on Z), run
before the step's output is used. ``spot_check_probability`` sets how often; past ``spot_check_max_tokens`` of
history the probability falls as 1 / length, so the expected cost per step stays flat on long sessions.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from swarm.errors import SwarmError
from swarm.records import RemoteServer, ServerState
from swarm.routing import Hop
from swarm.span_call import call_forward

if TYPE_CHECKING:
    from swarm.client import SwarmClient
    from swarm.remote_autograd import ForwardCall

logger = logging.getLogger(__name__)

EPSILONS_OF_SLACK = 50.0
"""Honest servers differ by about a dozen machine epsilons of the coarser dtype per token (measured over SmolLM2's
30 blocks: 1.5e-6 in float32, 5.3e-2 between bfloat16 and float32, 1.4e-2 between float16 and float32; see
``scripts/bench_spot_check.py``); a pair's tolerance is this many epsilons."""


@dataclass(frozen=True)
class Answer:
    """One server's output for the checked positions, and the dtype it computes in (from its record)."""

    peer_id: str
    output: torch.Tensor  # [B, S, D]
    dtype: str = "float32"


def machine_epsilon(dtype: str) -> float:
    """Unknown or non-float dtypes count as bfloat16, the coarsest that servers run."""
    found = getattr(torch, dtype, None) if dtype.isidentifier() else None
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        found = torch.bfloat16
    return torch.finfo(found).eps


def pair_tolerance(a: str, b: str, compression: str, floor: float) -> float:
    """Largest relative error allowed between two honest servers computing in dtypes ``a`` and ``b``, with
    activations sent as ``compression`` (float16 rounds them too)."""
    dtypes = [a, b] + (["float16"] if compression == "float16" else [])
    return max(floor, EPSILONS_OF_SLACK * max(machine_epsilon(d) for d in dtypes))


@dataclass
class SpotCheckStats:
    """What a client's spot-checks found so far."""

    checks: int = 0
    """Steps recomputed on a second server."""
    mismatches: int = 0
    """Checks where the two servers disagreed beyond the tolerance."""
    unresolved: int = 0
    """Mismatches that no third server could settle (no one banned)."""
    banned: set[str] = field(default_factory=set)
    """Peers caught returning wrong activations."""
    largest_agreeing_error: float = 0.0
    """The largest relative error among checks that agreed: how close honest servers come to the tolerance."""


@dataclass(frozen=True)
class Verdict:
    agreed: bool
    liars: tuple[str, ...] = ()
    error: float = 0.0
    """Relative error between the first two answers."""
    max_abs_diff: float = 0.0


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ||a - b|| / ||b|| over token vectors ([..., D]): insensitive to the activations' scale, which
    varies by model, depth and position, and not diluted when only some positions are wrong."""
    a, b = a.float(), b.float()
    per_token = torch.linalg.vector_norm(a - b, dim=-1) / torch.linalg.vector_norm(b, dim=-1).clamp_min(1e-12)
    return float(per_token.max())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def judge(
    primary: Answer, verifier: Answer, referee: Answer | None, compression: str = "none", floor: float = 0.01
) -> Verdict:
    """Who lies among the answers: nobody if the first two agree; else whoever disagrees with the referee (both
    disagreeing with it, or no referee, settles nothing). Each pair is held to ``pair_tolerance``."""

    def agree(x: Answer, y: Answer) -> tuple[bool, float]:
        error = relative_error(x.output, y.output)
        return error <= pair_tolerance(x.dtype, y.dtype, compression, floor), error

    agreed, error = agree(primary, verifier)
    diff = max_abs_diff(primary.output, verifier.output)
    if agreed or referee is None:
        return Verdict(agreed=agreed, error=error, max_abs_diff=diff)
    liars = tuple(answer.peer_id for answer in (primary, verifier) if not agree(answer, referee)[0])
    if len(liars) != 1:
        return Verdict(agreed=False, error=error, max_abs_diff=diff)
    return Verdict(agreed=False, liars=liars, error=error, max_abs_diff=diff)


def hop_span(hop: Hop) -> tuple[int, int]:
    return hop.start, hop.end


class SpotChecker:
    """A client's spot-checks: when to check, the check itself, and its counters (``stats``)."""

    def __init__(self, client: SwarmClient, rng: random.Random | None = None):
        self.client = client
        self.stats = SpotCheckStats()
        self._rng = rng or random.Random()

    def wanted(self, tokens: int) -> bool:
        """Whether to check a step whose stateless recomputation spans ``tokens`` positions."""
        config = self.client.config
        probability = config.spot_check_probability
        if tokens > config.spot_check_max_tokens:
            # A check recomputes the whole history, so its cost grows with it: check long histories less often,
            # keeping the expected cost per step flat instead of never checking them.
            probability *= config.spot_check_max_tokens / tokens
        return probability > 0 and self._rng.random() < probability

    async def caught(
        self,
        model_id: str,
        hop: Hop,
        history: torch.Tensor,
        output: torch.Tensor,
        forward_call: ForwardCall = call_forward,
    ) -> bool:
        """Recompute ``hop`` on ``history`` [B, T, D] elsewhere; True if ``output`` [B, S, D] (its last S
        positions) was wrong and ``hop``'s server is now banned. False also when no other server could check."""
        answers = self._answers(model_id, hop, history, output.shape[1], forward_call)
        try:
            verifier = await anext(answers, None)
            if verifier is None:
                return False
            self.stats.checks += 1
            primary = Answer(hop.peer_id, output, hop.server.record.dtype)
            config = self.client.config
            verdict = judge(primary, verifier, None, config.compression, config.spot_check_tolerance)
            if verdict.agreed:
                self.stats.largest_agreeing_error = max(self.stats.largest_agreeing_error, verdict.error)
                return False
            self.stats.mismatches += 1
            referee = await anext(answers, None)
            verdict = judge(primary, verifier, referee, config.compression, config.spot_check_tolerance)
        finally:
            await answers.aclose()
        if not verdict.liars:
            self.stats.unresolved += 1
            logger.warning(
                "spot-check: peers %s and %s disagree on blocks %d:%d of %s (relative error %.3g, max abs diff "
                "%.3g) and no third server settled it; nobody banned",
                hop.peer_id, verifier.peer_id, hop.start, hop.end, model_id, verdict.error, verdict.max_abs_diff,
            )  # fmt: skip
            return False
        for liar in verdict.liars:
            self._ban(liar, model_id, hop, verdict, referee_peer=referee.peer_id if referee else "?")
        return hop.peer_id in verdict.liars

    def _ban(self, peer_id: str, model_id: str, hop: Hop, verdict: Verdict, referee_peer: str) -> None:
        ban_s = self.client.config.spot_check_ban_s
        self.client.bans.distrust(peer_id, ban_s)
        self.stats.banned.add(peer_id)
        logger.warning(
            "spot-check: peer %s returned wrong activations for blocks %d:%d of %s (max abs diff %.3g, relative "
            "error %.3g; referee %s agreed with the other server); banned for %.0fs",
            peer_id, hop.start, hop.end, model_id, verdict.max_abs_diff, verdict.error, referee_peer, ban_s,
        )  # fmt: skip

    async def _answers(
        self, model_id: str, hop: Hop, history: torch.Tensor, positions: int, forward_call: ForwardCall
    ) -> AsyncIterator[Answer]:
        """Outputs of other servers hosting hop's blocks, in random order; servers that fail are skipped."""
        for server in await self._candidates(model_id, hop):
            try:
                out = await forward_call(self.client, model_id, Hop(server, hop.start, hop.end), history)
            except SwarmError as e:  # like any failed call: avoided for a while (routes and checks alike)
                logger.info("spot-check: peer %s could not check blocks %d:%d: %s", server.peer_id, *hop_span(hop), e)
                if e.retryable:
                    self.client.bans.ban(server.peer_id)
                continue
            yield Answer(server.peer_id, out[:, -positions:], server.record.dtype)

    async def _candidates(self, model_id: str, hop: Hop) -> list[RemoteServer]:
        try:
            coverage = await self.client.model_coverage(model_id)
        except Exception as e:  # a DHT hiccup skips this check; it must not fail the step it checks
            logger.debug("spot-check: no coverage of %s to pick a checker from: %s", model_id, e)
            return []
        avoid = self.client.bans.banned() | {hop.peer_id}
        servers = [
            s
            for s in coverage.servers
            if s.record.state == ServerState.ONLINE and s.start <= hop.start and s.end >= hop.end
            and s.peer_id not in avoid
        ]  # fmt: skip
        self._rng.shuffle(servers)
        return servers
