"""Wire models of GET /v1/swarm: every announced model's coverage, every server, and the gateway's own stats."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class BlockCoverage(BaseModel):
    index: int
    servers: int = Field(description="Online servers that host this block.")
    throughput: float = Field(description="Their summed throughput (blocks-forward/s for one token step).")


class BlockRange(BaseModel):
    start: int
    end: int = Field(description="Exclusive.")


class SwarmModel(BaseModel):
    model_id: str
    num_blocks: int
    complete: bool
    status: str = Field(description="'ready', 'missing blocks A:B, ...' or 'not announced'.")
    missing: list[int] = Field(description="Blocks that no online server covers.")
    missing_ranges: list[BlockRange]
    blocks: list[BlockCoverage]
    servers_online: int
    served_here: bool = Field(description="Whether this gateway is configured to serve the model.")


class SwarmServer(BaseModel):
    peer_id: str
    public_name: str | None = None
    model_id: str
    start: int
    end: int = Field(description="Exclusive.")
    state: Literal["joining", "online", "offline"]
    throughput: float
    cache_tokens_left: int = Field(description="Live from rpc_info when the probe answered, else as announced.")
    version: str
    device: str
    dtype: str
    reachable: bool = Field(description="Whether rpc_info answered the gateway's probe.")
    latency_ms: float | None = Field(None, description="rpc_info round trip from the gateway.")
    active_sessions: int | None = None
    probe_error: str | None = None


class GatewayStats(BaseModel):
    uptime_s: float
    window_s: float = Field(description="Rates and medians cover this many recent seconds.")
    requests_total: int = Field(description="Completion requests (chat and text) since start.")
    requests_per_s: float
    ttft_ms_p50: float | None = Field(None, description="Median time to first token.")
    inter_token_ms_p50: float | None = Field(None, description="Median time between decoding steps.")
    tokens_total: int
    tokens_per_s: float
    active_streams: int
    active_generations: int


class SwarmResponse(BaseModel):
    object: Literal["swarm"] = "swarm"
    generated_at: float = Field(description="Unix time of the snapshot (snapshots are cached for a moment).")
    models: list[SwarmModel]
    servers: list[SwarmServer]
    gateway: GatewayStats
    error: str | None = Field(None, description="Why the swarm could not be read, if it could not.")
