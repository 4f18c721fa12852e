"""Pushed inputs waiting for the inference steps they belong to: matching by session and step, exactly once.

A session's stream registers a mailbox under (client peer, session id, first block). A push is delivered into it
by the step's session-wide ``seq``; the stream takes it when it reaches that step. A push may arrive before the
stream has read the step's header, so a few early ones are kept (bounded). Each ``seq`` is used once: a later
copy (a slow push after the client filled the step, or the reverse) is dropped, and older leftovers are dropped
as soon as a newer step is taken.

Who may push: in a private swarm, any peer proving the secret; in any swarm, only a peer that knows the session
id, a random 128-bit value that the client shares with the servers of its route alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from swarm.errors import BadRequestError, SessionError

MailboxKey = tuple[str, str, int]
"""(peer id of the session's client, session id, first block of the span)."""


@dataclass
class Pushed:
    position: int
    hidden: torch.Tensor  # [B, S, D]
    sender: str


@dataclass
class Mailbox:
    key: MailboxKey
    batch_size: int
    max_early: int
    taken: int = 0
    """Highest ``seq`` taken so far; pushes at or below it are duplicates."""
    early: dict[int, Pushed] = field(default_factory=dict)
    waiting: dict[int, asyncio.Future[Pushed]] = field(default_factory=dict)

    def deliver(self, seq: int, pushed: Pushed) -> bool:
        """Hand over the input of step ``seq``; False if that step already has its input (a duplicate)."""
        if seq <= self.taken or seq in self.early:
            return False
        waiter = self.waiting.pop(seq, None)
        if waiter is not None and not waiter.done():
            self._take(seq)
            waiter.set_result(pushed)
            return True
        if len(self.early) >= self.max_early:
            raise BadRequestError(f"session already has {self.max_early} pushed inputs waiting for their steps")
        self.early[seq] = pushed
        return True

    def receive(self, seq: int) -> asyncio.Future[Pushed]:
        """The input of step ``seq``, now or once it is pushed. Cancel the future with ``give_up`` if not needed."""
        future: asyncio.Future[Pushed] = asyncio.get_running_loop().create_future()
        pushed = self.early.pop(seq, None)
        if pushed is not None:
            self._take(seq)
            future.set_result(pushed)
        elif seq <= self.taken:
            future.set_exception(SessionError(f"the input of step {seq} was already used"))
        else:
            self.waiting[seq] = future
        return future

    def give_up(self, seq: int) -> None:
        """The step got its input another way (the client filled it): later pushes for it are duplicates."""
        waiter = self.waiting.pop(seq, None)
        if waiter is not None:
            waiter.cancel()
        self.early.pop(seq, None)
        self._take(seq)

    def _take(self, seq: int) -> None:
        self.taken = max(self.taken, seq)
        for stale in [s for s in self.early if s <= self.taken]:
            del self.early[stale]


class PushInbox:
    """The mailboxes of all open sessions of one server."""

    def __init__(self, max_early: int = 4):
        self.max_early = max_early
        self._boxes: dict[MailboxKey, Mailbox] = {}

    def open(self, key: MailboxKey, batch_size: int) -> Mailbox:
        # A second stream under the same key (a client retrying) takes over; the first one's pushes end with it.
        box = Mailbox(key, batch_size, self.max_early)
        self._boxes[key] = box
        return box

    def close(self, box: Mailbox) -> None:
        if self._boxes.get(box.key) is box:
            del self._boxes[box.key]
        for waiter in box.waiting.values():
            waiter.cancel()
        box.waiting.clear()
        box.early.clear()

    def mailbox(self, key: MailboxKey) -> Mailbox:
        box = self._boxes.get(key)
        if box is None:
            raise SessionError(f"no open session {key[1][:8]} of peer {key[0]} for blocks from {key[2]} here")
        return box

    def __len__(self) -> int:
        return len(self._boxes)
