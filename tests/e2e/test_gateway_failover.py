"""A greedy stream through the real gateway survives the server on its route being killed mid-stream: the
stream completes, and its text equals an undisturbed run's."""

from __future__ import annotations

import signal
import time

import pytest
from openai import OpenAI

from tests.e2e.gateway_process import running_gateway
from tests.helpers import MODEL_CACHE, make_tiny_model

MODEL_ID = "tiny-gw-failover"
MESSAGES = [{"role": "user", "content": "Tell me everything"}]
REQUEST = dict(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=160, logit_bias={"2": -100})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / MODEL_ID)


@pytest.fixture(scope="module")
def sdk(local_swarm, folder, tmp_path_factory, request):
    # Two servers that stay up cover the model in two hops; each test adds a one-hop server, which routing prefers.
    servers = [local_swarm.start_server(str(folder), span, wait=False) for span in ("0:2", "2:4")]
    failures = lambda: request.session.testsfailed  # noqa: E731
    workdir = tmp_path_factory.mktemp("gateway")
    with running_gateway(local_swarm, workdir, MODEL_CACHE, [str(folder)], servers=servers, failures=failures) as gw:
        yield OpenAI(base_url=f"{gw.base_url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_stream_survives_a_dying_server(local_swarm, folder, sdk, sig):
    expected = sdk.chat.completions.create(**REQUEST).choices[0].message.content
    victim = local_swarm.start_server(str(folder), "0:4")
    # The gateway's client re-reads the swarm in the background once its view is older than 2 s: let it see
    # the newcomer before the stream starts.
    time.sleep(2.5)
    sdk.chat.completions.create(**{**REQUEST, "max_tokens": 1})
    time.sleep(1.0)
    pieces, finish = [], None
    for i, chunk in enumerate(sdk.chat.completions.create(**REQUEST, stream=True)):
        if i == 3:
            victim.signal(sig)
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    assert "".join(pieces) == expected
    victim.process.wait(timeout=30)
    assert "session" in victim.log()  # the victim really served the stream before it went away
