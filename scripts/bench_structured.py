"""What a JSON-schema constraint costs: decode tokens/s of SmolLM2 through the real gateway process (OpenAI SDK,
streaming, greedy) with and without ``response_format: json_schema``, alternating on one loopback swarm.

    .venv/bin/python scripts/bench_structured.py [--max-tokens 64] [--rounds 6] [--server-threads 1]

Both sides ban the end-of-sequence token, and the schema asks for a list of at least 40 strings, so both make
``--max-tokens`` tokens. Prints medians and the constrained/free ratio; saves artifacts/bench_structured.json.

On a shared CPU the end-to-end ratio is noisy (the servers compete with everything else), so the script also
runs the generator directly, alternating the same way, with the real head and tokenizer over a fake swarm whose
every step takes a fixed ``--fake-step-ms``: what differs between the two sides is then only the gateway's
own work. Finally it replays the constrained answer's tokens
through the gateway's own mask code in-process and reports the per-token cost of each part: ``advance``
(consume + next mask, which runs while the swarm step is in flight) and ``apply`` (on the sampling path).
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

from gateway.generation.constraint import (  # noqa: E402
    Grammar,
    TokenConstraint,
    apply_token_bitmask,
    grammar_tokenizer,
    json_schema_grammar,
)
from gateway.generation.generator import GenerationParams, generate  # noqa: E402
from gateway.generation.model import LoadedModel  # noqa: E402
from swarm.head import ModelHead  # noqa: E402
from swarm.sampling import SamplingParams  # noqa: E402
from swarm.weights import resolve_model  # noqa: E402
from tests.e2e.gateway_process import GatewayProcess  # noqa: E402
from tests.gateway.fakes import FakeSwarm  # noqa: E402

OUT = REPO / "artifacts" / "bench_structured.json"
MESSAGES = [{"role": "user", "content": 'List many animals as JSON: {"animals": [...]}.'}]
SCHEMA = {
    "type": "object",
    "properties": {"animals": {"type": "array", "items": {"type": "string"}, "minItems": 40}},
    "required": ["animals"],
    "additionalProperties": False,
}


@dataclass
class Run:
    kind: str
    ttft_s: float
    decode_tok_s: float
    tokens: int
    text: str


async def run_once(client: AsyncOpenAI, kind: str, max_tokens: int, eos: int) -> Run:
    """One streamed greedy request; decode rate from the first content chunk to the finish chunk."""
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "animals", "schema": SCHEMA}}}
    timed = await timed_stream(
        client, max_tokens, model=MODEL, messages=MESSAGES, temperature=0, max_tokens=max_tokens,
        logit_bias={str(eos): -100}, **(extra if kind == "json_schema" else {}),
    )  # fmt: skip
    return Run(kind, timed.ttft_s, timed.decode_tok_s, timed.tokens, timed.text)


async def generator_rates(args: argparse.Namespace, tokenizer) -> dict[str, list[float]]:
    """Decode tokens/s of ``generate`` itself over a fixed-latency fake swarm, free vs json_schema, alternated."""
    resolved = resolve_model(MODEL, CACHE)
    head = ModelHead.load(resolved)
    eos, vocab = int(tokenizer.eos_token_id), len(tokenizer)
    model = LoadedModel(
        ref=MODEL, model_id=resolved.model_id, num_blocks=0, tokenizer=tokenizer, head=head,
        context_length=4096, vocab_size=vocab, eos_token_ids=frozenset({eos}),
    )  # fmt: skip
    swarm = FakeSwarm(step_delay_s=args.fake_step_ms / 1000)
    swarm.mixer = torch.eye(head.embed(torch.tensor([[eos]])).shape[-1])  # hidden states pass through: [D, D]
    grammar = Grammar.compile(json_schema_grammar(SCHEMA), grammar_tokenizer(tokenizer, vocab, [eos]), None)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    async def rate(kind: str) -> float:
        params = GenerationParams(
            max_tokens=args.max_tokens,
            sampling=SamplingParams(temperature=0, logit_bias={eos: -100}),
            grammar=grammar if kind == "json_schema" else None,
        )
        first, steps = None, 0
        async for _ in generate(swarm, model, prompt_ids, params):
            steps += 1
            first = first or time.perf_counter()
        return (steps - 1) / (time.perf_counter() - first)

    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    await rate("free"), await rate("json_schema")  # warm-up
    for i in range(args.rounds):
        for kind in ("free", "json_schema") if i % 2 == 0 else ("json_schema", "free"):
            rates[kind].append(await rate(kind))
    return rates


def mask_costs(tokenizer, text: str, vocab_size: int) -> dict[str, float]:
    """Median milliseconds per token of the gateway's mask work, replaying ``text``'s tokens."""
    eos = int(tokenizer.eos_token_id)
    grammar = Grammar.compile(json_schema_grammar(SCHEMA), grammar_tokenizer(tokenizer, vocab_size, [eos]), None)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    logits = torch.randn(1, vocab_size)  # [1, V]
    advance, apply = [], []
    for _ in range(5):
        constraint = TokenConstraint(grammar, 1, vocab_size)
        mask = constraint.fill()
        for token in ids:
            began = time.perf_counter()
            apply_token_bitmask(logits, mask)
            apply.append(time.perf_counter() - began)
            began = time.perf_counter()
            mask = constraint.advance([token], [False])
            advance.append(time.perf_counter() - began)
    return {"advance_ms": statistics.median(advance) * 1000, "apply_ms": statistics.median(apply) * 1000}


async def bench(args: argparse.Namespace, gateway: GatewayProcess) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL, CACHE).folder)
    eos = int(tokenizer.eos_token_id)
    sdk = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    runs: list[Run] = []
    try:
        for kind in ("free", "json_schema"):  # warm-up: connections, routes, the grammar tokenizer
            await run_once(sdk, kind, args.max_tokens, eos)
        for i in range(args.rounds):
            for kind in ("free", "json_schema") if i % 2 == 0 else ("json_schema", "free"):
                run = await run_once(sdk, kind, args.max_tokens, eos)
                runs.append(run)
                print(f"round {i}: {kind:11s} ttft {run.ttft_s * 1000:7.1f} ms  decode {run.decode_tok_s:6.2f} tok/s")
    finally:
        await sdk.close()
    medians = {
        kind: {
            "ttft_ms": statistics.median(r.ttft_s for r in runs if r.kind == kind) * 1000,
            "decode_tok_s": statistics.median(r.decode_tok_s for r in runs if r.kind == kind),
        }
        for kind in ("free", "json_schema")
    }
    constrained = [r.text for r in runs if r.kind == "json_schema"]
    costs = mask_costs(tokenizer, constrained[0], len(tokenizer))
    direct = await generator_rates(args, tokenizer)
    direct_medians = {kind: statistics.median(v) for kind, v in direct.items()}
    return {
        "mask_ms_per_token": costs,
        "generator_fake_swarm": {
            "step_ms": args.fake_step_ms,
            "decode_tok_s": direct,
            "medians": direct_medians,
            "ratio_json_schema_over_free": direct_medians["json_schema"] / direct_medians["free"],
        },
        "config": {**vars(args), "model": MODEL},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "medians": medians,
        "ratio_json_schema_over_free": {
            "decode_tok_s": medians["json_schema"]["decode_tok_s"] / medians["free"]["decode_tok_s"],
            "ttft": medians["json_schema"]["ttft_ms"] / medians["free"]["ttft_ms"],
        },
        "runs": [asdict(r) | {"text": None} for r in runs],
        "sample_json_schema_text": constrained[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--fake-step-ms", type=float, default=50.0, help="step latency of the generator-only run")
    args = parser.parse_args()

    flags = ["--num-threads", str(args.server_threads)]
    with smollm2_behind_gateway("bench-structured-", flags) as (_, gateway, _):
        result = asyncio.run(bench(args, gateway))
    med, ratio = result["medians"], result["ratio_json_schema_over_free"]
    print(
        f"median decode: free {med['free']['decode_tok_s']:.2f} tok/s, json_schema "
        f"{med['json_schema']['decode_tok_s']:.2f} tok/s, ratio {ratio['decode_tok_s']:.3f} "
        f"(cost {100 * (1 - ratio['decode_tok_s']):.1f}%); ttft ratio {ratio['ttft']:.3f}"
    )
    direct = result["generator_fake_swarm"]
    print(
        f"generator over a {args.fake_step_ms:.0f} ms fake swarm: free {direct['medians']['free']:.2f} tok/s, "
        f"json_schema {direct['medians']['json_schema']:.2f} tok/s, ratio {direct['ratio_json_schema_over_free']:.3f}"
    )
    costs, step_ms = result["mask_ms_per_token"], 1000 / med["free"]["decode_tok_s"]
    print(
        f"mask work per token (in-process replay): advance {costs['advance_ms']:.3f} ms (overlapped with the "
        f"swarm step), apply {costs['apply_ms']:.3f} ms = {100 * costs['apply_ms'] / step_ms:.1f}% of a "
        f"{step_ms:.0f} ms decode step"
    )
    print("sample:", result["sample_json_schema_text"][:200])
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"saved {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
