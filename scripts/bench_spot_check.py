"""What spot-checks cost: SmolLM2 on a loopback swarm of two honest servers hosting all 30 blocks; greedy
generations with spot_check_probability 0 (baseline), the default and 1.0, alternating, plus 1.0 with float16
compression; reports the mean and median decode-step time of each, the checks run and the largest relative error
between the two honest servers (how far honest answers stay from the tolerance). Then the cost model of one check:
the time of a stateless forward over all blocks of a T-token history against one decode step, for several T (a
check's cost grows with the session's length; the expected overhead is p x that ratio). Last, in-process, the
relative error of bfloat16 and float16 blocks against float32 ones (what servers of mixed dtypes differ by).

    .venv/bin/python scripts/bench_spot_check.py [--tokens 48] [--rounds 3]

Saves artifacts/bench_spot_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.model import BlockSpan  # noqa: E402
from swarm.client import ClientConfig  # noqa: E402
from swarm.model import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.span_call import call_forward  # noqa: E402
from swarm.spot_check import SpotCheckStats, relative_error  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402
from tests.helpers import MODEL_CACHE as CACHE  # noqa: E402

MODEL = "smollm2-135m-instruct"
DEFAULT_P = ClientConfig(initial_peers=[]).spot_check_probability
VARIANTS = {
    "off": (0.0, "none"),
    f"default p={DEFAULT_P}": (DEFAULT_P, "none"),
    "p=1": (1.0, "none"),
    "p=1 float16": (1.0, "float16"),
}


def generate(model, input_ids: torch.Tensor, tokens: int) -> tuple[list[float], list[int]]:
    """Greedy tokens and each decode step's time (the prefill is left out)."""
    steps: list[float] = []
    out = input_ids
    with torch.inference_mode(), model.inference_session(max_length=input_ids.shape[1] + tokens) as session:
        new = input_ids
        for _ in range(tokens):
            began = time.perf_counter()
            logits = model.head.logits(session.step(model.head.embed(new)), last_only=True)[:, -1]
            if new.shape[1] == 1:
                steps.append(time.perf_counter() - began)
            new = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, new], dim=1)
    return steps, out[0].tolist()


def check_cost(model, decode_step_s: float) -> dict[str, float]:
    """Seconds of a stateless forward over all blocks of a T-token history, as multiples of a decode step."""
    client = model.client
    client.config.compression = "none"
    hop = model._loop.run(client.route(model.model_id))[0]
    costs = {}
    for length in (16, 64, 256, 1024):
        hidden = torch.randn(1, length, model.config.hidden_size)
        times = []
        for _ in range(3):
            began = time.perf_counter()
            model._loop.run(call_forward(client, model.model_id, hop, hidden))
            times.append(time.perf_counter() - began)
        costs[str(length)] = statistics.median(times) / decode_step_s
        print(f"check over a {length}-token history: {costs[str(length)]:.1f} decode steps")
    return costs


def dtype_errors(model, input_ids: torch.Tensor) -> dict[str, float]:
    """Relative error of the blocks' output in bfloat16 / float16 against float32, over 1, 15 and 30 blocks."""
    hidden = model.head.embed(input_ids)  # [1, S, D]
    outputs: dict[torch.dtype, dict[int, torch.Tensor]] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        span = BlockSpan.load(model.resolved, 0, 30, dtype, torch.device("cpu")).eval()
        with torch.inference_mode():
            outputs[dtype] = {n: span(hidden.to(dtype), blocks=slice(0, n)).float() for n in (1, 15, 30)}
        del span
    errors = {}
    for dtype in (torch.bfloat16, torch.float16):
        for n in (1, 15, 30):
            name = f"{str(dtype).split('.')[-1]} over {n} blocks"
            errors[name] = relative_error(outputs[dtype][n], outputs[torch.float32][n])
            print(f"{name}: relative error vs float32 {errors[name]:.2e}")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    swarm = LocalSwarm(Path(tempfile.mkdtemp(prefix="bench-spot-check-")), CACHE)
    results: dict[str, dict] = {name: {"step_s": [], "checks": 0, "largest_agreeing_error": 0.0} for name in VARIANTS}
    tokens: dict[str, list[int]] = {}
    try:
        swarm.start_bootstrap()
        for server in [swarm.start_server(MODEL, "0:30", "--num-threads", "1", wait=False) for _ in range(2)]:
            swarm.wait_ready(server)
        config = ClientConfig(initial_peers=swarm.initial_peers)
        model = AutoDistributedModelForCausalLM.from_pretrained(MODEL, [], cache_dir=CACHE, client_config=config)
        tokenizer = AutoTokenizer.from_pretrained(model.resolved.folder)
        messages = [{"role": "user", "content": "Tell me a long story about the sea."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        generate(model, input_ids, 4)  # warm-up
        for index in range(args.rounds):
            for name, (probability, compression) in VARIANTS.items():
                model.client.config.spot_check_probability = probability
                model.client.config.compression = compression
                model.client.spot_checker.stats = SpotCheckStats()
                steps, tokens[name] = generate(model, input_ids, args.tokens)
                stats = model.client.spot_checks
                result = results[name]
                result["step_s"] += steps
                result["checks"] += stats.checks
                result["mismatches"] = result.get("mismatches", 0) + stats.mismatches
                result["largest_agreeing_error"] = max(result["largest_agreeing_error"], stats.largest_agreeing_error)
                print(
                    f"round {index + 1} {name}: median step {statistics.median(steps) * 1000:.1f} ms, "
                    f"checks {stats.checks}, mismatches {stats.mismatches}, largest honest relative error "
                    f"{stats.largest_agreeing_error:.2e}"
                )
        summary_check_cost = check_cost(model, statistics.median(results["off"]["step_s"]))
        model.shutdown()
        summary_dtype_errors = dtype_errors(model, input_ids)
    finally:
        swarm.stop()
    baseline = statistics.median(results["off"]["step_s"])
    mean_baseline = statistics.fmean(results["off"]["step_s"])
    summary = {
        "model": MODEL, "tokens": args.tokens, "prompt_tokens": int(input_ids.shape[1]), "variants": {},
        "check_cost_vs_decode_step": summary_check_cost, "dtype_relative_errors": summary_dtype_errors,
    }  # fmt: skip
    for name, result in results.items():
        median = statistics.median(result["step_s"])
        mean = statistics.fmean(result["step_s"])
        summary["variants"][name] = {
            "median_step_s": median, "mean_step_s": mean, "mean_vs_off": mean / mean_baseline,
            "checks": result["checks"],
            "mismatches": result.get("mismatches", 0), "largest_agreeing_error": result["largest_agreeing_error"],
            "tokens_equal_off": tokens[name] == tokens["off"],
        }  # fmt: skip
        print(
            f"{name:>16}: decode step median {median * 1000:.1f} ms ({median / baseline:.2f}x off), mean "
            f"{mean * 1000:.1f} ms ({mean / mean_baseline:.2f}x off), "
            f"checks {result['checks']}, mismatches {result.get('mismatches', 0)}, largest honest relative error "
            f"{result['largest_agreeing_error']:.2e}, tokens equal to off: {tokens[name] == tokens['off']}"
        )
    out = REPO / "artifacts" / "bench_spot_check.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
