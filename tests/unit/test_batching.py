"""Continuous batching on a server: packed multi-session forwards equal per-session ones, the batch planner,
the compute thread's scheduler (batches concurrent steps, chunks long prefills), and the paged cache budget."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

import pytest
import torch

from server.backend import SpanBackend
from server.batching import BatchLimits, PendingStep, plan_batch
from server.kv_cache import PageAllocator
from server.model import BlockSpan, SpanCache
from server.model import llama as llama_module
from server.model.kv_pool import KVPool
from server.model.span import SpanStep
from server.sessions import Session, SessionRegistry
from swarm.errors import ServerBusyError
from swarm.weights import ResolvedModel, resolve_model
from tests.helpers import TINY_KINDS, make_tiny_model

SESSIONS = [(1, 3), (2, 7), (1, 1), (3, 2)]  # (batch rows, prompt length) of each session


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ResolvedModel]:
    root = tmp_path_factory.mktemp("batching")
    return {kind: resolve_model(str(make_tiny_model(kind, root / kind)), root / "cache") for kind in TINY_KINDS}


def _caches(resolved: ResolvedModel, capacity: int = 32) -> list[SpanCache]:
    return [SpanCache.allocate(resolved.spec, 4, b, capacity, torch.float32) for b, _ in SESSIONS]


def _pooled_caches(resolved: ResolvedModel, rows_per_chunk: int) -> tuple[KVPool, list[SpanCache]]:
    """Caches for SESSIONS as rows of shared chunks of ``rows_per_chunk`` rows (of capacity 32)."""
    pool = KVPool(resolved.spec, torch.float32, "cpu", chunk_bytes=0)
    pool.chunk_bytes = rows_per_chunk * pool.row_bytes(4, 32)
    return pool, [pool.allocate(4, b, 32) for b, _ in SESSIONS]


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("rows_per_chunk", [7, 6])  # 7: all rows in one chunk, in order; 6: two chunks
@torch.inference_mode()
def test_packed_forward_matches_per_session_forward(
    tiny_models: dict[str, ResolvedModel], kind: str, rows_per_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    pooled_calls = []
    pooled = llama_module.attend_pooled
    monkeypatch.setattr(
        llama_module,
        "attend_pooled",
        lambda q, k, v, groups, *a: pooled_calls.append(groups) or pooled(q, k, v, groups, *a),
    )
    resolved = tiny_models[kind]
    span = BlockSpan.load(resolved, 0, 4)
    assert span.packs_sessions == (kind not in ("falcon", "falcon_mq", "falcon_seq", "bloom"))
    g = torch.Generator().manual_seed(0)
    d = resolved.spec.hidden_size
    alone = _caches(resolved)
    pool, packed = _pooled_caches(resolved, rows_per_chunk)
    assert len({id(c.chunk) for c in packed}) == (1 if rows_per_chunk == 7 else 2)
    positions = [0] * len(SESSIONS)
    lengths = [s for _, s in SESSIONS]  # prefill of different lengths, then three decode steps together
    for _ in range(4):
        xs = [torch.randn(b, s, d, generator=g) for (b, _), s in zip(SESSIONS, lengths, strict=True)]
        expected = [span(x, c, p) for x, c, p in zip(xs, alone, positions, strict=True)]
        got = span.forward_packed([SpanStep(x, c, p) for x, c, p in zip(xs, packed, positions, strict=True)])
        for e, o in zip(expected, got, strict=True):
            torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-4)
        positions = [p + s for p, s in zip(positions, lengths, strict=True)]
        lengths = [1] * len(SESSIONS)
    for a, p in zip(alone, packed, strict=True):  # every session's cache holds exactly its own tokens
        end = positions[0] + 10
        torch.testing.assert_close(p.keys[:, :, :, :end], a.keys[:, :, :, :end], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.values[:, :, :, :end], a.values[:, :, :, :end], atol=1e-5, rtol=1e-4)
    if kind == "llama":  # its decode steps ran one attention call per chunk per block (3 steps x 4 blocks)
        assert len(pooled_calls) == 12
        groups = pooled_calls[0]
        assert len(groups) == (1 if rows_per_chunk == 7 else 2)
        runs = sorted((g.row_range.start, g.row_range.stop) for g in groups if g.row_range is not None)
        assert runs == ([(0, 7)] if rows_per_chunk == 7 else [(0, 3), (0, 4)])  # each chunk's rows, read in place


def test_pool_shares_chunks_frees_them_and_keeps_big_sessions_apart(tiny_models: dict[str, ResolvedModel]) -> None:
    spec = tiny_models["llama"].spec
    pool = KVPool(spec, torch.float32, "cpu", chunk_bytes=0)
    pool.chunk_bytes = 4 * pool.row_bytes(4, 64)  # 4 rows of capacity 64
    assert pool.capacity_for(4, 1, 40) == (64, True) and pool.capacity_for(4, 1, 65) == (128, True)
    assert pool.capacity_for(4, 1, 200) == (200, False)  # 256-token rows: not two in a chunk, so exact
    assert pool.capacity_for(4, 3, 40) == (40, False)  # 3 rows: not two such sessions in a chunk
    a, b = pool.allocate(4, 2, 50), pool.allocate(4, 1, 64)
    assert a.chunk is b.chunk and (a.row, b.row, a.capacity) == (0, 2, 64)
    a.keys.fill_(1.0)
    pool.release(a)
    c = pool.allocate(4, 1, 40)  # reuses a freed row, cleaned
    assert c.chunk is b.chunk and c.row == 0 and not c.keys.any()
    d = pool.allocate(4, 2, 40)  # free rows 1 and 3 are not consecutive: a new chunk
    assert d.chunk is not b.chunk
    exact = pool.allocate(4, 1, 200)
    assert exact.chunk is None and exact.capacity == 200
    assert pool.allocated_bytes == 2 * 4 * pool.row_bytes(4, 64)  # two chunks of 4 rows
    for cache in (b, c, d, exact):
        pool.release(cache)
    assert pool.allocated_bytes == 0 and not pool.chunks


@torch.inference_mode()
def test_packed_forward_over_a_sub_range_and_single_step_path(tiny_models: dict[str, ResolvedModel]) -> None:
    resolved = tiny_models["llama"]
    span = BlockSpan.load(resolved, 0, 4)
    d = resolved.spec.hidden_size
    caches = [SpanCache.allocate(resolved.spec, 2, 1, 8, torch.float32) for _ in range(3)]
    xs = [torch.randn(1, 2, d) for _ in caches]
    got = span.forward_packed([SpanStep(x, c, 0) for x, c in zip(xs, caches, strict=True)], slice(1, 3))
    fresh = [SpanCache.allocate(resolved.spec, 2, 1, 8, torch.float32) for _ in range(3)]
    for x, c, o in zip(xs, fresh, got, strict=True):
        torch.testing.assert_close(o, span(x, c, 0, slice(1, 3)), atol=1e-5, rtol=1e-4)
    (lone,) = span.forward_packed([SpanStep(xs[0], fresh[0], 2)], slice(1, 3))
    assert lone.shape == (1, 2, d)


# --- the planner --------------------------------------------------------------------------------------------------
def _pending(rows: int, length: int, blocks: tuple[int, int] = (0, 4)) -> PendingStep:
    session = Session("s", "p", blocks[0], blocks[1], rows, 4096, cache=None)  # type: ignore[arg-type]
    return PendingStep(session, torch.zeros(rows, length, 1), 0, Future())


def test_plan_takes_every_decode_step_and_chunks_a_long_prefill() -> None:
    prefill, decodes = _pending(1, 1000), [_pending(1, 1) for _ in range(5)]
    plan = plan_batch([prefill, *decodes], BatchLimits(max_batch_tokens=300, prefill_chunk_tokens=256))
    assert [st for st, _ in plan] == [*decodes, prefill]  # decode first, though the prefill came first
    assert [take for _, take in plan] == [1] * 5 + [256]
    plan = plan_batch([prefill, *decodes], BatchLimits(max_batch_tokens=100, prefill_chunk_tokens=256))
    assert plan[-1] == (prefill, 95)  # the chunk shrinks to what the budget leaves


def test_plan_respects_the_token_budget_and_block_ranges() -> None:
    steps = [_pending(4, 1), _pending(4, 1, (0, 2)), _pending(4, 1), _pending(4, 1)]
    plan = plan_batch(steps, BatchLimits(max_batch_tokens=8))
    assert [st for st, _ in plan] == [steps[0], steps[2]]  # same range as the oldest; budget 8 rows
    huge = _pending(64, 1)
    assert plan_batch([huge], BatchLimits(max_batch_tokens=8)) == [(huge, 1)]  # still runs, never starves
    assert plan_batch([], BatchLimits()) == []


# --- the scheduler ----------------------------------------------------------------------------------------------
def _session(resolved: ResolvedModel, rows: int, name: str) -> Session:
    cache = SpanCache.allocate(resolved.spec, 4, rows, 64, torch.float32)
    return Session(name, "peer", 0, 4, rows, 64, cache)


async def test_backend_batches_concurrent_steps_and_matches_lone_steps(tiny_models) -> None:
    resolved = tiny_models["llama"]
    span = BlockSpan.load(resolved, 0, 4)
    backend = SpanBackend(span, 0, 4, torch.float32, torch.device("cpu"), BatchLimits(batch_wait_s=0.05))
    d = resolved.spec.hidden_size
    try:
        prompts = [torch.randn(b, s, d) for b, s in SESSIONS]
        together = [_session(resolved, b, f"t{i}") for i, (b, _) in enumerate(SESSIONS)]
        outs = await asyncio.gather(*(backend.inference_step(s, x, 0) for s, x in zip(together, prompts, strict=True)))
        assert backend.stats.max_sessions == len(SESSIONS) and backend.stats.max_rows == 7
        for prompt, out, (b, _) in zip(prompts, outs, SESSIONS, strict=True):
            alone = await backend.inference_step(_session(resolved, b, "alone"), prompt, 0)
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-4)
        assert [s.length for s in together] == [s for _, s in SESSIONS]
    finally:
        backend.shutdown()


def _waiting_backend(tiny_models) -> tuple[SpanBackend, Session, Session, Callable[..., Awaitable[float]]]:
    """A backend that waits up to 0.5 s for company, two one-row sessions a and b, and a timed one-token step
    (started after ``delay`` seconds)."""
    resolved = tiny_models["llama"]
    span = BlockSpan.load(resolved, 0, 4)
    backend = SpanBackend(span, 0, 4, torch.float32, torch.device("cpu"), BatchLimits(batch_wait_s=0.5))
    d = resolved.spec.hidden_size

    async def timed_step(session: Session, position: int, delay: float = 0.0) -> float:
        await asyncio.sleep(delay)
        began = asyncio.get_running_loop().time()
        await backend.inference_step(session, torch.randn(1, 1, d), position)
        return asyncio.get_running_loop().time() - began

    return backend, _session(resolved, 1, "a"), _session(resolved, 1, "b"), timed_step


async def test_batch_waits_only_for_sessions_that_are_due(tiny_models) -> None:
    backend, a, b, timed_step = _waiting_backend(tiny_models)
    try:
        assert await timed_step(a, 0) < 0.25  # a lone session never waits
        assert await timed_step(b, 0) < 0.25  # a just ran: it is on the rest of its route, not waited for
        assert await timed_step(b, 1) >= 0.5  # b just ran; a is active but silent: waited for, up to the limit
        backend.forget("a")  # a closed
        assert await timed_step(b, 2) < 0.25
    finally:
        backend.shutdown()


async def test_batch_waits_for_the_group_a_session_last_ran_with(tiny_models) -> None:
    """Sessions that ran together come back in step: the first one back waits for the rest of its group."""
    backend, a, b, timed_step = _waiting_backend(tiny_models)
    try:
        await timed_step(a, 0)
        await timed_step(b, 0)
        await asyncio.gather(timed_step(b, 1), timed_step(a, 1, delay=0.1))  # b waits for a: they run together
        assert backend.stats.max_sessions == 2
        assert await timed_step(a, 2) >= 0.5  # a is back first: it waits for b, its group, up to the limit
        backend.forget("b")
        assert await timed_step(a, 3) < 0.25
    finally:
        backend.shutdown()


async def test_long_prefill_is_chunked_and_decode_steps_overtake_it(tiny_models) -> None:
    resolved = tiny_models["llama"]
    span = BlockSpan.load(resolved, 0, 4)
    limits = BatchLimits(max_batch_tokens=64, prefill_chunk_tokens=8, batch_wait_s=0.05)
    backend = SpanBackend(span, 0, 4, torch.float32, torch.device("cpu"), limits)
    d = resolved.spec.hidden_size
    try:
        long_session, short_session = _session(resolved, 1, "long"), _session(resolved, 1, "short")
        await backend.inference_step(short_session, torch.randn(1, 2, d), 0)
        finished: list[str] = []

        async def run(name: str, session: Session, x: torch.Tensor, position: int) -> torch.Tensor:
            out = await backend.inference_step(session, x, position)
            finished.append(name)
            return out

        prompt = torch.randn(1, 40, d)
        chunked, _ = await asyncio.gather(
            run("prefill", long_session, prompt, 0), run("decode", short_session, torch.randn(1, 1, d), 2)
        )
        assert finished == ["decode", "prefill"]  # the decode step did not wait for all five chunks
        alone = span(prompt, _session(resolved, 1, "ref").cache, 0)
        torch.testing.assert_close(chunked, alone, atol=1e-5, rtol=1e-4)
        assert long_session.length == 40
    finally:
        backend.shutdown()


# --- the paged budget ----------------------------------------------------------------------------------------------
async def test_page_allocator_waits_in_order_and_times_out() -> None:
    pages = PageAllocator(total_pages=4, page_bytes=100)
    assert pages.pages_for(1) == 1 and pages.pages_for(100) == 1 and pages.pages_for(101) == 2
    await pages.acquire(3, timeout_s=0)
    with pytest.raises(ServerBusyError, match="cache is full"):
        await pages.acquire(2, timeout_s=0)
    with pytest.raises(ServerBusyError, match="waited"):
        await pages.acquire(2, timeout_s=0.05)
    big = asyncio.ensure_future(pages.acquire(3, timeout_s=5))
    await asyncio.sleep(0)
    assert pages.waiting == 1 and not pages.try_acquire(1)  # the free page is held back for the waiter ahead
    pages.release(3)
    await asyncio.wait_for(big, 1)
    assert pages.free_pages == 1 and pages.waiting == 0
    with pytest.raises(ServerBusyError):
        await pages.acquire(5, timeout_s=5)  # more than the whole cache: refused at once


async def test_registry_rounds_sessions_up_to_pages_and_frees_them(tiny_models) -> None:
    spec = tiny_models["llama"].spec
    per_token = SpanCache.bytes_per_token(spec, 4, torch.float32)
    registry = SessionRegistry(
        spec, 10 * 16 * per_token, torch.float32, torch.device("cpu"), hosted_blocks=4, page_tokens=16
    )
    assert registry.tokens_left(4) == 160
    a = await registry.open("a", "peer", 0, 4, 1, 17)  # 17 tokens -> 2 pages
    b = await registry.open("b", "peer", 0, 2, 2, 16)  # 2 rows over half the blocks = 16 full-span tokens -> 1 page
    assert (a.pages, b.pages) == (2, 1) and registry.tokens_left(4) == 7 * 16 and registry.used_bytes > 0
    with pytest.raises(ServerBusyError):
        await registry.open("c", "peer", 0, 4, 1, 8 * 16)
    registry.alloc_timeout_s = 2.0
    waiting = asyncio.ensure_future(registry.open("d", "peer", 0, 4, 1, 8 * 16))  # 8 pages, 7 free: waits
    await asyncio.sleep(0.01)
    assert not waiting.done()
    registry.close(a)  # 9 free: the waiting session gets its pages
    d = await asyncio.wait_for(waiting, 1)
    assert d.pages == 8 and registry.tokens_left(4) == 16
    registry.close(b)
    registry.close(d)
    assert registry.used_bytes == 0 and registry.tokens_left(4) == 160


async def test_a_compute_thread_that_dies_fails_its_steps_instead_of_hanging(tiny_models, monkeypatch) -> None:
    resolved = tiny_models["llama"]
    span = BlockSpan.load(resolved, 0, 4)

    def broken(self) -> None:
        raise ValueError("a scheduler bug")

    monkeypatch.setattr(SpanBackend, "_wait_for_company", broken)
    backend = SpanBackend(span, 0, 4, torch.float32, torch.device("cpu"), BatchLimits(batch_wait_s=0.5))
    d = resolved.spec.hidden_size
    with pytest.raises(RuntimeError, match="compute thread died.*a scheduler bug"):
        await asyncio.wait_for(backend.inference_step(_session(resolved, 1, "a"), torch.randn(1, 1, d), 0), 10)
    with pytest.raises(RuntimeError, match="shutting down"):  # later steps are refused at once
        await backend.inference_step(_session(resolved, 1, "b"), torch.randn(1, 1, d), 0)
    backend.shutdown()
