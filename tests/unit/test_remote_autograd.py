"""RemoteBlocks against an in-process fake swarm: hop order, gradients equal local autograd, failover."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from swarm.client import BanList
from swarm.errors import BadRequestError, MissingBlocksError, PeerUnreachableError
from swarm.messages import TuningSpec
from swarm.records import ModelCoverage, RemoteServer, ServerRecord, ServerState
from swarm.remote_autograd import RemoteBlocks
from swarm.routing import Hop, choose_route
from swarm.span_tensors import SpanTensors

D = 8
NUM_BLOCKS = 4


def block_weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(D, D, generator=generator) / D**0.5 for _ in range(NUM_BLOCKS)]


def run_blocks(
    weights: list[torch.Tensor], hidden: torch.Tensor, start: int, end: int, prompts: torch.Tensor | None = None
) -> torch.Tensor:
    """prompts (deep prompts of these blocks): [end - start, K, D], added to positions [0, K) before each block."""
    for j, w in enumerate(weights[start:end]):
        if prompts is not None:
            k = prompts.shape[1]
            hidden = torch.cat([hidden[:, :k] + prompts[j], hidden[:, k:]], dim=1)
        hidden = hidden + torch.tanh(hidden @ w)  # [B, S, D]
    return hidden


class FakeSwarm:
    """Servers as (peer, start, end); ``fail`` maps (direction, peer) to errors raised on that peer's next calls."""

    def __init__(self, *servers: tuple[str, int, int, float]):
        self.weights = block_weights()
        records = [
            RemoteServer(
                peer_id=peer,
                record=ServerRecord(model_id="m", start=s, end=e, state=ServerState.ONLINE, throughput=tp),
            )
            for peer, s, e, tp in servers
        ]
        self.coverage = ModelCoverage(model_id="m", num_blocks=NUM_BLOCKS, servers=records)
        self.config = SimpleNamespace(max_retries=3)
        self.bans = BanList(60.0)
        self.calls: list[tuple[str, str, int, int]] = []
        self.routes: list[tuple[int, int, bool]] = []
        self.fail: dict[tuple[str, str], list[Exception]] = {}

    async def route(self, model_id: str, start: int = 0, end: int | None = None, fresh: bool = False) -> list[Hop]:
        self.routes.append((start, end, fresh))
        try:
            return choose_route(self.coverage, start, end, banned=self.bans.banned())
        except MissingBlocksError:  # as SwarmClient.route: a banned server beats failing
            return choose_route(self.coverage, start, end)

    def _maybe_fail(self, direction: str, hop: Hop) -> None:
        self.calls.append((direction, hop.peer_id, hop.start, hop.end))
        errors = self.fail.get((direction, hop.peer_id))
        if errors:
            raise errors.pop(0)

    async def forward(self, client, model_id: str, hop: Hop, hidden: torch.Tensor, extras=None) -> torch.Tensor:
        assert not hidden.requires_grad  # what travels is plain data
        self._maybe_fail("fwd", hop)
        prompts = extras.tensors[0] if extras is not None else None
        assert prompts is None or (not prompts.requires_grad and prompts.shape[0] == hop.end - hop.start)
        return run_blocks(self.weights, hidden, hop.start, hop.end, prompts)

    async def backward(self, client, model_id: str, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, extras=None):
        self._maybe_fail("bwd", hop)
        with torch.enable_grad():  # as the server does; autograd runs backward functions with grad mode off
            x = hidden.detach().requires_grad_(True)
            leaves = [t.detach().requires_grad_(True) for t in (extras.tensors if extras is not None else ())]
            out = run_blocks(self.weights, x, hop.start, hop.end, leaves[0] if leaves else None)
            grad_input, *grads = torch.autograd.grad(out, [x, *leaves], grad)
        return grad_input, grads

    def blocks(self) -> RemoteBlocks:
        return RemoteBlocks(
            self, "m", 0, NUM_BLOCKS, asyncio.run, forward_call=self.forward, backward_call=self.backward
        )


def two_servers_and_spares() -> FakeSwarm:
    # a and b are the fast route; c and d together cover a's blocks as a slower fallback.
    return FakeSwarm(("a", 0, 2, 100.0), ("b", 2, 4, 100.0), ("c", 0, 1, 10.0), ("d", 1, 2, 10.0))


