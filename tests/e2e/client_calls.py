"""What several e2e tests do through a real SwarmClient: greedy decoding in one session, and a server's rpc_info."""

from __future__ import annotations

from typing import Any

import torch

from swarm.client import SwarmClient
from swarm.head import ModelHead
from swarm.messages import ServerInfoResult
from swarm.probe import probe_server


async def greedy_session(
    client: SwarmClient, head: ModelHead, model_id: str, prompt: torch.Tensor, new_tokens: int, **session: Any
) -> list[list[int]]:
    """prompt [B, S] ids -> ``new_tokens`` greedy tokens per row through one inference session (``session``: more
    of its options, e.g. ``extras`` or ``adapter``)."""
    batch, length = prompt.shape
    async with client.inference_session(model_id, length + new_tokens, batch_size=batch, **session) as steps:
        with torch.inference_mode():
            hidden = head.embed(prompt)  # [B, S, D]
        tokens = []
        for _ in range(new_tokens):
            out = await steps.step(hidden)
            with torch.inference_mode():
                picked = head.logits(out, last_only=True)[:, -1].argmax(-1)  # [B]
                hidden = head.embed(picked.view(batch, 1))
            tokens.append(picked.tolist())
    return [list(row) for row in zip(*tokens, strict=True)]


async def server_info(client: SwarmClient, peer_id: str) -> ServerInfoResult:
    """The server's own counters (``rpc_info``); fails the test when it does not answer."""
    probe = await probe_server(client.p2p, peer_id, timeout_s=10)
    assert probe.info is not None, f"peer {peer_id} did not answer rpc_info: {probe.error}"
    return probe.info
