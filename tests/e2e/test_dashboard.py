"""Seeing the swarm: /v1/swarm, /metrics (gateway and servers), the /dashboard page in headless Chromium and
`petals-server status`, against a real loopback swarm (a tiny Llama split 0:2 / 2:4) and the real gateway.

The last test stops a server and watches the page, the JSON and the CLI report the gap: keep it last.
A screenshot of the healthy page is kept at artifacts/dashboard.png (and the degraded one beside it).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.gateway_process import GatewayProcess, running_gateway
from tests.e2e.harness import REPO, Child, LocalSwarm
from tests.helpers import MODEL_CACHE, make_tiny_model

ARTIFACTS = REPO / "artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip
PAGE_BUDGET_MS = 5000
"""Virtual time the page runs for before the DOM or screenshot is taken: the first poll plus two refreshes."""
NAMES = {"0:2": "alice", "2:4": "bob"}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("Chromium is not installed (scripts/install_chromium.sh installs it)")


def run_chromium(url: str, workdir: Path, *mode: str) -> str:
    """Load ``url`` in a fresh headless profile; returns stdout (the DOM with --dump-dom)."""
    profile = workdir / f"profile-{time.monotonic_ns()}"
    argv = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={PAGE_BUDGET_MS}",
            "--window-size=1280,900", *mode, url]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout


def wait_for(fetch: Callable[[], Any], predicate: Callable[[Any], bool], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not as expected after {timeout_s}s: {value}")
        time.sleep(0.2)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def run_status(initial_peers: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "server.cli", "status", "--initial-peers", *initial_peers, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-dash")


@pytest.fixture(scope="module")
def servers(local_swarm: LocalSwarm, tiny_model: Path) -> dict[str, Child]:
    started = {
        span: local_swarm.start_server(str(tiny_model), span, "--metrics-port", "0", "--public-name", name, wait=False)
        for span, name in NAMES.items()
    }
    for child in started.values():
        local_swarm.wait_ready(child)
    return started


@pytest.fixture(scope="module")
def gateway(local_swarm: LocalSwarm, servers, tiny_model: Path, tmp_path_factory, request) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("gateway")
    failures = lambda: request.session.testsfailed  # noqa: E731
    # monitoring stays open with keys set (open_monitoring defaults to true)
    with running_gateway(
        local_swarm, workdir, MODEL_CACHE, [str(tiny_model)], "--api-keys", "secret", failures=failures
    ) as gateway:
        yield gateway


def swarm_json(gateway: GatewayProcess) -> dict[str, Any]:
    r = httpx.get(f"{gateway.base_url}/v1/swarm", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def both_reachable(body: dict[str, Any]) -> bool:
    return len(body["servers"]) == 2 and all(s["reachable"] for s in body["servers"])


# --- tests ------------------------------------------------------------------------------------------------


def test_swarm_json_shows_servers_and_full_coverage(gateway, servers, tiny_model):
    body = wait_for(lambda: swarm_json(gateway), both_reachable, 30)
    model = next(m for m in body["models"] if m["model_id"] == tiny_model.name)
    assert model["complete"] and model["status"] == "ready" and model["served_here"]
    assert model["num_blocks"] == 4 and model["missing"] == []
    assert [b["servers"] for b in model["blocks"]] == [1, 1, 1, 1]
    assert all(b["throughput"] > 0 for b in model["blocks"])
    rows = {s["public_name"]: s for s in body["servers"]}
    assert set(rows) == {"alice", "bob"}
    for span, name in NAMES.items():
        row = rows[name]
        assert f"{row['start']}:{row['end']}" == span and row["peer_id"] == servers[span].peer_id
        assert row["state"] == "online" and row["latency_ms"] > 0 and row["active_sessions"] == 0
        assert row["cache_tokens_left"] > 0 and row["device"] == "cpu" and row["dtype"] == "float32"


def test_metrics_move_after_a_completion(gateway, servers, tiny_model):
    def server_metrics(span: str) -> dict:
        port = servers[span].info["metrics_port"]
        return metric_samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)

    def gateway_metrics() -> dict:
        return metric_samples(httpx.get(f"{gateway.base_url}/metrics", timeout=30).text)

    gw_before, srv_before = gateway_metrics(), server_metrics("2:4")
    body = {"model": tiny_model.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    r = httpx.post(
        f"{gateway.base_url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer secret"}, timeout=120
    )
    assert r.status_code == 200, r.text
    tokens = r.json()["usage"]["completion_tokens"]
    gw_after, srv_after = gateway_metrics(), server_metrics("2:4")

    chat = (
        "petals_gateway_requests_total",
        (("endpoint", "/v1/chat/completions"), ("method", "POST"), ("status", "200")),
    )
    assert gw_after[chat] == gw_before.get(chat, 0) + 1
    model = (("model", tiny_model.name),)
    assert gw_after[("petals_gateway_tokens_generated_total", model)] >= tokens > 0
    assert gw_after[("petals_gateway_time_to_first_token_seconds_count", model)] >= 1
    assert gw_after[("petals_gateway_swarm_missing_blocks", model)] == 0
    assert gw_after[("petals_gateway_swarm_servers", model)] == 2

    inference = (("kind", "inference"),)
    steps = srv_after[("petals_server_steps_total", inference)] - srv_before.get(
        ("petals_server_steps_total", inference), 0
    )
    assert steps == tokens  # one step for the prompt, one per token after it but the last
    assert srv_after[("petals_server_step_seconds_count", inference)] >= steps
    assert srv_after[("petals_server_batch_size_count", inference)] >= steps
    assert srv_after[("petals_server_cache_bytes_budget", ())] > 0
    assert srv_after[("petals_server_open_sessions", ())] == 0
    assert srv_after[("petals_server_cache_bytes_used", ())] == 0


def test_status_cli_prints_coverage_and_servers(local_swarm, servers, tiny_model):
    done = run_status(local_swarm.initial_peers, "--model", tiny_model.name)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{tiny_model.name}  [##|##]  4/4 blocks, 2 servers, ready"
    table = "\n".join(lines[2:])
    assert re.search(r"^alice\s+\.\.\.\S+\s+tiny-dash\s+0:2\s+online\s", table, re.M), table
    assert re.search(r"^bob\s+\.\.\.\S+\s+tiny-dash\s+2:4\s+online\s", table, re.M), table
    assert " ms " in table  # each server answered the latency probe


def test_dashboard_in_chromium_shows_servers_and_coverage(gateway, tiny_model, tmp_path):
    url = f"{gateway.base_url}/dashboard"
    dom = run_chromium(url, tmp_path, "--dump-dom")
    assert f'data-model="{tiny_model.name}" data-complete="true"' in dom, dom[-3000:]
    assert len(re.findall(r'class="cell" data-block="\d" data-servers="1"', dom)) == 4
    assert dom.count('data-state="online"') == 2
    assert ">alice<" in dom and ">bob<" in dom and ">ready<" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    run_chromium(url, tmp_path, f"--screenshot={ARTIFACTS / 'dashboard.png'}")
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_a_stopped_server_shows_up_as_missing_blocks(local_swarm, gateway, servers, tiny_model, tmp_path):
    bob = servers["2:4"]
    bob.signal(signal.SIGTERM)
    stopped = time.monotonic()
    body = wait_for(lambda: swarm_json(gateway), lambda b: not b["models"][0]["complete"], 15)
    seen_after = time.monotonic() - stopped
    model = body["models"][0]
    assert model["model_id"] == tiny_model.name
    assert model["missing"] == [2, 3] and model["status"] == "missing blocks 2:4"
    assert [b["servers"] for b in model["blocks"]] == [1, 1, 0, 0]
    print(f"/v1/swarm reported the gap {seen_after:.1f}s after SIGTERM")

    dom = run_chromium(f"{gateway.base_url}/dashboard", tmp_path, "--dump-dom")
    assert f'data-model="{tiny_model.name}" data-complete="false"' in dom, dom[-3000:]
    assert ">missing blocks 2:4<" in dom
    assert len(re.findall(r'data-servers="0"', dom)) == 2
    run_chromium(f"{gateway.base_url}/dashboard", tmp_path, f"--screenshot={ARTIFACTS / 'dashboard-missing.png'}")

    bob.process.wait(timeout=30)
    done = run_status(local_swarm.initial_peers)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{tiny_model.name}  [##|..]  2/4 blocks, 1 server, missing blocks 2:4" in done.stdout
