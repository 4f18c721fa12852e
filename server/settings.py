"""ServerSettings: the one configuration object of a block server, built once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from swarm.identity import MAX_RECORD_TTL_S

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "petals-next"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PETALS_SERVER_", extra="ignore")

    model: str = Field("smollm2-135m-instruct", description="model reference: built-in name, HF folder or .gguf file")
    model_id: str | None = Field(None, description="name to announce the model under (default: derived from --model)")
    blocks: int | None = Field(None, gt=0, description="serve this many consecutive blocks where the swarm is weakest")
    block_indices: str | None = Field(None, description="serve exactly blocks A:B (half-open)")
    initial_peers: list[str] = Field(default_factory=list, description="multiaddrs of peers to join the swarm through")
    new_swarm: bool = Field(False, description="start a new swarm: this server is its first peer")
    host_maddrs: list[str] = Field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"], description="multiaddrs to listen on"
    )
    announce_maddrs: list[str] = Field(default_factory=list, description="multiaddrs to advertise (behind NAT)")
    identity_path: Path | None = Field(None, description="private key file; makes the peer id stable across restarts")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations dtype; auto = float32 on CPU, bfloat16 on CUDA"
    )
    public_name: str | None = Field(None, description="a name shown to others (dashboard, status)")
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="where converted models are cached")
    cache_budget_mb: float = Field(512.0, gt=0, description="memory for all sessions' attention caches")
    max_session_length: int = Field(8192, gt=0, description="longest session (tokens) accepted")
    max_step_tokens: int = Field(8192, gt=0, description="most tokens (batch x length) in one request")
    session_idle_timeout_s: float = Field(300.0, gt=0, description="close sessions that send nothing for this long")
    kv_page_tokens: int = Field(16, gt=0, description="attention cache is budgeted in pages of this many tokens")
    alloc_timeout_s: float = Field(
        1.0, ge=0, description="a new session waits this long for cache pages before it is refused as busy"
    )
    max_batch_tokens: int = Field(
        1024, gt=0, description="most tokens (rows x length, all sessions) one batched inference forward runs"
    )
    prefill_chunk_tokens: int = Field(
        256, gt=0, description="long prompts run in chunks of this many tokens, interleaved with decode batches"
    )
    max_sessions: int = Field(
        256, ge=0, description="most sessions open at once on this server, all peers (0: no limit)"
    )
    max_sessions_per_peer: int = Field(
        64,
        ge=0,
        description="most sessions open at once from one peer (0: no limit); a gateway is one peer for all its users",
    )
    max_cache_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="most of the attention cache one peer may hold while other peers wait for it (1: no limit)",
    )
    swarm_secret: SecretStr | None = Field(
        None,
        description="private swarm: serve only clients that prove this shared secret, and sign announcements with it "
        "(prefer the PETALS_SERVER_SWARM_SECRET environment variable: flags show in process lists)",
    )
    batch_wait_ms: float = Field(
        10.0,
        ge=0,
        description="wait up to this long for the steps of other active sessions (those not in the batch that just "
        "ran, and the rest of the group a pending session last ran with) before a batch runs; ends early once they "
        "have all arrived, so a lone session never waits (0: never)",
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapters to serve, as NAME=PATH of PEFT folders; clients name one per session",
    )
    max_lora_rank: int = Field(
        64, gt=0, description="highest rank of client-side LoRA factors a request may carry (larger are refused)"
    )
    max_prompt_tokens: int = Field(
        256, gt=0, description="most deep prompts (pre_seq_len) per block a request may carry (more are refused)"
    )
    announce_period_s: float = Field(
        5.0,
        gt=0,
        le=MAX_RECORD_TTL_S / 3,
        description="how often the server re-announces itself (records live three periods, at most the DHT's limit)",
    )
    accept_push: bool = Field(
        True,
        description="take inputs pushed by the previous server of a route (false: clients send every input themselves)",
    )
    push_timeout_s: float = Field(
        1.0, gt=0, description="how long pushing an output to the next server may take before the client sends it"
    )
    rebalance_period_s: float = Field(
        60.0, ge=0, description="with --blocks: how often to check whether moving would help the swarm (0: never)"
    )
    rebalance_margin: float = Field(
        0.2, ge=0, description="move only if the swarm's weakest block gets this much (relative) more throughput"
    )
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus /metrics on this HTTP port (0: any free port; default off)"
    )
    metrics_host: str = Field("127.0.0.1", description="address the metrics port binds to (0.0.0.0 for remote scrapes)")
    ready_file: Path | None = Field(None, description="write join info as JSON here once serving (for supervisors)")
    log_level: str = Field("INFO", description="logging level")

    @field_validator("block_indices")
    @classmethod
    def _check_indices(cls, value: str | None) -> str | None:
        if value is not None:
            parse_block_indices(value)
        return value

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: list[str]) -> list[str]:
        from server.adapters import parse_adapter_option  # the one parser of NAME=PATH

        for option in value:
            parse_adapter_option(option)
        return value

    def span(self) -> tuple[int, int] | None:
        return parse_block_indices(self.block_indices) if self.block_indices else None


def parse_block_indices(text: str) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ValueError(f"--block-indices must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"--block-indices {text!r} is empty or negative")
    return start, end
