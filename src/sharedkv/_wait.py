"""Waiting for a feed, from a thread or from an event loop, without polling.

The pattern everywhere is: read the feed's generation, try the operation, and if it could not
proceed, sleep until the generation moves (a wake-up arrived) or time runs out. Reading the
generation *before* trying closes the race with a wake-up that lands in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Generator
from typing import TypeVar

from ._backends.base import Feed

T = TypeVar("T")

#: the timeout of every blocking call that is not given one, in seconds
DEFAULT_TIMEOUT = 30.0


def resolve_timeout(timeout: float | None, default: float = DEFAULT_TIMEOUT) -> float:
    """``None`` means the default; anything else must be a non-negative number (inf allowed)."""
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__qualname__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0, not {timeout!r}")
    return float(timeout)


def _plan(
    attempt: Callable[[], T | None], feed: Feed, timeout: float, recheck: float | None
) -> Generator[tuple[int, float], None, T | None]:
    """The logic of every wait, shared by the thread and event-loop versions below.

    Calls ``attempt`` until it returns non-None (the result) or time runs out (None); yields
    ``(generation, seconds)`` whenever the caller must sleep on ``feed``. ``recheck`` bounds
    each sleep, for conditions that can change without a wake-up (a lock holder that dies
    without releasing is noticed by the next attempt).
    """
    deadline = time.monotonic() + timeout
    armed = False
    try:
        while True:
            generation = feed.generation
            result = attempt()
            if result is not None:
                return result
            if not armed:
                # Register as a waiter, then try once more: a change made before the
                # registration was visible to that attempt, any later one wakes us.
                feed.arm()
                armed = True
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or feed.closed:
                return None
            yield generation, remaining if recheck is None else min(remaining, recheck)
    finally:
        if armed:
            feed.disarm()


def retry_until(
    attempt: Callable[[], T | None], feed: Feed, timeout: float, recheck: float | None = None
) -> T | None:
    """Call ``attempt`` until it returns non-None, sleeping on ``feed`` in between."""
    plan = _plan(attempt, feed, timeout, recheck)
    try:
        while True:
            feed.wait(*next(plan))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def retry_until_async(
    attempt: Callable[[], T | None], feed: Feed, timeout: float, recheck: float | None = None
) -> T | None:
    """:func:`retry_until` for coroutines: sleeps on the event loop, blocking no thread."""
    plan = _plan(attempt, feed, timeout, recheck)
    try:
        while True:
            await wait_async(feed, *next(plan))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def wait_async(feed: Feed, generation: int, timeout: float) -> bool:
    """The event-loop twin of :meth:`Feed.wait`: no thread is blocked while waiting."""
    if feed.generation != generation or feed.closed:
        return True
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            loop.call_soon_threadsafe(woken.set)

    remove = feed.add_wakeup(wake)
    try:
        if feed.generation != generation:
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(woken.wait(), None if math.isinf(timeout) else timeout)
        return woken.is_set()
    finally:
        remove()
