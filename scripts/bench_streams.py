"""Shared by the gateway benchmarks: SmolLM2 on a loopback swarm behind the real gateway, and timed streams."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from openai import AsyncOpenAI

from tests.e2e.gateway_process import GatewayProcess, running_gateway
from tests.e2e.harness import Child, LocalSwarm
from tests.helpers import MODEL_CACHE as CACHE

MODEL = "smollm2-135m-instruct"


@dataclass
class TimedStream:
    began: float
    first: float
    """When the first content chunk arrived."""
    last: float
    """When the chunk carrying the finish reason arrived."""
    tokens: int
    text: str

    @property
    def ttft_s(self) -> float:
        return self.first - self.began

    @property
    def decode_tok_s(self) -> float:
        return (self.tokens - 1) / max(self.last - self.first, 1e-9)


async def timed_stream(client: AsyncOpenAI, expect_tokens: int, **request) -> TimedStream:
    """Stream ``request`` (with usage), asserting that exactly ``expect_tokens`` completion tokens came back."""
    began = time.perf_counter()
    stream = await client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    first = last = None
    parts: list[str] = []
    tokens = 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            parts.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert first is not None and last is not None and tokens == expect_tokens, (first, last, tokens)
    return TimedStream(began, first, last, tokens, "".join(parts))


@contextmanager
def smollm2_behind_gateway(
    prefix: str, server_flags: Sequence[str] = ()
) -> Iterator[tuple[LocalSwarm, GatewayProcess, list[Child]]]:
    """A bootstrap, two SmolLM2 servers (0:15 and 15:30, with ``server_flags``) and the gateway."""
    with model_behind_gateway(prefix, MODEL, ("0:15", "15:30"), server_flags) as running:
        yield running


@contextmanager
def model_behind_gateway(
    prefix: str,
    model: str,
    spans: Sequence[str],
    server_flags: Sequence[str] = (),
    gateway_flags: Sequence[str] = (),
    cache_dir: Path = CACHE,
) -> Iterator[tuple[LocalSwarm, GatewayProcess, list[Child]]]:
    """A bootstrap, one server per span of ``model`` (with ``server_flags``) and the gateway (``gateway_flags``);
    every log is printed if the benchmark fails; all of it is stopped on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    swarm = LocalSwarm(workdir, cache_dir)
    try:
        swarm.start_bootstrap()
        servers = [swarm.start_server(model, span, *server_flags, wait=False) for span in spans]
        with running_gateway(swarm, workdir, cache_dir, [model], *gateway_flags, servers=servers) as gateway:
            try:
                yield swarm, gateway, servers
            except BaseException:
                print(f"===== {gateway.name} =====\n{gateway.log()[-8000:]}")
                raise
    except BaseException:
        print(swarm.dump_logs())
        raise
    finally:
        swarm.stop()
