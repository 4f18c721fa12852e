"""What the gateway costs: time to first token and decode speed of SmolLM2 through the real gateway process
(OpenAI SDK, streaming, greedy) vs the swarm client driven directly (``SwarmClient`` + ``ModelHead``, the same
greedy loop the gateway runs), alternating on one loopback swarm in one run.

    .venv/bin/python scripts/bench_gateway.py [--max-tokens 64] [--rounds 5] [--server-threads 1]

Both sides ban the end-of-sequence token (logit_bias -100 / the same subtraction), so every run makes exactly
``--max-tokens`` tokens. Prints medians and gateway/direct ratios; saves artifacts/bench_gateway.json.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from openai import AsyncOpenAI
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_streams import CACHE, MODEL, smollm2_behind_gateway, timed_stream  # noqa: E402

from swarm.client import ClientConfig, SwarmClient  # noqa: E402
from swarm.head import ModelHead  # noqa: E402
from swarm.weights import resolve_model  # noqa: E402
from tests.e2e.gateway_process import GatewayProcess  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402

OUT = REPO / "artifacts" / "bench_gateway.json"
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


@dataclass
class Run:
    kind: str
    ttft_s: float
    decode_tok_s: float
    tokens: int
    text: str


def _run(kind: str, began: float, first: float, last: float, tokens: int, text: str) -> Run:
    return Run(kind, first - began, (tokens - 1) / max(last - first, 1e-9), tokens, text)


async def run_gateway(client: AsyncOpenAI, max_tokens: int, eos: int) -> Run:
    """One streamed greedy request; first/last = arrival of the first content chunk and of the finish chunk."""
    timed = await timed_stream(
        client, max_tokens, model=MODEL, messages=MESSAGES, temperature=0, max_tokens=max_tokens,
        logit_bias={str(eos): -100},
    )  # fmt: skip
    return _run("gateway", timed.began, timed.first, timed.last, timed.tokens, timed.text)


async def run_direct(
    client: SwarmClient, head: ModelHead, model_id: str, prompt_ids: list[int], max_tokens: int, eos: int, tokenizer
) -> Run:
    """The gateway's work without HTTP: embed, one session, per step logits -> argmax -> embed."""
    began = time.perf_counter()
    tokens: list[int] = []
    first = last = began
    with torch.inference_mode():
        hidden = head.embed(torch.tensor([prompt_ids]))  # [1, S, D]
        max_length = len(prompt_ids) + max_tokens
        async with client.inference_session(model_id, max_length=max_length) as session:
            for step in range(max_tokens):
                out = await session.step(hidden)  # [1, S, D]
                logits = head.logits(out, last_only=True)[:, -1]  # [1, V]
                logits[:, eos] -= 100  # what logit_bias {eos: -100} does in the gateway
                token = int(logits.argmax(dim=-1))
                tokens.append(token)
                last = time.perf_counter()
                if step == 0:
                    first = last
                hidden = head.embed(torch.tensor([[token]]))  # [1, 1, D]
    return _run("direct", began, first, last, len(tokens), tokenizer.decode(tokens, skip_special_tokens=True))


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


async def bench(args: argparse.Namespace, swarm: LocalSwarm, gateway: GatewayProcess) -> dict:
    resolved = resolve_model(MODEL, CACHE)
    tokenizer = AutoTokenizer.from_pretrained(resolved.folder)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = int(tokenizer.eos_token_id)
    head = ModelHead.load(resolved)
    client = await SwarmClient.create(ClientConfig(initial_peers=swarm.initial_peers))
    sdk = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=300)

    async def gateway_run() -> Run:
        return await run_gateway(sdk, args.max_tokens, eos)

    async def direct_run() -> Run:
        return await run_direct(client, head, resolved.model_id, prompt_ids, args.max_tokens, eos, tokenizer)

    try:
        await gateway_run(), await direct_run()  # warm-up: connections, routes, caches
        runs: list[Run] = []
        for i in range(args.rounds):
            # Alternate which side goes first, so a slow phase of the shared machine hits both.
            order = (gateway_run, direct_run) if i % 2 == 0 else (direct_run, gateway_run)
            for fn in order:
                run = await fn()
                runs.append(run)
                print(
                    f"round {i}: {run.kind:7s} ttft {run.ttft_s * 1000:7.1f} ms  decode {run.decode_tok_s:6.2f} tok/s"
                )
    finally:
        await sdk.close()
        await client.shutdown()
    by_kind = {k: [r for r in runs if r.kind == k] for k in ("gateway", "direct")}
    medians = {
        k: {"ttft_ms": median(rs, "ttft_s") * 1000, "decode_tok_s": median(rs, "decode_tok_s")}
        for k, rs in by_kind.items()
    }
    return {
        "config": {**vars(args), "model": MODEL, "prompt_tokens": len(prompt_ids)},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "head_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "medians": medians,
        "ratio_gateway_over_direct": {
            "ttft": medians["gateway"]["ttft_ms"] / medians["direct"]["ttft_ms"],
            "decode_tok_s": medians["gateway"]["decode_tok_s"] / medians["direct"]["decode_tok_s"],
        },
        "same_text": len({r.text for r in runs}) == 1,
        "runs": [asdict(r) | {"text": None} for r in runs],
        "sample_text": runs[0].text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument(
        "--head-threads", type=int, default=None,
        help="torch threads of the local head on both sides (the gateway via OMP_NUM_THREADS); default: torch's",
    )  # fmt: skip
    args = parser.parse_args()
    if args.head_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.head_threads)  # children inherit it; servers still set --num-threads
        torch.set_num_threads(args.head_threads)

    flags = ["--num-threads", str(args.server_threads)]
    with smollm2_behind_gateway("bench-gateway-", flags) as (swarm, gateway, _):
        result = asyncio.run(bench(args, swarm, gateway))

    m, ratio = result["medians"], result["ratio_gateway_over_direct"]
    print(
        f"\nmedians over {args.rounds} rounds, {args.max_tokens} tokens, {result['config']['prompt_tokens']}-token "
        f"prompt:\n  gateway: ttft {m['gateway']['ttft_ms']:.1f} ms, decode {m['gateway']['decode_tok_s']:.2f} tok/s"
        f"\n  direct:  ttft {m['direct']['ttft_ms']:.1f} ms, decode {m['direct']['decode_tok_s']:.2f} tok/s"
        f"\n  gateway/direct: ttft x{ratio['ttft']:.3f}, decode x{ratio['decode_tok_s']:.3f}"
        f" (gateway cost {100 * (1 - ratio['decode_tok_s']):.1f}% of decode speed); same text: {result['same_text']}"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"saved {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
