"""Pure decision: should a server move its span to where the swarm is weaker?

The swarm's strength for a model is judged by (blocks covered, throughput of its weakest block). A server moves
only when moving raises that bottleneck by more than ``margin`` (relative), so two servers do not flip-flop
between spans that are nearly as good.
"""

from __future__ import annotations

from server.placement import block_throughputs, choose_span
from swarm.records import ModelCoverage


def _strength(totals: list[float]) -> tuple[int, float]:
    return sum(1 for t in totals if t > 0), min(totals) if totals else 0.0


def _with_span(totals: list[float], start: int, end: int, throughput: float) -> list[float]:
    return [t + throughput if start <= i < end else t for i, t in enumerate(totals)]


def plan_move(
    coverage: ModelCoverage, peer_id: str, current: tuple[int, int], throughput: float, margin: float
) -> tuple[int, int] | None:
    """The span to move to, or None to stay. ``throughput`` is this server's own announced throughput."""
    others = block_throughputs(coverage, exclude_peer=peer_id)
    num_hosted = current[1] - current[0]
    candidate = choose_span(coverage_without(coverage, peer_id), coverage.num_blocks, num_hosted)
    if candidate == current:
        return None
    stay = _strength(_with_span(others, *current, throughput))
    move = _strength(_with_span(others, *candidate, throughput))
    if move[0] > stay[0]:
        return candidate  # moving covers blocks that nobody serves now
    if move[0] == stay[0] and move[1] > stay[1] * (1 + margin):
        return candidate
    return None


def coverage_without(coverage: ModelCoverage, peer_id: str) -> ModelCoverage:
    servers = [s for s in coverage.servers if s.peer_id != peer_id]
    return ModelCoverage(model_id=coverage.model_id, num_blocks=coverage.num_blocks, servers=servers)
