"""Paged KV layout vs contiguous, on CPU: one decode step's attention for one block and one session, with keys
and values read from a contiguous cache slice vs gathered from a page pool through a page table first.

    .venv/bin/python scripts/bench_kv_pages.py [--page-tokens 16] [--threads 1]

SmolLM2-135M shapes (9 query heads, 3 kv heads, head_dim 64). Prints microseconds per call; what
``server/kv_cache.py`` chose (contiguous tensors, paged accounting) rests on these numbers.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

H, H_KV, DH = 9, 3, 64


def timed(fn, reps: int = 300) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - began) / reps * 1e6


def contiguous(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, length: int) -> torch.Tensor:
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]  # views: nothing is copied
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def paged(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # pool: [P, H_kv, p, Dh]; the gather copies every cached key and value of the session once per step
    n, p = table.shape[0], pool_k.shape[2]
    k = pool_k.index_select(0, table).transpose(0, 1).reshape(1, H_KV, n * p, DH)  # [1, H_kv, T, Dh]
    v = pool_v.index_select(0, table).transpose(0, 1).reshape(1, H_KV, n * p, DH)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = args.page_tokens
    print(f"page {p} tokens, {args.threads} thread(s); microseconds per attention call (one block, one session)")
    for length in (128, 512, 2048):
        q = torch.randn(1, H, 1, DH)
        cache_k, cache_v = torch.randn(1, H_KV, 4096, DH), torch.randn(1, H_KV, 4096, DH)
        pool_k, pool_v = torch.randn(4096 // p * 4, H_KV, p, DH), torch.randn(4096 // p * 4, H_KV, p, DH)
        table = torch.randperm(pool_k.shape[0])[: length // p]  # this session's pages, scattered in the pool
        c = timed(lambda: contiguous(q, cache_k, cache_v, length))  # noqa: B023 (called within this iteration)
        g = timed(lambda: paged(q, pool_k, pool_v, table))  # noqa: B023
        print(f"  length {length:5d}: contiguous {c:7.1f} us, paged gather+attend {g:7.1f} us (x{g / c:.2f})")


if __name__ == "__main__":
    main()
