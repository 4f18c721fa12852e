"""Many users at once: aggregate decode tokens/s through the real gateway at 1, 4, 16 and 32 concurrent streams,
and each stream's mean inter-token time, on one loopback swarm (default: SmolLM2, two servers 0:15 / 15:30), in
one run.

    .venv/bin/python scripts/bench_concurrency.py [--levels 1 4 16 32] [--max-tokens 32] [--server-threads 1]
    python3 scripts/bench_concurrency.py --random-shape 8b --device cuda --dtype bfloat16 --local-baseline   # on a GPU

``--random-shape 8b`` builds Llama 3 8B's shape with random weights (on ``--device``, in ``--dtype``) and SmolLM2's
tokenizer and chat template (so its vocabulary, 49152, replaces Llama 3's 128256); the servers split its 32
blocks in two, and the gateway's head runs on the same device. ``--local-baseline`` also times transformers'
``generate`` on the same model in this process at each level (a batch of that many rows), alternating with the
swarm, so the table has a same-run baseline.

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
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from openai import AsyncOpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_gpu import LLAMA_8B, TINY, build_model, sync  # noqa: E402
from bench_streams import CACHE, MODEL, model_behind_gateway  # noqa: E402

from server.model.attention import avoid_cudnn_attention  # noqa: E402
from swarm.client import ClientConfig, SwarmClient  # noqa: E402
from swarm.weights import resolve_model  # noqa: E402
from tests.e2e.client_calls import server_info  # noqa: E402
from tests.e2e.gateway_process import GatewayProcess  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402

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


async def one_stream(sdk: AsyncOpenAI, model: str, max_tokens: int, eos: int) -> Stream:
    began = time.perf_counter()
    stream = await sdk.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=max_tokens, logit_bias={str(eos): -100},
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


def batch_means(before: list[dict], after: list[dict]) -> list[dict]:
    """Each server's counters after a level, with that level's mean batch (sessions) and compute time per batch."""
    out = []
    for b, a in zip(before, after, strict=True):
        batches = max(1, a["batches_run"] - b["batches_run"])
        out.append({
            **a,
            "mean_batch_sessions": (a["steps_run"] - b["steps_run"]) / batches,
            "mean_batch_ms": 1000 * (a["batch_compute_s"] - b["batch_compute_s"]) / batches,
        })  # fmt: skip
    return out


async def server_stats(client: SwarmClient, peer_ids: list[str]) -> list[dict]:
    fields = {"max_batch_sessions_seen", "max_batch_rows_seen", "batched_steps", "batches_run", "steps_run",
              "batch_compute_s"}  # fmt: skip
    return [(await server_info(client, peer_id)).model_dump(include=fields) for peer_id in peer_ids]


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (Linux /proc), and as "NAME children" those of
    its child processes: the p2p daemon that carries every message and the DHT process cost CPU too."""
    out = {}
    for name, pid in pids.items():
        out[name] = _proc_cpu_s(pid)
        children = _descendants(pid)
        nested = [p for p in pids.values() if p in children]  # the bench's servers have their own entries
        skip = set(nested).union(*(_descendants(p) for p in nested))
        children = [c for c in children if c not in skip]
        if children:
            out[f"{name} children"] = sum(_proc_cpu_s(c) for c in children)
    return out


async def level(sdk: AsyncOpenAI, model: str, n: int, max_tokens: int, eos: int, pids: dict[str, int]) -> dict:
    load_before = os.getloadavg()
    cpu_before = cpu_seconds(pids)
    began = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(sdk, model, max_tokens, eos) for _ in range(n)))
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
        "cpu_ms_per_token": {k: 1000 * (cpu_after[k] - cpu_before.get(k, 0.0)) / (n * max_tokens) for k in cpu_after},
    }


