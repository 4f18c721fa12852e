"""EmbeddedSwarm with a stand-in server CLI: ready files, fail-fast on a dead child, teardown."""

from __future__ import annotations

import sys
import textwrap

import pytest

from gateway.embedded import EmbeddedSwarm, EmbeddedSwarmError
from tests.gateway.fakes import NUM_BLOCKS

FAKE_CLI = textwrap.dedent(
    """
    import json, os, sys, time
    args = sys.argv[1:]
    ready = args[args.index("--ready-file") + 1]
    if args[0] == "run" and os.environ.get("FAKE_SERVER_DIES"):
        print("boom: cannot load blocks", flush=True)
        sys.exit(3)
    tmp = ready + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"initial_peers": ["/ip4/127.0.0.1/tcp/4242/p2p/QmFake"]}, f)
    os.rename(tmp, ready)
    time.sleep(60)
    """
)


@pytest.fixture
def fake_cli(tmp_path):
    path = tmp_path / "fake_cli.py"
    path.write_text(FAKE_CLI)
    return [sys.executable, str(path)]


async def test_start_and_stop(settings, loaded_model, fake_cli):
    swarm = EmbeddedSwarm(settings.model_copy(update={"startup_timeout_s": 30}), [loaded_model], fake_cli)
    peers = await swarm.start()
    assert peers == ["/ip4/127.0.0.1/tcp/4242/p2p/QmFake"]
    children = list(swarm._children)
    assert len(children) == 1 + min(settings.embedded_servers, NUM_BLOCKS)
    args = children[1].process.args
    assert args[args.index("--block-indices") + 1] == "0:2"
    await swarm.stop()
    assert all(c.process.poll() is not None for c in children)


async def test_dead_child_fails_fast_with_its_log(settings, loaded_model, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_SERVER_DIES", "1")
    swarm = EmbeddedSwarm(settings.model_copy(update={"startup_timeout_s": 30}), [loaded_model], fake_cli)
    with pytest.raises(EmbeddedSwarmError, match="boom: cannot load blocks"):
        await swarm.start()
    assert swarm._children == []
