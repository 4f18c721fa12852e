"""GatewaySettings: the gateway's one configuration object, read from flags and ``PETALS_GATEWAY_*``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

StrList = Annotated[list[str], NoDecode]


class GatewaySettings(BaseSettings):
    """Built once at start-up (``gateway.cli``) and passed down; nothing else reads the environment."""

    model_config = SettingsConfigDict(env_prefix="PETALS_GATEWAY_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP server.")
    initial_peers: StrList = Field(
        default_factory=list,
        description="Multiaddrs of swarm peers to join; empty starts an embedded local swarm (dev mode).",
    )
    models: StrList = Field(
        default_factory=lambda: ["smollm2-135m-instruct"],
        description="Model references to serve (built-in names, HF folders or GGUF files).",
    )
    prompts: StrList = Field(
        default_factory=list,
        description="Tuned prompts to serve as NAME=PATH (files saved by swarm.tuning, ptune or deep_ptune), each as "
        "model id MODEL:NAME of the first configured model.",
    )
    api_keys: StrList = Field(
        default_factory=list, description="Accepted bearer tokens; empty disables authentication."
    )
    api_keys_file: Path | None = Field(
        None, description="File of accepted bearer tokens, one per line (blank lines and # comments skipped)."
    )
    rate_limit_rpm: int = Field(0, ge=0, description="Requests per minute allowed per API key (0: no limit).")
    rate_limit_tpm: int = Field(
        0,
        ge=0,
        description="Tokens per minute allowed per API key, counted as OpenAI does when a request arrives: prompt "
        "tokens plus max_tokens for each choice (0: no limit).",
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1, description="Largest request body accepted; larger ones are refused before parsing (413)."
    )
    max_messages: int = Field(256, ge=1, description="Most messages in one chat completion request.")
    max_prompt_tokens: int = Field(
        0, ge=0, description="Most prompt tokens in one request (0: only the model's context length limits it)."
    )
    swarm_secret: SecretStr | None = Field(
        None,
        description="Secret of a private swarm: only servers that know it are used (and the embedded swarm's "
        "servers get it). Prefer PETALS_GATEWAY_SWARM_SECRET to a flag.",
    )
    spot_check_probability: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of span steps the swarm client re-runs on a second server to catch servers returning "
        "wrong activations (default: the client's, 0.02; 0: off).",
    )
    push: bool | None = Field(
        None,
        description="Whether servers pass a step's output straight to the next server of the route "
        "(server-to-server push; default: the client's, off).",
    )
    cache_dir: Path = Field(
        Path("~/.cache/petals-next").expanduser(), description="Where converted model folders are kept."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for one swarm call (prefill or one decode step) before a 504."
    )
    startup_timeout_s: float = Field(
        600.0, gt=0, description="Deadline for the embedded swarm and model coverage at start-up."
    )
    max_tokens_default: int = Field(
        512, ge=1, description="Completion length when a request names none (capped by the context)."
    )
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(8, ge=1, description="Largest number of choices (n) per request.")
    cors_origins: StrList = Field(
        default_factory=list, description="Origins allowed by CORS; empty disables the CORS middleware."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level.")
    embedded_servers: int = Field(2, ge=1, description="Block servers the embedded swarm splits each model across.")
    open_monitoring: bool = Field(
        True,
        description="Serve /health, /metrics, /dashboard and /v1/swarm without an API key (else they need one).",
    )
    device: str = Field("cpu", description="Torch device of the local head (embeddings, norm, LM head).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Torch dtype of the local head.")

    @field_validator("initial_peers", "models", "prompts", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        """Accept a JSON list or a comma/space separated string (handy in env vars)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.replace(",", " ").split() if part]
        return value

    @field_validator("prompts", mode="after")
    @classmethod
    def _check_prompts(cls, value: list[str]) -> list[str]:
        from gateway.generation.variants import parse_prompts_option  # the one parser of NAME=PATH

        for option in value:
            parse_prompts_option(option)
        return value

    def accepted_api_keys(self) -> list[str]:
        """``api_keys`` plus the keys in ``api_keys_file`` (read once, when the app is built)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            for line in self.api_keys_file.expanduser().read_text().splitlines():
                key = line.strip()
                if key and not key.startswith("#"):
                    keys.append(key)
        return keys

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()