class LocalBaseline:
    """transformers' ``generate`` on the same model in this process: greedy, EOS banned, a batch of ``n`` rows of
    the same chat prompt. Decode tokens/s = n x (T - 1) / (t_T - t_1), from a 1-token and a T-token run."""

    def __init__(self, folder: Path, device: str, dtype: str, tokenizer):
        self.device = torch.device(device)
        avoid_cudnn_attention(self.device)  # the same attention kernels as the servers use
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(self.device).eval()
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        self.ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
        self.eos = int(tokenizer.eos_token_id)

    def _timed(self, n: int, tokens: int) -> float:
        ids = self.ids.expand(n, -1)
        sync(self.device)
        began = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                do_sample=False, suppress_tokens=[self.eos], pad_token_id=self.eos,
            )  # fmt: skip
        sync(self.device)
        return time.perf_counter() - began

    def level(self, n: int, tokens: int) -> dict:
        t1, tn = self._timed(n, 1), self._timed(n, tokens)
        return {"aggregate_decode_tok_s": n * (tokens - 1) / max(tn - t1, 1e-9), "ttft_ms": 1000 * t1}


async def bench(
    args: argparse.Namespace, swarm: LocalSwarm, gateway: GatewayProcess, peers: list[str], model: str, folder: Path
) -> dict:
    pids = {c.name: c.process.pid for c in swarm.children if c.name != "bootstrap"}
    pids |= {"gateway": gateway.process.pid, "bench (SDK clients)": os.getpid()}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = int(tokenizer.eos_token_id)
    local = LocalBaseline(folder, args.device, args.dtype, tokenizer) if args.local_baseline else None
    sdk = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=600)
    client = await SwarmClient.create(ClientConfig(initial_peers=swarm.initial_peers))
    levels = []
    try:
        await asyncio.gather(*(one_stream(sdk, model, 4, eos) for _ in range(2)))  # warm-up: connections, routes
        if local is not None:
            local.level(2, 4)  # warm-up: kernels, allocator
        counted = await server_stats(client, peers)
        for n in args.levels:
            result = await level(sdk, model, n, args.max_tokens, eos, pids)
            now = await server_stats(client, peers)
            result["servers"], counted = batch_means(counted, now), now
            if local is not None:
                result["local"] = local.level(n, args.max_tokens)
                local_tok_s = result["local"]["aggregate_decode_tok_s"]
                result["swarm_over_local"] = result["aggregate_decode_tok_s"] / local_tok_s
            levels.append(result)
            vs_local = (
                f", local {result['local']['aggregate_decode_tok_s']:8.1f} tok/s (swarm/local "
                f"{result['swarm_over_local']:.2f})"
                if local is not None
                else ""
            )
            print(
                f"{n:3d} streams: aggregate decode {result['aggregate_decode_tok_s']:7.2f} tok/s{vs_local}, "
                f"mean inter-token {result['mean_inter_token_ms']:7.1f} ms, ttft {result['mean_ttft_ms']:7.1f} ms, "
                f"load {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}, "
                f"servers' max batch {[s['max_batch_sessions_seen'] for s in result['servers']]}, mean batch "
                f"{[round(s['mean_batch_sessions'], 1) for s in result['servers']]}, compute ms per batch "
                f"{[round(s['mean_batch_ms'], 1) for s in result['servers']]}\n"
                f"      CPU ms per token: " + ", ".join(f"{k} {v:.1f}" for k, v in result["cpu_ms_per_token"].items()),
                flush=True,
            )
    finally:
        await sdk.close()
        await client.shutdown()
    single = levels[0]["aggregate_decode_tok_s"] if levels[0]["streams"] == 1 else None
    return {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "model": model},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "card": card(args.device)},
        "levels": levels,
        "speedup_over_single": {
            str(r["streams"]): r["aggregate_decode_tok_s"] / single for r in levels if single is not None
        },
    }


