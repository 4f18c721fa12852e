"""ServerSettings: the one configuration object of a block server, built once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    announce_period_s: float = Field(5.0, gt=0, description="how often the server re-announces itself")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    ready_file: Path | None = Field(None, description="write join info as JSON here once serving (for supervisors)")
    log_level: str = Field("INFO", description="logging level")

    @field_validator("block_indices")
    @classmethod
    def _check_indices(cls, value: str | None) -> str | None:
        if value is not None:
            parse_block_indices(value)
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
