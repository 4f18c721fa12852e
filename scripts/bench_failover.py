"""The stall a killed server causes in a stream: SmolLM2 on a loopback swarm with redundant coverage; a greedy
generation runs through a server hosting all 30 blocks, which is killed (SIGKILL by default) mid-stream; the
session fails over to two servers covering 0:15 and 15:30, replays its past inputs and goes on.

    .venv/bin/python scripts/bench_failover.py [--tokens 64] [--fail-at 32] [--signal KILL|TERM|STOP] [--rounds 3]

Prints the inter-token gaps around the failure and the median gap; saves artifacts/bench_failover.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from swarm.client import ClientConfig  # noqa: E402
from swarm.model import AutoDistributedModelForCausalLM  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402
from tests.helpers import MODEL_CACHE as CACHE  # noqa: E402

MODEL = "smollm2-135m-instruct"


def one_round(swarm: LocalSwarm, model, input_ids: torch.Tensor, args) -> dict:
    victim = swarm.start_server(MODEL, "0:30", "--num-threads", "1")
    stamps: list[float] = []
    tokens = input_ids
    with torch.inference_mode(), model.inference_session(max_length=input_ids.shape[1] + args.tokens) as session:
        on_victim = [hop.peer_id for hop in session.session.route] == [victim.peer_id]
        new = input_ids
        for i in range(args.tokens):
            if i == args.fail_at:
                killed_at = time.perf_counter()
                victim.signal(getattr(signal, f"SIG{args.signal}"))
            logits = model.head.logits(session.step(model.head.embed(new)), last_only=True)[:, -1]
            new = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, new], dim=1)
            stamps.append(time.perf_counter())
        failovers = session.session.failovers
        recovery = sum(session.session.recovery_s)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    stall = stamps[args.fail_at] - killed_at
    normal = statistics.median(gaps[: args.fail_at - 1] + gaps[args.fail_at + 1 :])
    return {
        "route_used_victim": on_victim, "failovers": failovers, "stall_s": stall, "median_gap_s": normal,
        "recovery_after_detection_s": recovery,
        "gaps_around_failure_s": gaps[args.fail_at - 3 : args.fail_at + 3], "tokens": tokens[0].tolist(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--fail-at", type=int, default=32)
    parser.add_argument("--signal", choices=["KILL", "TERM", "STOP"], default="KILL")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-timeout-s", type=float, default=5.0, help="how long a hung server is waited for")
    args = parser.parse_args()

    swarm = LocalSwarm(Path(tempfile.mkdtemp(prefix="bench-failover-")), CACHE)
    rounds = []
    try:
        swarm.start_bootstrap()
        for server in [swarm.start_server(MODEL, span, "--num-threads", "1", wait=False) for span in ("0:15", "15:30")]:
            swarm.wait_ready(server)
        config = ClientConfig(
            initial_peers=swarm.initial_peers, step_timeout_s=args.step_timeout_s, coverage_ttl_s=0.0,
            coverage_max_stale_s=0.0,
        )  # fmt: skip
        model = AutoDistributedModelForCausalLM.from_pretrained(MODEL, [], cache_dir=CACHE, client_config=config)
        tokenizer = AutoTokenizer.from_pretrained(model.resolved.folder)
        messages = [{"role": "user", "content": "Tell me a long story about the sea."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        for index in range(args.rounds):
            result = one_round(swarm, model, input_ids, args)
            rounds.append(result)
            print(
                f"round {index + 1}: SIG{args.signal} at token {args.fail_at}: stall {result['stall_s'] * 1000:.0f} ms "
                f"(median gap {result['median_gap_s'] * 1000:.0f} ms; recovery after detection "
                f"{result['recovery_after_detection_s'] * 1000:.0f} ms), failovers {result['failovers']}, "
                f"route used the victim: {result['route_used_victim']}"
            )
        model.shutdown()
    finally:
        swarm.stop()
    same = all(r["tokens"] == rounds[0]["tokens"] for r in rounds)
    summary = {
        "signal": args.signal, "median_stall_s": statistics.median(r["stall_s"] for r in rounds),
        "median_recovery_after_detection_s": statistics.median(r["recovery_after_detection_s"] for r in rounds),
        "median_gap_s": statistics.median(r["median_gap_s"] for r in rounds), "tokens_identical_across_rounds": same,
        "rounds": rounds,
    }  # fmt: skip
    print(
        f"median stall {summary['median_stall_s'] * 1000:.0f} ms, of which recovery after detection "
        f"{summary['median_recovery_after_detection_s'] * 1000:.0f} ms (target: under 2 s), vs median inter-token "
        f"gap {summary['median_gap_s'] * 1000:.0f} ms; tokens identical across rounds: {same}"
    )
    out = REPO / "artifacts" / "bench_failover.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