def card(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    return torch.cuda.get_device_name(torch.device(device))


def plot(result: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    n = [r["streams"] for r in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(n, [r["aggregate_decode_tok_s"] for r in levels], "o-", label="swarm via gateway")
    if "local" in levels[0]:
        ax1.plot(n, [r["local"]["aggregate_decode_tok_s"] for r in levels], "s--", label="local generate (batch)")
    if n[0] == 1:
        ax1.plot(n, [levels[0]["aggregate_decode_tok_s"] * k for k in n], ":", color="grey", label="linear")
    ax1.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="aggregate decode tokens/s")
    ax1.set_xticks(n, [str(k) for k in n])
    ax1.legend()
    ax2.plot(n, [r["mean_inter_token_ms"] for r in levels], "o-")
    ax2.set(xscale="log", xlabel="concurrent streams", ylabel="mean inter-token time per stream (ms)")
    ax2.set_xticks(n, [str(k) for k in n])
    load = ", ".join(f"{r['loadavg_before'][0]:.1f}" for r in levels)
    config = result["config"]
    fig.suptitle(
        f"{config['model']} ({config['dtype']}, {result['machine']['card']}), servers {', '.join(config['spans'])}, "
        f"loopback, gateway + OpenAI SDK; load avg {load}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def build_random(root: Path, shape: dict, device: str, dtype: str, tokenizer_folder: Path | None) -> Path:
    """A Llama of ``shape`` with random weights and SmolLM2's tokenizer (its vocabulary size), saved in ``root``."""
    tokenizer_folder = tokenizer_folder or resolve_model(MODEL, CACHE).folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    shape = {**shape, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    folder = root / f"llama-random-h{shape['hidden_size']}-l{shape['num_hidden_layers']}"
    build_model(folder, shape, torch.device(device), getattr(torch, dtype))  # saved there; the servers load it
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument(
        "--head-threads", type=int, default=None, help="torch threads of the gateway's head (OMP_NUM_THREADS)"
    )
    parser.add_argument("--server-flags", default="", help="extra flags for both servers, e.g. '--batch-wait-ms 2'")
    parser.add_argument("--gateway-flags", default="", help="extra gateway flags, e.g. '--no-push'")
    parser.add_argument("--model", default=MODEL, help="model reference (default: the built-in SmolLM2)")
    parser.add_argument(
        "--random-shape", choices=["8b", "tiny"], help="a random-weight Llama: 8B's shape (see above) or a tiny one"
    )
    parser.add_argument("--device", default="cpu", help="servers' and gateway head's device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--spans", nargs="+", default=None, help="server spans (default: the blocks in two halves)")
    parser.add_argument(
        "--tokenizer-from", type=Path, default=None, help="folder with SmolLM2's tokenizer files (default: built-in)"
    )
    parser.add_argument("--local-baseline", action="store_true", help="also time transformers' generate per level")
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT") or REPO / "artifacts"))
    args = parser.parse_args()
    if args.head_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.head_threads)  # the gateway inherits it; servers set --num-threads

    workdir = Path(tempfile.mkdtemp(prefix="bench-concurrency-model-"))
    try:
        model_ref = args.model
        if args.random_shape:
            shape = {"8b": LLAMA_8B, "tiny": TINY}[args.random_shape]
            model_ref = str(build_random(workdir, shape, args.device, args.dtype, args.tokenizer_from))
        resolved = resolve_model(model_ref, CACHE)
        layers = resolved.spec.num_hidden_layers
        args.spans = args.spans or [f"0:{layers // 2}", f"{layers // 2}:{layers}"]
        flags = ["--num-threads", str(args.server_threads), "--device", args.device, "--dtype", args.dtype,
                 *args.server_flags.split()]  # fmt: skip
        gateway_flags = ["--device", args.device, "--dtype", args.dtype, *args.gateway_flags.split()]
        with model_behind_gateway("bench-concurrency-", model_ref, args.spans, flags, gateway_flags) as running:
            swarm, gateway, servers = running
            peers = [s.peer_id for s in servers]
            result = asyncio.run(bench(args, swarm, gateway, peers, resolved.model_id, resolved.folder))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json, out_png = args.out_dir / "bench_concurrency.json", args.out_dir / "bench_concurrency.png"
    out_json.write_text(json.dumps(result, indent=2))
    plot(result, out_png)
    for k, v in result["speedup_over_single"].items():
        print(f"  {k:>3s} streams: x{v:.2f} the single-stream aggregate")
    print(f"saved {out_json} and {out_png}")


if __name__ == "__main__":
    main()
