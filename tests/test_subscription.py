"""QueueSubscription, the live feed transports hand to consumers."""

from __future__ import annotations

import asyncio

from resumable_stream._constants import DEFAULT_SUBSCRIPTION_BUFFER
from resumable_stream.transports import Entry, QueueSubscription


async def test_a_short_wait_after_a_long_one_is_not_stretched() -> None:
    subscription = QueueSubscription(lambda sub: None)
    subscription.push([Entry(1, 1, b"[]")])
    assert len(await subscription.get(10.0)) == 1  # arms nothing: an entry was there
    waiting = asyncio.create_task(subscription.get(10.0))
    await asyncio.sleep(0)  # one loop turn: the task runs to its first await
    assert subscription._waiter is not None
    subscription.push([Entry(1, 2, b"[]")])
    assert len(await waiting) == 1  # its 10 s timer stays armed
    # Regression: the short wait used to wait out the 10 s timer still armed; wait_for
    # fails it long before that (no tight wall-clock threshold: 5 s against 10 s).
    assert await asyncio.wait_for(subscription.get(0.05), timeout=5) == []


async def test_close_wakes_a_waiting_get() -> None:
    subscription = QueueSubscription(lambda sub: None)
    waiting = asyncio.create_task(subscription.get(10.0))
    await asyncio.sleep(0)  # one loop turn: the task runs to its first await
    assert subscription._waiter is not None
    subscription.close()
    assert await asyncio.wait_for(waiting, timeout=1) == []


async def test_a_wake_behind_buffered_entries_is_not_lost() -> None:
    # Regression: the transport wakes readers (push([])) to make them look at the stream,
    # e.g. once it was deleted; a reader with entries still buffered took them, then
    # waited out its whole max_wait (half the lease) before looking.
    subscription = QueueSubscription(lambda sub: None)
    subscription.push([Entry(1, 1, b"[]")])
    subscription.push([])
    assert len(await subscription.get(3600)) == 1
    # (5 s bounds a hang against the hour it used to wait; no readiness is timed.)
    assert await asyncio.wait_for(subscription.get(3600), timeout=5) == []
    subscription.push([Entry(1, 2, b"[]")])
    assert len(await subscription.get(3600)) == 1  # answered once, not again


async def test_an_empty_get_tells_a_wake_up_from_a_timeout() -> None:
    # The consumer reads the stream afresh after a wake-up, and makes the shared
    # quiet-stream check after a timeout; near the end of a wait, or on a late loop, the
    # time taken could not tell them apart.
    subscription = QueueSubscription(lambda sub: None)
    assert await subscription.get(0.01) == []
    assert subscription.woke is False
    waiting = asyncio.create_task(subscription.get(3600))
    await asyncio.sleep(0)  # one loop turn: the task runs to its first await
    subscription.push([])
    assert await asyncio.wait_for(waiting, timeout=5) == []
    assert subscription.woke is True
    subscription.push([])  # before the wait: answered at once
    assert await subscription.get(3600) == []
    assert subscription.woke is True


async def test_entries_beyond_the_buffer_drop_the_oldest() -> None:
    subscription = QueueSubscription(lambda sub: None)
    limit = DEFAULT_SUBSCRIPTION_BUFFER
    subscription.push([Entry(1, seq, b"[]") for seq in range(1, limit)])
    subscription.push([Entry(1, seq, b"[]") for seq in range(limit, limit + 3)])
    entries = await subscription.get(3600)
    # The newest ones (the consumer refills the gap from storage).
    assert [e.seq for e in entries] == list(range(3, limit + 3))


async def test_a_get_hands_over_what_later_pushes_leave_alone() -> None:
    # get() returns the buffer itself and starts a new one (no copy per live entry).
    subscription = QueueSubscription(lambda sub: None)
    pushed = [Entry(1, 1, b"[]")]
    subscription.push(pushed)
    entries = await subscription.get(3600)
    subscription.push([Entry(1, 2, b"[]")])
    assert [e.seq for e in entries] == [1]
    assert [e.seq for e in pushed] == [1]  # the caller's list is not the buffer
    assert [e.seq for e in await subscription.get(3600)] == [2]
