"""Async client: inference sessions and forward passes over a chain of servers that covers a model.

    client = await SwarmClient.create(ClientConfig(initial_peers=[...]))
    await client.model_coverage(model_id)            -> ModelCoverage (is it fully served? which blocks miss?)
    async with client.inference_session(model_id, max_length=L, batch_size=B) as session:
        out = await session.step(hidden)             # hidden: [B, S, D] embeddings -> [B, S, D] after last block
    out = await client.forward(model_id, hidden)     # stateless forward over all blocks, with failover
    await client.shutdown()

All coroutines must run on the loop that created the client (hivemind's P2P replica is bound to it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID

from swarm.auth import SwarmSecret, swarm_secret
from swarm.dht import fetch_coverage, fetch_models
from swarm.errors import MissingBlocksError, ModelNotFoundError, PeerUnreachableError
from swarm.latency import LatencyTracker, ThroughputTracker
from swarm.records import ModelCoverage
from swarm.remote_autograd import RemoteBlocks
from swarm.routing import Hop, choose_route, missing_blocks
from swarm.session import InferenceSession
from swarm.span_tensors import SpanTensors
from swarm.spot_check import SpotChecker, SpotCheckStats
from swarm.tensors import Compression

logger = logging.getLogger(__name__)


@dataclass
class ClientConfig:
    initial_peers: list[str]
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    step_timeout_s: float = 30.0
    """How long one step on one server may take before the server is considered dead."""
    min_step_timeout_s: float = 2.0
    step_timeout_factor: float = 20.0
    """A decode step slower than factor x that server's recent decode steps (but at least min_step_timeout_s)
    counts as a dead server, so a crash that shows only as silence stalls a stream for seconds, not 30 s."""
    connect_timeout_s: float = 10.0
    coverage_ttl_s: float = 2.0
    """Coverage lookups are fresh this long (routing reads them for every new session)."""
    coverage_max_stale_s: float = 30.0
    """A staler-than-ttl coverage is still used (and refreshed in the background) up to this age, so opening a
    session does not wait for a DHT lookup; failover always looks up afresh."""
    max_retries: int = 5
    """Failovers allowed within one session step before the error reaches the caller."""
    ban_s: float = 15.0
    """How long a failed server is avoided; doubles on each repeated failure."""
    route_jitter: float = 0.1
    compression: Compression = "none"
    """Activations on the wire: "none" or "float16" (half the bytes; greedy output unchanged on SmolLM2)."""
    push: bool = False
    """Server-to-server push: each server sends its output straight to the next server of the route (the client
    still gets every output, for failover, and sends an input itself only where no push came in time). Off by
    default: on loopback it measured 10-20% slower through the gateway at 1 and 4 streams (README, Performance);
    it is meant for clients far from their servers."""
    push_fill_s: float = 0.5
    """With push: the longest wait for a pushed step's answer before the client sends the input itself (decode
    steps wait a few times what that server's pushed steps took, less when it is fast)."""
    swarm_secret: str | None = field(default=None, repr=False)
    """A private swarm's shared secret: requests carry a proof of it, and servers whose DHT records are not
    signed with it are never used. None: a public swarm."""
    spot_check_probability: float = 0.02
    """Share of span steps (inference and stateless forward) recomputed on a second server hosting the same
    blocks and compared (``swarm.spot_check``); a server caught returning wrong activations is banned. 0: off.
    A check costs a stateless forward of the span's history (2-4 decode steps at 64 tokens, 8-11 at 256 on CPU):
    the expected overhead is p times that (``scripts/bench_spot_check.py``)."""
    spot_check_max_tokens: int = 256
    """Past this many positions of history, the check probability falls as 1 / length (flat expected cost)."""
    spot_check_tolerance: float = 0.01
    """Largest relative error ||a - b|| / ||b|| (per token) between two honest servers' outputs; pairs involving
    16-bit servers or float16 compression get 50 epsilons of that dtype if more (0.2 for bfloat16)."""
    spot_check_ban_s: float = 3600.0
    """How long a server caught returning wrong activations is never routed through."""


class BanList:
    """Peers to avoid for a while after they failed, with exponential backoff."""

    def __init__(self, base_s: float):
        self._base_s = base_s
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self._distrusted_until: dict[str, float] = {}

    def ban(self, peer_id: str) -> None:
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        self._until[peer_id] = time.monotonic() + self._base_s * 2 ** (strikes - 1)

    def distrust(self, peer_id: str, duration_s: float) -> None:
        """A long ban for a server caught misbehaving: unlike failed ones, it is never used as a last resort."""
        self._distrusted_until[peer_id] = time.monotonic() + duration_s

    def distrusted(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, until in self._distrusted_until.items() if until > now}

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, until in self._until.items() if until > now} | self.distrusted()


