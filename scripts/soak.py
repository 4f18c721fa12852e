"""Soak test (not part of CI): mixed traffic through the real gateway while servers restart and clients hang up.

    .venv/bin/python scripts/soak.py [--minutes 5] [--concurrency 6] [--restart-every-s 30]

A loopback swarm serves SmolLM2 with redundant coverage (servers 0:15, 15:30 and 0:30); the gateway runs in front.
Workers send a mix of streamed and plain chat requests (some with stop strings, n=2 or JSON mode) and some hang up
mid-stream on purpose. Every ``--restart-every-s`` one server, chosen at random, is killed (SIGKILL or SIGTERM) and
started again. At the end: requests served, errors by status/code, and requests that were lost (no answer and no
error) or hung (past the per-request deadline). Saves artifacts/soak.json. Bounded in time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import openai
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.gateway_process import GatewayProcess  # noqa: E402
from tests.e2e.harness import LocalSwarm  # noqa: E402
from tests.helpers import MODEL_CACHE as CACHE  # noqa: E402

MODEL = "smollm2-135m-instruct"
SPANS = ("0:15", "15:30", "0:30")
PROMPTS = ["What is the capital of France?", "Name three fruits.", "Write a haiku about rain.", "Count to ten."]


def random_request(rng: random.Random) -> dict:
    request = dict(
        model=MODEL, messages=[{"role": "user", "content": rng.choice(PROMPTS)}], max_tokens=rng.randint(4, 48)
    )
    kind = rng.choice(["plain", "plain", "sampled", "stop", "n2", "json"])
    if kind == "sampled":
        request.update(temperature=0.8, seed=rng.randrange(1000))
    elif kind == "stop":
        request.update(stop=[" the", "."])
    elif kind == "n2":
        request.update(n=2, temperature=0.7)
    elif kind == "json":
        request.update(response_format={"type": "json_object"})
    return request


async def worker(client: AsyncOpenAI, rng: random.Random, until: float, deadline_s: float, stats: dict) -> None:
    while time.monotonic() < until:
        request = random_request(rng)
        stream = rng.random() < 0.6
        hang_up = stream and rng.random() < 0.15
        began = time.monotonic()
        try:
            async with asyncio.timeout(deadline_s):
                if stream:
                    chunks = 0
                    async for _ in await client.chat.completions.create(**request, stream=True):
                        chunks += 1
                        if hang_up and chunks == 3:
                            break
                    stats["outcomes"]["hung up on purpose" if hang_up else "served (stream)"] += 1
                else:
                    answer = await client.chat.completions.create(**request)
                    ok = answer.choices and answer.choices[0].finish_reason in ("stop", "length")
                    stats["outcomes"]["served" if ok else "lost (no finish reason)"] += 1
        except TimeoutError:
            stats["outcomes"]["hung (past deadline)"] += 1
        except openai.APIStatusError as e:
            code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
            stats["outcomes"][f"error {e.status_code} {code}"] += 1
        except openai.APIConnectionError:
            stats["outcomes"]["connection error"] += 1
        stats["latency_s"].append(time.monotonic() - began)


async def chaos(swarm: LocalSwarm, servers: dict, rng: random.Random, until: float, every_s: float, log: list) -> None:
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        span = rng.choice(list(servers))
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        servers[span].signal(sig)
        await asyncio.to_thread(servers[span].process.wait, 30)
        servers[span] = await asyncio.to_thread(swarm.start_server, MODEL, span)
        log.append({"t": round(time.monotonic(), 1), "span": span, "signal": sig.name})


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    swarm = LocalSwarm(Path(tempfile.mkdtemp(prefix="soak-")), CACHE)
    gateway = None
    try:
        swarm.start_bootstrap()
        servers = {span: swarm.start_server(MODEL, span, wait=False) for span in SPANS}
        for child in servers.values():
            swarm.wait_ready(child)
        gateway = GatewayProcess.start(Path(tempfile.mkdtemp(prefix="soak-gw-")), swarm.initial_peers, CACHE, [MODEL])
        gateway.wait_ready()
        client = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=args.deadline_s)
        until = time.monotonic() + args.minutes * 60
        stats = {"outcomes": collections.Counter(), "latency_s": []}
        restarts: list = []
        workers = [
            worker(client, random.Random(rng.random()), until, args.deadline_s, stats) for _ in range(args.concurrency)
        ]
        await asyncio.gather(chaos(swarm, servers, rng, until, args.restart_every_s, restarts), *workers)
        latencies = sorted(stats["latency_s"])
        return {
            "minutes": args.minutes, "concurrency": args.concurrency, "requests": len(latencies),
            "outcomes": dict(stats["outcomes"]), "restarts": restarts, "gateway_alive": gateway.alive(),
            "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
            "latency_p99_s": latencies[int(len(latencies) * 0.99)] if latencies else None,
        }  # fmt: skip
    finally:
        if gateway is not None:
            gateway.stop()
        swarm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--restart-every-s", type=float, default=30.0)
    parser.add_argument("--deadline-s", type=float, default=120.0, help="a request past this counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    report = asyncio.run(run(parser.parse_args()))
    print(json.dumps(report, indent=2))
    out = REPO / "artifacts" / "soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
