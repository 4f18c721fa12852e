"""GPU decode speed: an 8B-shape Llama (random bf16 weights) through a two-server loopback swarm on one GPU vs the
same model run locally with transformers' ``generate``, measured alternately in one run.

    python3 scripts/bench_gpu.py [--new-tokens 128] [--rounds 3] [--streams 16] [--stream-tokens 128]
    .venv/bin/python scripts/bench_gpu.py --tiny --device cpu      # check the logic on a CPU, in seconds

Measures, for each side: time to first token and single-stream decode tokens/s (as scripts/bench_swarm.py does:
a 1-token run, then an N-token run; decode = (N - 1) / (t_N - t_1)), and aggregate tokens/s at ``--streams``
concurrent streams (swarm: that many inference sessions through one SwarmClient via asyncio.gather, each decoding
greedily with the ModelHead on the GPU; local: one ``generate`` of that batch). Aggregate = streams x tokens / wall
time, prefill included. Prints a table and swarm/local ratios; saves JSON to $OUT (or artifacts/) with the servers'
logs beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.model.attention import avoid_cudnn_attention  # noqa: E402
from swarm.client import ClientConfig, SwarmClient  # noqa: E402
from swarm.head import ModelHead  # noqa: E402
from swarm.probe import probe_servers  # noqa: E402
from swarm.weights import resolve_model  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402

# Llama 3 8B's shape (meta-llama/Meta-Llama-3-8B config.json).
LLAMA_8B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
TINY = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=1024, rope_theta=500000.0, max_position_embeddings=2048, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def build_model(folder: Path, shape: dict, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights made directly on ``device`` in ``dtype`` (seconds on a GPU), saved as a HF folder."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = shape["eos_token_id"]
    began = time.perf_counter()
    model.save_pretrained(folder)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters to {folder} "
          f"in {time.perf_counter() - began:.1f}s", flush=True)  # fmt: skip
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


class LocalRunner:
    """transformers' generate on the local model: greedy, exactly ``n`` new tokens."""

    def __init__(self, model: LlamaForCausalLM, device: torch.device):
        self.model = model
        self.device = device
        avoid_cudnn_attention(device)  # the same attention kernels as the servers use

    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        ids = ids.to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
        return out[:, ids.shape[1] :].cpu()


