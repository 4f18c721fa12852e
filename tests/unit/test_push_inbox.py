"""PushInbox: pushed inputs meet their steps exactly once, early pushes are bounded, stale ones are dropped."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.push_inbox import Pushed, PushInbox
from swarm.errors import BadRequestError, SessionError

KEY = ("client-peer", "session", 2)


def pushed(position: int = 0) -> Pushed:
    return Pushed(position, torch.randn(1, 1, 8), "previous-server")


async def test_push_after_the_step_waits_wakes_it():
    box = PushInbox().open(KEY, batch_size=1)
    future = box.receive(1)
    assert not future.done()
    item = pushed()
    assert box.deliver(1, item)
    assert (await future) is item
    assert not box.deliver(1, pushed()), "a second copy of step 1's input is a duplicate"


async def test_early_push_is_kept_until_its_step_comes():
    box = PushInbox().open(KEY, batch_size=1)
    item = pushed(position=4)
    assert box.deliver(3, item)
    assert (await box.receive(3)) is item
    with pytest.raises(SessionError):
        await box.receive(3)


async def test_filled_step_drops_later_pushes_and_older_leftovers():
    box = PushInbox().open(KEY, batch_size=1)
    assert box.deliver(1, pushed())  # never taken: its step was filled by the client
    future = box.receive(2)
    box.give_up(2)
    assert future.cancelled()
    assert not box.deliver(2, pushed()), "the client filled step 2; the slow push is dropped"
    assert not box.deliver(1, pushed())
    assert box.early == {} and box.waiting == {}


async def test_early_pushes_are_bounded():
    box = PushInbox(max_early=2).open(KEY, batch_size=1)
    box.deliver(1, pushed())
    box.deliver(2, pushed())
    with pytest.raises(BadRequestError):
        box.deliver(3, pushed())


async def test_unknown_and_closed_sessions_are_refused():
    inbox = PushInbox()
    with pytest.raises(SessionError):
        inbox.mailbox(KEY)
    box = inbox.open(KEY, batch_size=1)
    assert inbox.mailbox(KEY) is box
    future = box.receive(1)
    inbox.close(box)
    assert future.cancelled() and len(inbox) == 0
    with pytest.raises(SessionError):
        inbox.mailbox(KEY)


async def test_a_newer_stream_under_the_same_key_keeps_its_mailbox():
    inbox = PushInbox()
    old = inbox.open(KEY, batch_size=1)
    new = inbox.open(KEY, batch_size=1)
    inbox.close(old)
    assert inbox.mailbox(KEY) is new
    await asyncio.sleep(0)
