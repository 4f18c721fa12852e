"""CombiningHead: concurrent last-token logits calls from worker threads run as one head call, each caller
gets exactly its own rows, and a lone caller computes at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gateway.generation.combining_head import CombiningHead


class SlowHead:
    """logits = hidden @ W, slow enough that concurrent callers pile up behind the first."""

    def __init__(self) -> None:
        self.weight = torch.randn(4, 10)
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, 4)

    def logits(self, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        self.calls.append(hidden.shape[0])
        self.entered.set()
        self.release.wait(5)
        return (hidden[:, -1:] if last_only else hidden) @ self.weight


def test_concurrent_calls_are_combined_and_split_back() -> None:
    slow = SlowHead()
    head = CombiningHead(slow)
    inputs = [torch.randn(b, 3, 4) for b in (1, 2, 1, 3)]
    with ThreadPoolExecutor(len(inputs)) as pool:
        first = pool.submit(head.logits, inputs[0], True)
        assert slow.entered.wait(5)  # the first call holds the head; the others queue behind it
        rest = [pool.submit(head.logits, x, True) for x in inputs[1:]]
        while len(head._queue) < len(rest):
            threading.Event().wait(0.01)
        slow.release.set()
        outs = [first.result(5)] + [f.result(5) for f in rest]
    assert slow.calls == [1, 6]  # a lone call, then all the queued ones as one matmul
    for x, out in zip(inputs, outs, strict=True):
        torch.testing.assert_close(out, x[:, -1:] @ slow.weight)


def test_errors_reach_every_caller_of_the_batch_and_full_logits_pass_through() -> None:
    slow = SlowHead()
    slow.release.set()
    head = CombiningHead(slow)
    assert head.logits(torch.randn(2, 3, 4)).shape == (2, 3, 10)  # not last_only: a plain call
    slow.logits = lambda hidden, last_only=False: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        head.logits(torch.randn(1, 1, 4), last_only=True)
    assert not head._busy and head._queue == []