class SwarmRunner:
    """Greedy decoding through the swarm: embeddings and head on the GPU, blocks on the servers.

    Each step is a host round trip: embed on the GPU -> CPU -> server 1 -> server 2 -> CPU -> head on the GPU.
    """

    def __init__(self, client: SwarmClient, head: ModelHead, model_id: str, device: torch.device):
        self.client = client
        self.head = head
        self.model_id = model_id
        self.device = device
        self.step_s = 0.0
        """Time spent awaiting ``session.step`` (both servers and the wire), summed over sessions."""
        self.steps = 0

    async def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """ids: [1, P] -> [1, n] new tokens (one inference session)."""
        tokens = []
        async with self.client.inference_session(self.model_id, max_length=ids.shape[1] + n) as session:
            new_ids = ids.to(self.device)  # [1, S]
            for _ in range(n):
                hidden = self.head.embed(new_ids).cpu()  # [1, S, D]
                began = time.perf_counter()
                out = await session.step(hidden)  # [1, S, D]
                self.step_s += time.perf_counter() - began
                self.steps += 1
                logits = self.head.logits(out.to(self.device), last_only=True)[:, -1]  # [1, V]
                new_ids = logits.argmax(dim=-1, keepdim=True)  # [1, 1]
                tokens.append(new_ids)
        return torch.cat(tokens, dim=1).cpu()

    def reset_stats(self) -> None:
        self.step_s, self.steps = 0.0, 0

    async def generate_many(self, ids: torch.Tensor, n: int) -> list[torch.Tensor]:
        """ids: [K, P] -> K concurrent sessions of one row each, gathered."""
        return await asyncio.gather(*(self.generate(ids[i : i + 1], n) for i in range(ids.shape[0])))

    async def wait_for_coverage(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not (await self.client.model_coverage(self.model_id, fresh=True)).complete:
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {self.model_id} not fully served after {timeout_s}s")
            await asyncio.sleep(0.5)


async def atimed(coro_fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    began = time.perf_counter()
    await coro_fn()
    sync(device)
    return time.perf_counter() - began


def decode_rate(t1: float, tn: float, n: int) -> float:
    return (n - 1) / max(tn - t1, 1e-9)


def summarize(rows: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    return {
        side: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for side, runs in rows.items() if runs
    }


def print_table(summary: dict, streams: int) -> None:
    single, multi = summary.get("single", {}), summary.get("concurrent", {})
    lines = [
        ("time to first token (ms)", "ttft_ms", single),
        ("single-stream decode (tokens/s)", "decode_tps", single),
        (f"aggregate at {streams} streams (tokens/s)", "aggregate_tps", multi),
    ]
    print(f"\n{'median of rounds':42s} {'local':>10s} {'swarm':>10s} {'swarm/local':>12s}")
    for label, key, table in lines:
        local, swarm = table.get("local", {}).get(key), table.get("swarm", {}).get(key)
        ratio = f"{swarm / local:12.2f}" if local and swarm else f"{'-':>12s}"
        fmt = lambda v: f"{v:10.1f}" if v is not None else f"{'-':>10s}"  # noqa: E731
        print(f"{label:42s} {fmt(local)} {fmt(swarm)} {ratio}")


async def measure(args, model, folder: Path, device: torch.device, dtype: torch.dtype, report: dict, save) -> None:
    local = LocalRunner(model, device)
    resolved = resolve_model(str(folder), folder.parent / "cache")
    head = ModelHead.load(resolved, dtype, device)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    swarm = LocalSwarm(workdir, folder.parent / "cache")
    began_all = time.monotonic()
    out_of_time = lambda: time.monotonic() - began_all > args.measure_budget_s  # noqa: E731
    try:
        swarm.start_bootstrap()
        layers = resolved.spec.num_hidden_layers
        spans = (f"0:{layers // 2}", f"{layers // 2}:{layers}")
        flags = ["--device", args.device, "--dtype", args.dtype, "--num-threads", str(args.server_threads),
                 "--cache-budget-mb", str(args.cache_budget_mb), *args.server_flag]  # fmt: skip
        began = time.perf_counter()
        servers = [swarm.start_server(str(folder), span, *flags, wait=False) for span in spans]
        for server in servers:
            swarm.wait_ready(server, timeout_s=300)
        report["servers_ready_s"] = time.perf_counter() - began
        print(f"servers ready in {report['servers_ready_s']:.1f}s", flush=True)
        config = ClientConfig(initial_peers=swarm.initial_peers, min_step_timeout_s=10.0)
        client = await SwarmClient.create(config)
        remote = SwarmRunner(client, head, resolved.model_id, device)
        await remote.wait_for_coverage()
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            report["gpu_memory_used_gb_all_processes"] = (total - free) / 1e9

        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(100, resolved.spec.vocab_size, (args.streams, args.prompt_tokens), generator=gen)
        one = prompts[:1]
        # Warm-up (kernels, allocator, streams), and do the two sides agree on greedy tokens?
        check = min(16, args.new_tokens)
        local_tokens = local.generate(one, check)
        swarm_tokens = await remote.generate(one, check)
        agree = int((local_tokens == swarm_tokens).int().cumprod(dim=1).sum())
        report["greedy_prefix_agreement"] = f"{agree}/{check}"
        print(f"greedy tokens: first {agree} of {check} equal (random bf16 weights: near-ties may flip)", flush=True)
        local.generate(prompts, 4)
        await remote.generate_many(prompts, 4)

        single: dict[str, list[dict]] = {"local": [], "swarm": []}
        report["raw_single"] = single
        n = args.new_tokens
        for r in range(args.warmup + args.rounds):
            if r > args.warmup and out_of_time():
                print("measure budget spent; skipping further single-stream rounds", flush=True)
                break
            rows: dict[str, dict] = {}
            t1 = timed(lambda: local.generate(one, 1), device)
            tn = timed(lambda: local.generate(one, n), device)
            rows["local"] = {"ttft_ms": t1 * 1000, "decode_tps": decode_rate(t1, tn, n)}
            t1 = await atimed(lambda: remote.generate(one, 1), device)
            remote.reset_stats()
            tn = await atimed(lambda: remote.generate(one, n), device)
            rows["swarm"] = {"ttft_ms": t1 * 1000, "decode_tps": decode_rate(t1, tn, n),
                             "step_ms_per_token": remote.step_s / remote.steps * 1000,
                             "wall_ms_per_token": tn / n * 1000}  # fmt: skip
            label = "warm-up" if r < args.warmup else f"round {r + 1 - args.warmup}"
            for side, row in rows.items():
                if r >= args.warmup:
                    single[side].append(row)
                print(f"{label} single {side:5s}: ttft {row['ttft_ms']:7.1f} ms, "
                      f"decode {row['decode_tps']:6.1f} tokens/s", flush=True)  # fmt: skip
            print(f"  swarm per token: {rows['swarm']['wall_ms_per_token']:.1f} ms wall, of which "
                  f"{rows['swarm']['step_ms_per_token']:.1f} ms awaiting the two servers", flush=True)  # fmt: skip
            save()

        multi: dict[str, list[dict]] = {"local": [], "swarm": []}
        report["raw_concurrent"] = multi
        k, m = args.streams, args.stream_tokens
        for r in range(args.warmup + args.rounds_concurrent):
            if r > args.warmup and out_of_time():
                print("measure budget spent; skipping further concurrent rounds", flush=True)
                break
            rows = {}
            wall = timed(lambda: local.generate(prompts, m), device)
            rows["local"] = {"aggregate_tps": k * m / wall, "wall_s": wall}
            remote.reset_stats()
            wall = await atimed(lambda: remote.generate_many(prompts, m), device)
            rows["swarm"] = {"aggregate_tps": k * m / wall, "wall_s": wall,
                             "step_ms_mean": remote.step_s / remote.steps * 1000}  # fmt: skip
            label = "warm-up" if r < args.warmup else f"round {r + 1 - args.warmup}"
            for side, row in rows.items():
                if r >= args.warmup:
                    multi[side].append(row)
                print(f"{label} {k} streams {side:5s}: {row['aggregate_tps']:7.1f} tokens/s "
                      f"({k} x {m} tokens in {row['wall_s']:.2f}s)", flush=True)  # fmt: skip
            print(f"  swarm: {rows['swarm']['wall_s'] / m * 1000:.1f} ms per decode round of {k} tokens; a session "
                  f"awaits its step {rows['swarm']['step_ms_mean']:.1f} ms on average", flush=True)  # fmt: skip
            save()

        probes = await probe_servers(client.p2p, [s.peer_id for s in servers], timeout_s=5.0)
        report["server_batching"] = {
            f"{p.info.start}:{p.info.end}": {
                "max_batch_sessions_seen": p.info.max_batch_sessions_seen,
                "max_batch_rows_seen": p.info.max_batch_rows_seen,
                "batched_steps": p.info.batched_steps,
            }
            for p in probes.values()
            if p.info is not None
        }
        report["summary"] = {"single": summarize(single), "concurrent": summarize(multi)}
        await client.shutdown()
    finally:
        swarm.stop()
        if args.out_dir:
            for child in swarm.children:
                if child.log_path.exists():
                    text = child.log_path.read_text(errors="replace")[-200_000:]
                    (args.out_dir / f"{child.name.replace(':', '_')}.log").write_text(text)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 4 layers: checks the logic, not speed")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128, help="single-stream tokens per run")
    parser.add_argument("--rounds", type=int, default=3, help="single-stream rounds (local and swarm alternate)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded full-length rounds before each phase")
    parser.add_argument("--stream-tokens", type=int, default=128, help="tokens per stream in the concurrent runs")
    parser.add_argument("--rounds-concurrent", type=int, default=3)
    parser.add_argument("--server-threads", type=int, default=4)
    parser.add_argument("--cache-budget-mb", type=int, default=4096)
    parser.add_argument("--server-flag", action="append", default=[], help="extra server flag (repeatable)")
    parser.add_argument("--measure-budget-s", type=float, default=360.0, help="skip later rounds after this")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT") or REPO / "artifacts"))
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out_dir / "bench_gpu.json"
    root = args.model_dir or Path(tempfile.mkdtemp(prefix="bench-gpu-model-"))
    folder = root / ("llama-tiny" if args.tiny else "llama8b")
    shape = TINY if args.tiny else LLAMA_8B
    report: dict = {
        "shape": shape, "device": args.device, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "streams": args.streams, "stream_tokens": args.stream_tokens,
        "rounds": args.rounds, "warmup_rounds": args.warmup, "rounds_concurrent": args.rounds_concurrent,
        "server_threads": args.server_threads,
        "server_flags": args.server_flag, "torch": torch.__version__,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }  # fmt: skip
    import transformers

    report["transformers"] = transformers.__version__
    print(f"card: {report['card']}; torch {torch.__version__}; transformers {transformers.__version__}", flush=True)

    def save() -> None:
        out_json.write_text(json.dumps(report, indent=2, default=str))

    try:
        model = build_model(folder, shape, device, dtype)
        asyncio.run(measure(args, model, folder, device, dtype, report, save))
    finally:
        save()
        if args.model_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(report["summary"], args.streams)
    if "server_batching" in report:
        print(f"server batching: {json.dumps(report['server_batching'])}")
    print(f"saved {out_json}")


if __name__ == "__main__":
    main()
