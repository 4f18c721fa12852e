"""Where a server's decode step goes: one hosted span of a random-weight Llama, timed and profiled in-process.

    python3 scripts/profile_span.py --device cuda --dtype bfloat16 --shape 8b --blocks 16 --sessions 1 16

For each number of sessions: the median time of a decode step (every session one new token, packed into one
forward as the server's continuous batching does), and torch.profiler's top operators by CPU time. No network,
no server: this is the compute floor a server's step cannot beat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_gpu import LLAMA_8B, TINY  # noqa: E402

from server.model import BlockSpan  # noqa: E402
from server.model.kv_pool import KVPool  # noqa: E402
from server.model.span import SpanCache, SpanStep  # noqa: E402
from swarm.config import ModelSpec  # noqa: E402

SMOLLM2 = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", default="tiny", choices=["8b", "smollm2", "tiny"])
    parser.add_argument("--blocks", type=int, default=None, help="blocks hosted (default: all)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=64, help="tokens already cached per session")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument(
        "--decode-attention", choices=["pooled", "per-session"], default="pooled",
        help="packed decode steps: caches in a shared pool, one attention call per chunk (the server's way), or "
        "each session's own cache and attention call",
    )  # fmt: skip
    parser.add_argument("--chunk-rows", type=int, default=32, help="rows per pooled cache chunk (sessions per chunk)")
    parser.add_argument("--cudnn-sdp", choices=["on", "off"], default="on", help="allow cuDNN's attention kernels")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cuda.enable_cudnn_sdp(args.cudnn_sdp == "on")
    shape = {"8b": LLAMA_8B, "smollm2": SMOLLM2, "tiny": TINY}[args.shape]
    spec = ModelSpec.from_hf_config({**shape, "model_type": "llama", "hidden_act": "silu"})
    blocks = args.blocks or spec.num_hidden_layers
    torch.manual_seed(0)
    with torch.device(device):
        span = BlockSpan(spec, 0, blocks, dtype=dtype, device=device)
        for p in span.parameters():
            p.data.normal_(0, 0.02)
    span.eval()
    span.pooled_decode = args.decode_attention == "pooled"
    d = spec.hidden_size
    capacity = args.context + args.steps + 16
    for n in args.sessions:
        pool = KVPool(spec, dtype, device, chunk_bytes=0)  # as a server's registry does, chunks of --chunk-rows
        pool.chunk_bytes = args.chunk_rows * pool.row_bytes(blocks, pool.capacity_for(blocks, 1, capacity)[0])
        caches = [
            pool.allocate(blocks, 1, capacity) if span.pooled_decode
            else SpanCache.allocate(spec, blocks, 1, capacity, dtype, device)
            for _ in range(n)
        ]  # fmt: skip
        with torch.inference_mode():
            for cache in caches:
                span(torch.randn(1, args.context, d, device=device, dtype=dtype), cache, 0)
            times = []
            position = args.context

            def step(position: int, caches: list[SpanCache] = caches) -> None:
                steps = [SpanStep(torch.randn(1, 1, d, device=device, dtype=dtype), c, position) for c in caches]
                outs = span.forward_packed(steps)
                outs[0].to("cpu")  # the server sends every output back to the host

            step(position)  # warm-up at one length; every timed step below is at a new length, as decoding is
            for _ in range(args.steps):
                sync(device)
                began = time.perf_counter()
                step(position)
                sync(device)
                times.append(time.perf_counter() - began)
                position += 1
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(3):
                    step(position)
                    position += 1
                sync(device)
        median, best = 1000 * statistics.median(times), 1000 * min(times)
        print(f"\n{n} sessions x {blocks} blocks, {args.decode_attention} decode attention, cuDNN attention "
              f"{args.cudnn_sdp}: decode step median {median:.2f} ms (min {best:.2f})", flush=True)  # fmt: skip
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
