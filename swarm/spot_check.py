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

Answer = tuple[str, torch.Tensor]
"""(peer id, the span's output for the checked positions [B, S, D])."""


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
    """||a - b|| / ||b|| over the whole tensor: insensitive to the activations' scale, which varies by model and
    depth, and tolerant of the small per-element differences of honest servers (cache vs no cache, float16 on the
    wire, other dtypes); wrong outputs are off by tens of percent."""
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def judge(primary: Answer, verifier: Answer, referee: Answer | None, tolerance: float) -> Verdict:
    """Who lies among the answers: nobody if the first two agree; else whoever disagrees with the referee (both
    disagreeing with it, or no referee, settles nothing)."""
    (_, p), (_, v) = primary, verifier
    error = relative_error(p, v)
    diff = max_abs_diff(p, v)
    if error <= tolerance:
        return Verdict(agreed=True, error=error, max_abs_diff=diff)
    if referee is None:
        return Verdict(agreed=False, error=error, max_abs_diff=diff)
    _, r = referee
    liars = tuple(peer for peer, out in (primary, verifier) if relative_error(out, r) > tolerance)
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
            primary = (hop.peer_id, output)
            verdict = judge(primary, verifier, None, self.client.config.spot_check_tolerance)
            if verdict.agreed:
                self.stats.largest_agreeing_error = max(self.stats.largest_agreeing_error, verdict.error)
                return False
            self.stats.mismatches += 1
            referee = await anext(answers, None)
            verdict = judge(primary, verifier, referee, self.client.config.spot_check_tolerance)
        finally:
            await answers.aclose()
        if not verdict.liars:
            self.stats.unresolved += 1
            logger.warning(
                "spot-check: peers %s and %s disagree on blocks %d:%d of %s (relative error %.3g, max abs diff "
                "%.3g) and no third server settled it; nobody banned",
                hop.peer_id, verifier[0], hop.start, hop.end, model_id, verdict.error, verdict.max_abs_diff,
            )  # fmt: skip
            return False
        for liar in verdict.liars:
            self._ban(liar, model_id, hop, verdict, referee_peer=referee[0] if referee else "?")
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
            yield server.peer_id, out[:, -positions:]

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