class SwarmClient:
    def __init__(self, config: ClientConfig, dht: DHT, p2p: P2P, owns_dht: bool):
        self.config = config
        self.dht = dht
        self.p2p = p2p
        self.bans = BanList(config.ban_s)
        self.wire_bytes_sent = 0
        self.wire_bytes_received = 0
        """Inference-stream message bytes this client has sent and received (to measure compression)."""
        self.latencies = LatencyTracker(self)
        self.throughputs = ThroughputTracker()
        self._owns_dht = owns_dht
        self._coverage: dict[str, tuple[float, ModelCoverage]] = {}
        self._refreshing: dict[str, asyncio.Task] = {}
        self.secret: SwarmSecret | None = swarm_secret(config.swarm_secret)
        self.peer_id = p2p.peer_id.to_base58()
        self.spot_checker = SpotChecker(self)

    @classmethod
    async def create(cls, config: ClientConfig, dht: DHT | None = None) -> SwarmClient:
        owns_dht = dht is None
        if dht is None:
            dht = await asyncio.to_thread(
                DHT,
                initial_peers=config.initial_peers,
                client_mode=True,
                host_maddrs=config.host_maddrs,
                start=True,
            )
        p2p = await dht.replicate_p2p()
        return cls(config, dht, p2p, owns_dht)

    async def served_models(self) -> dict[str, ModelCoverage]:
        models = await fetch_models(self.dht)
        return {mid: await self.model_coverage(mid, fresh=True) for mid in models}

    async def model_coverage(self, model_id: str, fresh: bool = False) -> ModelCoverage:
        cached = self._coverage.get(model_id)
        if cached and not fresh:
            age = time.monotonic() - cached[0]
            if age < self.config.coverage_ttl_s:
                return cached[1]
            if age < self.config.coverage_max_stale_s and cached[1].complete:
                if model_id not in self._refreshing:
                    self._refreshing[model_id] = asyncio.create_task(self._background_refresh(model_id))
                return cached[1]
        return await self._refresh(model_id)

    async def _refresh(self, model_id: str) -> ModelCoverage:
        coverage = await fetch_coverage(self.dht, model_id, secret=self.secret)
        self._coverage[model_id] = (time.monotonic(), coverage)
        return coverage

    async def _background_refresh(self, model_id: str) -> None:
        try:
            await self._refresh(model_id)
        except Exception as e:  # the next lookup retries; a stale coverage is still usable meanwhile
            logger.debug("background coverage refresh of %s failed: %s", model_id, e)
        finally:
            self._refreshing.pop(model_id, None)

    async def route(
        self,
        model_id: str,
        start: int = 0,
        end: int | None = None,
        fresh: bool = False,
        cache_tokens: int = 0,
        adapter: str | None = None,
    ) -> list[Hop]:
        """Cheapest chain of servers for blocks [start, end), by measured latency and announced throughput.

        Servers announcing less cache room than ``cache_tokens`` are avoided while others can serve the blocks.
        With ``adapter``, only servers that announce that LoRA adapter are used.
        """
        coverage = await self.model_coverage(model_id, fresh=fresh)
        if coverage.num_blocks == 0:
            raise ModelNotFoundError(f"no server announces model {model_id!r}")
        await self.latencies.measure([s.peer_id for s in coverage.servers])
        banned = self.bans.banned()
        short_of_cache = {s.peer_id for s in coverage.servers if s.record.cache_tokens_left < cache_tokens}
        # Last resort: a recently failed server (maybe just slow) beats failing the request; a distrusted one not.
        for avoid in (banned | short_of_cache, banned, self.bans.distrusted()):
            try:
                return choose_route(
                    coverage, start, end, banned=avoid, latencies=self.latencies.snapshot(),
                    measured_throughputs=self.throughputs.snapshot(),
                    jitter=self.config.route_jitter, adapter=adapter,
                )  # fmt: skip
            except MissingBlocksError:
                continue
        if fresh:
            named = model_id if adapter is None else f"{model_id}:{adapter}"
            raise MissingBlocksError(named, missing_blocks(coverage, banned, adapter))
        return await self.route(model_id, start, end, fresh=True, cache_tokens=cache_tokens, adapter=adapter)

    def inference_session(
        self,
        model_id: str,
        max_length: int,
        batch_size: int = 1,
        extras: SpanTensors | None = None,
        adapter: str | None = None,
    ) -> InferenceSession:
        """``extras``: per-block trainables for all blocks of the model, applied by the servers to every step;
        ``adapter``: a LoRA adapter the servers serve by name (only servers announcing it are used)."""
        return InferenceSession(
            self, model_id, max_length=max_length, batch_size=batch_size, extras=extras, adapter=adapter
        )

    def peer(self, peer_id: str) -> PeerID:
        return PeerID.from_base58(peer_id)

    async def forward(self, model_id: str, hidden: torch.Tensor) -> torch.Tensor:
        """Stateless forward of ``hidden`` [B, S, D] through every block, failing over per span (the same
        hop-by-hop failover that training through the swarm uses)."""
        coverage = await self.model_coverage(model_id)
        blocks = RemoteBlocks(self, model_id, 0, coverage.num_blocks, spot_checker=self.spot_checker)
        out, _ = await blocks.forward_traced(hidden)
        return out

    @property
    def spot_checks(self) -> SpotCheckStats:
        """Counters of this client's spot-checks: checks run, mismatches, peers banned for wrong activations."""
        return self.spot_checker.stats

    async def shutdown(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        await self.p2p.shutdown()  # our replica of the DHT's p2p daemon connection, bound to this loop
        if self._owns_dht:
            await asyncio.to_thread(self.dht.shutdown)


__all__ = ["ClientConfig", "SwarmClient", "InferenceSession", "PeerUnreachableError"]
