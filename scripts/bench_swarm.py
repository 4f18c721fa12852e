"""Single-stream decode speed and time to first token: SmolLM2 through a two-server loopback swarm vs the same
model run locally in one process with transformers' ``generate``, measured alternately in one run.

    .venv/bin/python scripts/bench_swarm.py [--new-tokens 128] [--rounds 3] [--server-threads 2]

Prints medians and the swarm/local ratio; saves artifacts/bench_swarm.json.

With ``--compare push`` it compares the swarm with server-to-server push on and off instead (two clients on the
same servers, alternating), over ``--spans`` (e.g. ``0:10,10:20,20:30`` for three hops), and saves
scripts/results/bench_swarm_push_<N>hops.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from swarm.runtime import prefer_passive_openmp  # noqa: E402

prefer_passive_openmp()  # the same OpenMP policy as the servers, so the local baseline is not handicapped

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm.client import ClientConfig  # noqa: E402
from swarm.model import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.weights import resolve_model  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402
from tests.helpers import MODEL_CACHE as CACHE  # noqa: E402

MODEL = "smollm2-135m-instruct"


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def measure(generate_n, new_tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s after the first)."""
    ttft = timed(lambda: generate_n(1))
    total = timed(lambda: generate_n(new_tokens))
    return ttft, (new_tokens - 1) / max(total - ttft, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--local-threads", type=int, default=2)
    parser.add_argument("--compare", choices=("local", "push"), default="local", help="the baseline to compare with")
    parser.add_argument("--spans", default="0:15,15:30", help="block spans of the servers, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.local_threads)

    resolved = resolve_model(MODEL, CACHE)
    tokenizer = AutoTokenizer.from_pretrained(resolved.folder)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    if args.compare == "local":
        local = AutoModelForCausalLM.from_pretrained(resolved.folder, dtype=torch.float32).eval()

    swarm = LocalSwarm(Path(tempfile.mkdtemp(prefix="bench-swarm-")), CACHE)
    try:
        swarm.start_bootstrap()
        threads = ["--num-threads", str(args.server_threads)]
        servers = [swarm.start_server(MODEL, span, *threads, wait=False) for span in args.spans.split(",")]
        for server in servers:
            swarm.wait_ready(server)
        if args.compare == "push":
            report = compare_push(swarm, input_ids, args)
            hops = len(args.spans.split(","))
            write(report, REPO / "scripts" / "results" / f"bench_swarm_push_{hops}hops.json")
            return
        remote = AutoDistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, cache_dir=CACHE)

        def run_local(n: int) -> torch.Tensor:
            with torch.inference_mode():
                return local.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False,
                )  # fmt: skip

        def run_swarm(n: int) -> torch.Tensor:
            return remote.generate(input_ids, max_new_tokens=n, eos_token_id=[])

        same = run_local(32).tolist() == run_swarm(32).tolist()  # also warms both up
        results: dict[str, list[tuple[float, float]]] = {"local": [], "swarm": []}
        for round_index in range(args.rounds):
            for name, fn in (("local", run_local), ("swarm", run_swarm)):
                ttft, tps = measure(fn, args.new_tokens)
                results[name].append((ttft, tps))
                print(f"round {round_index + 1} {name:5s}: ttft {ttft * 1000:6.1f} ms, decode {tps:5.1f} tokens/s")
        remote.shutdown()
    finally:
        swarm.stop()

    summary = {
        name: {
            "ttft_ms_median": statistics.median(r[0] for r in rows) * 1000,
            "decode_tokens_per_s_median": statistics.median(r[1] for r in rows),
        }
        for name, rows in results.items()
    }
    ratio = summary["swarm"]["decode_tokens_per_s_median"] / summary["local"]["decode_tokens_per_s_median"]
    report = {
        "model": MODEL, "prompt_tokens": input_ids.shape[1], "new_tokens": args.new_tokens, "rounds": args.rounds,
        "server_threads": args.server_threads, "local_threads": args.local_threads, "greedy_tokens_equal": same,
        "summary": summary, "swarm_over_local_decode": ratio, "raw": results,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    print(f"swarm/local decode speed: {ratio:.2f} (target >= 0.8); greedy tokens equal: {same}")
    write(report, REPO / "artifacts" / "bench_swarm.json")


def compare_push(swarm: LocalSwarm, input_ids: torch.Tensor, args) -> dict:
    """Decode speed with server-to-server push on vs off: two clients of the same servers, alternating."""
    models = {
        name: AutoDistributedModelForCausalLM.from_pretrained(
            MODEL, swarm.initial_peers, cache_dir=CACHE, client_config=ClientConfig(swarm.initial_peers, push=push)
        )
        for name, push in (("push_off", False), ("push_on", True))
    }
    runs = {
        name: (lambda n, model=model: model.generate(input_ids, max_new_tokens=n, eos_token_id=[]))
        for name, model in models.items()
    }
    try:
        same = runs["push_off"](32).tolist() == runs["push_on"](32).tolist()  # also warms both up
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for round_index in range(args.rounds):
            order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
            for name in order:
                ttft, tps = measure(runs[name], args.new_tokens)
                results[name].append((ttft, tps))
                print(f"round {round_index + 1} {name:8s}: ttft {ttft * 1000:6.1f} ms, decode {tps:5.1f} tokens/s")
    finally:
        for model in models.values():
            model.shutdown()
    summary = {
        name: {
            "ttft_ms_median": statistics.median(r[0] for r in rows) * 1000,
            "decode_tokens_per_s_median": statistics.median(r[1] for r in rows),
        }
        for name, rows in results.items()
    }
    ratio = summary["push_on"]["decode_tokens_per_s_median"] / summary["push_off"]["decode_tokens_per_s_median"]
    print(json.dumps(summary, indent=2))
    print(f"push on / push off decode speed: {ratio:.3f}; greedy tokens equal: {same}")
    return {
        "model": MODEL, "spans": args.spans.split(","), "prompt_tokens": input_ids.shape[1],
        "new_tokens": args.new_tokens, "rounds": args.rounds, "server_threads": args.server_threads,
        "greedy_tokens_equal": same, "summary": summary, "push_on_over_push_off_decode": ratio, "raw": results,
    }  # fmt: skip


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
