"""Many users at once: aggregate decode tokens/s through the real gateway at 1, 4, 16 and 32 concurrent streams,
and each stream's mean inter-token time, on one loopback swarm (SmolLM2, two servers 0:15 / 15:30), in one run.

    .venv/bin/python scripts/bench_concurrency.py [--levels 1 4 16 32] [--max-tokens 32] [--server-threads 1]

Streams use the OpenAI SDK's async client, greedy, with the end-of-sequence token banned (logit_bias -100) so
every stream decodes exactly ``--max-tokens`` tokens. Aggregate decode tokens/s at a level counts the tokens
after each stream's first one, over the time from the first stream's first token to the last stream's finish.
The servers batch concurrent steps (continuous batching); the machine is shared, so the load average is saved
with the numbers. Saves artifacts/bench_concurrency.json and artifacts/bench_concurrency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hivemind.proto import runtime_pb2
from openai import AsyncOpenAI
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_streams import CACHE, MODEL, smollm2_behind_gateway  # noqa: E402

from swarm.client import ClientConfig, SwarmClient  # noqa: E402
from swarm.messages import ServerInfoResult  # noqa: E402
from swarm.service import BlockService  # noqa: E402
from swarm.weights import resolve_model  # noqa: E402
from tests.e2e.gateway_process import GatewayProcess  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402

OUT_JSON = REPO / "artifacts" / "bench_concurrency.json"
OUT_PNG = REPO / "artifacts" / "bench_concurrency.png"
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


@dataclass
class Stream:
    began: float
    first: float
    last: float
    tokens: int

    @property
    def inter_token_s(self) -> float:
        return (self.last - self.first) / max(self.tokens - 1, 1)


async def one_stream(sdk: AsyncOpenAI, max_tokens: int, eos: int) -> Stream:
    began = time.perf_counter()
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=max_tokens, logit_bias={str(eos): -100},
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    first = last = None
    tokens = 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
        if chunk.choices and chunk.choices[0].finish_reason:
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert first is not None and last is not None and tokens == max_tokens, (first, last, tokens)
    return Stream(began, first, last, tokens)


async def server_stats(client: SwarmClient, peer_ids: list[str]) -> list[dict]:
    infos = []
    for peer_id in peer_ids:
        stub = BlockService.get_stub(client.p2p, client.peer(peer_id))
        info = ServerInfoResult.decode((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=10)).metadata)
        infos.append(info.model_dump(include={"max_batch_sessions_seen", "max_batch_rows_seen", "batched_steps"}))
    return infos


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


async def level(sdk: AsyncOpenAI, n: int, max_tokens: int, eos: int, pids: dict[str, int]) -> dict:
    load_before = os.getloadavg()
    cpu_before = cpu_seconds(pids)
    began = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(sdk, max_tokens, eos) for _ in range(n)))
    ended = time.perf_counter()
    cpu_after = cpu_seconds(pids)
    decode_window = max(s.last for s in streams) - min(s.first for s in streams)
    decode_tokens = sum(s.tokens - 1 for s in streams)
    return {
        "streams": n,
        "aggregate_decode_tok_s": decode_tokens / decode_window,
        "aggregate_total_tok_s": sum(s.tokens for s in streams) / (ended - began),
        "mean_inter_token_ms": 1000 * statistics.mean(s.inter_token_s for s in streams),
        "max_inter_token_ms": 1000 * max(s.inter_token_s for s in streams),
        "mean_ttft_ms": 1000 * statistics.mean(s.first - s.began for s in streams),
        "wall_s": ended - began,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_ms_per_token": {k: 1000 * (cpu_after[k] - cpu_before[k]) / (n * max_tokens) for k in pids},
    }


async def bench(args: argparse.Namespace, swarm: LocalSwarm, gateway: GatewayProcess, peers: list[str]) -> dict:
    pids = {c.name: c.process.pid for c in swarm.children if c.name != "bootstrap"}
    pids |= {"gateway": gateway.process.pid, "bench (SDK clients)": os.getpid()}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL, CACHE).folder)
    eos = int(tokenizer.eos_token_id)
    sdk = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=600)
    client = await SwarmClient.create(ClientConfig(initial_peers=swarm.initial_peers))
    levels = []
    try:
        await asyncio.gather(*(one_stream(sdk, 4, eos) for _ in range(2)))  # warm-up: connections, routes
        for n in args.levels:
            result = await level(sdk, n, args.max_tokens, eos, pids)
            result["servers"] = await server_stats(client, peers)
            levels.append(result)
            print(
                f"{n:3d} streams: aggregate decode {result['aggregate_decode_tok_s']:7.2f} tok/s, "
                f"mean inter-token {result['mean_inter_token_ms']:7.1f} ms, ttft {result['mean_ttft_ms']:7.1f} ms, "
                f"load {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}, "
                f"servers' max batch {[s['max_batch_sessions_seen'] for s in result['servers']]}\n"
                f"      CPU ms per token: " + ", ".join(f"{k} {v:.1f}" for k, v in result["cpu_ms_per_token"].items()),
                flush=True,
            )
    finally:
        await sdk.close()
        await client.shutdown()
    single = levels[0]["aggregate_decode_tok_s"] if levels[0]["streams"] == 1 else None
    return {
        "config": {**vars(args), "model": MODEL, "spans": ["0:15", "15:30"]},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "levels": levels,
        "speedup_over_single": {
            str(r["streams"]): r["aggregate_decode_tok_s"] / single for r in levels if single is not None
        },
    }


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    n = [r["streams"] for r in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(n, [r["aggregate_decode_tok_s"] for r in levels], "o-", label="measured")
    if n[0] == 1:
        ax1.plot(n, [levels[0]["aggregate_decode_tok_s"] * k for k in n], ":", color="grey", label="linear")
    ax1.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="aggregate decode tokens/s")
    ax1.set_xticks(n, [str(k) for k in n])
    ax1.legend()
    ax2.plot(n, [r["mean_inter_token_ms"] for r in levels], "o-")
    ax2.set(xscale="log", xlabel="concurrent streams", ylabel="mean inter-token time per stream (ms)")
    ax2.set_xticks(n, [str(k) for k in n])
    load = ", ".join(f"{r['loadavg_before'][0]:.1f}" for r in levels)
    fig.suptitle(f"{MODEL}, 2 servers (0:15, 15:30), loopback, gateway + OpenAI SDK; load avg {load}")
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument(
        "--head-threads", type=int, default=None, help="torch threads of the gateway's head (OMP_NUM_THREADS)"
    )
    parser.add_argument("--server-flags", default="", help="extra flags for both servers, e.g. '--batch-wait-ms 2'")
    args = parser.parse_args()
    if args.head_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.head_threads)  # the gateway inherits it; servers set --num-threads

    flags = ["--num-threads", str(args.server_threads), *args.server_flags.split()]
    with smollm2_behind_gateway("bench-concurrency-", flags) as (swarm, gateway, servers):
        result = asyncio.run(bench(args, swarm, gateway, [s.peer_id for s in servers]))

    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(result, indent=2))
    plot(result)
    for k, v in result["speedup_over_single"].items():
        print(f"  {k:>3s} streams: x{v:.2f} the single-stream aggregate")
    print(f"saved {OUT_JSON.relative_to(REPO)} and {OUT_PNG.relative_to(REPO)}")


if __name__ == "__main__":
    main()