def check_against_local(swarm: FakeSwarm) -> None:
    """Output and input gradient through the fake swarm equal plain autograd through the same blocks."""
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2))
    remote_x = x.clone().requires_grad_(True)
    out = swarm.blocks()(remote_x)
    ((out - target) ** 2).sum().backward()
    local_x = x.clone().requires_grad_(True)
    local = run_blocks(swarm.weights, local_x, 0, NUM_BLOCKS)
    ((local - target) ** 2).sum().backward()
    torch.testing.assert_close(out, local)
    torch.testing.assert_close(remote_x.grad, local_x.grad)


def test_forward_then_backward_hop_by_hop_in_reverse():
    swarm = two_servers_and_spares()
    check_against_local(swarm)
    assert swarm.calls == [("fwd", "a", 0, 2), ("fwd", "b", 2, 4), ("bwd", "b", 2, 4), ("bwd", "a", 0, 2)]


def test_gradient_reaches_parameters_before_the_remote_blocks():
    swarm = two_servers_and_spares()
    prompt = torch.zeros(1, 2, D, requires_grad=True)
    tokens = torch.randn(1, 3, D)
    out = swarm.blocks()(torch.cat([prompt, tokens], dim=1))
    out.sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_per_block_trainables_get_their_gradients_hop_by_hop():
    """Deep prompts [N, K, D]: each hop gets its rows; gradients land in the right rows, also after a backward
    failover that splits the failed span over two servers."""
    swarm = two_servers_and_spares()
    swarm.fail[("bwd", "a")] = [PeerUnreachableError("a died")]
    generator = torch.Generator().manual_seed(3)
    x, prompts = torch.randn(2, 3, D, generator=generator), torch.randn(NUM_BLOCKS, 2, D, generator=generator)
    remote_prompts = prompts.clone().requires_grad_(True)
    out = swarm.blocks()(x, SpanTensors(TuningSpec(prompts=2), (remote_prompts,)))
    (out**2).sum().backward()
    local_prompts = prompts.clone().requires_grad_(True)
    local = run_blocks(swarm.weights, x, 0, NUM_BLOCKS, local_prompts)
    (local**2).sum().backward()
    torch.testing.assert_close(out, local)
    torch.testing.assert_close(remote_prompts.grad, local_prompts.grad)
    assert [c for c in swarm.calls if c[0] == "bwd"][-2:] == [("bwd", "d", 1, 2), ("bwd", "c", 0, 1)]


def test_forward_failure_reroutes_that_span_only():
    swarm = two_servers_and_spares()
    swarm.fail[("fwd", "a")] = [PeerUnreachableError("a died")]
    check_against_local(swarm)
    assert swarm.routes[1] == (0, 2, True)  # the failed hop's span, looked up afresh
    assert "a" in swarm.bans.banned()
    assert swarm.calls == [
        ("fwd", "a", 0, 2), ("fwd", "c", 0, 1), ("fwd", "d", 1, 2), ("fwd", "b", 2, 4),
        ("bwd", "b", 2, 4), ("bwd", "d", 1, 2), ("bwd", "c", 0, 1),
    ]  # fmt: skip


def test_backward_failure_recomputes_the_replacement_route():
    swarm = two_servers_and_spares()
    swarm.fail[("bwd", "a")] = [PeerUnreachableError("a died")]
    check_against_local(swarm)
    assert swarm.calls[3:] == [("bwd", "a", 0, 2), ("fwd", "c", 0, 1), ("fwd", "d", 1, 2),
                               ("bwd", "d", 1, 2), ("bwd", "c", 0, 1)]  # fmt: skip


def test_non_retryable_error_is_raised_at_once():
    swarm = two_servers_and_spares()
    swarm.fail[("fwd", "b")] = [BadRequestError("bad shape")]
    with pytest.raises(BadRequestError):
        swarm.blocks()(torch.randn(1, 2, D))
    assert [c[1] for c in swarm.calls] == ["a", "b"]
    assert not swarm.bans.banned()


def test_retries_are_capped():
    swarm = FakeSwarm(("a", 0, 4, 100.0))
    swarm.fail[("fwd", "a")] = [PeerUnreachableError("flaky")] * 10
    with pytest.raises(PeerUnreachableError):
        swarm.blocks()(torch.randn(1, 2, D))
    assert len(swarm.calls) == swarm.config.max_retries + 1
