"""SessionRegistry admission limits: sessions per server and per peer, and a peer's fair share of the cache."""

import asyncio

import pytest
import torch

from server.model import SpanCache
from server.sessions import SessionLimits, SessionRegistry
from swarm.config import ModelSpec
from swarm.errors import ServerBusyError

SPEC = ModelSpec(
    model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=128, vocab_size=100,
)  # fmt: skip


def registry(pages: int, limits: SessionLimits, alloc_timeout_s: float = 0.0) -> SessionRegistry:
    per_token = SpanCache.bytes_per_token(SPEC, 4, torch.float32)
    return SessionRegistry(
        SPEC, pages * 16 * per_token, torch.float32, torch.device("cpu"), hosted_blocks=4, page_tokens=16,
        alloc_timeout_s=alloc_timeout_s, limits=limits,
    )  # fmt: skip


async def test_session_count_limits_per_peer_and_per_server():
    reg = registry(100, SessionLimits(max_sessions=3, max_sessions_per_peer=2))
    a1 = await reg.open("a1", "A", 0, 4, 1, 16)
    await reg.open("a2", "A", 0, 4, 1, 16)
    with pytest.raises(ServerBusyError, match="limit per peer is 2") as caught:
        await reg.open("a3", "A", 0, 4, 1, 16)
    assert caught.value.retryable
    await reg.open("b1", "B", 0, 4, 1, 16)
    with pytest.raises(ServerBusyError, match="3 sessions open"):
        await reg.open("c1", "C", 0, 4, 1, 16)
    reg.close(a1)
    await reg.open("c1", "C", 0, 4, 1, 16)  # a closed session makes room again
    assert reg.allocator.used_pages == 3


async def test_a_peer_over_its_share_is_refused_only_while_others_wait():
    reg = registry(4, SessionLimits(max_cache_share=0.5), alloc_timeout_s=2.0)
    a1 = await reg.open("a1", "A", 0, 4, 1, 32)  # 2 pages: A's whole share
    a2 = await reg.open("a2", "A", 0, 4, 1, 32)  # over the share, but nobody else wants pages: allowed
    waiting = asyncio.ensure_future(reg.open("b1", "B", 0, 4, 1, 16))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # B waits for pages
    with pytest.raises(ServerBusyError, match="fair share is 50%"):
        await reg.open("a3", "A", 0, 4, 1, 16)  # A may not take more while B waits
    reg.close(a2)
    b1 = await asyncio.wait_for(waiting, 1)
    assert b1.pages == 1
    a3 = await reg.open("a3", "A", 0, 4, 1, 16)  # nobody waits any more
    for session in (a1, a3, b1):
        reg.close(session)
    assert reg.allocator.used_pages == 0 and not reg._pages_by_peer and not reg._sessions_by_peer
