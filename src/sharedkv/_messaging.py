"""Subscriptions, watches and message callbacks: the user-facing side of a backend's feeds.

Delivery runs in the subscribing process. A :class:`Subscription` or :class:`Watch` is read by
iterating it (sync or ``async for``) or with ``get(timeout=...)``. Callbacks registered with
``Store.on_message`` run, when synchronous, on a thread named ``sharedkv-callbacks``, and when
``async``, as tasks on the event loop that registered them. The callback thread is the
backend's own where it has one (the shared-memory backend receives the callbacks' wake-ups on
it, so a message reaches its callback with a single thread wake-up), else one per store handle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._backends.base import Change, Feed, Gap, Message
from ._errors import ClosedError, SerializationError, TimeoutError
from ._wait import resolve_timeout, retry_until_async, wait_async

if TYPE_CHECKING:
    from ._codec import Codec

__all__ = ["CallbackRunner", "Subscription", "Watch"]

log = logging.getLogger("sharedkv")

E = TypeVar("E")


class _Stream(Generic[E]):
    """Events from a backend feed, decoded, in order, readable from threads and event loops."""

    def __init__(self, feed: Feed, codec: Codec) -> None:
        self._feed = feed
        self._codec = codec
        # Raw events, decoded one by one as they are handed out: a value that cannot be decoded
        # fails its own get() and not the rest of its batch.
        self._pending: collections.deque[Any] = collections.deque()
        self._read_lock = threading.Lock()
        self.received = 0  # events handed out
        self.dropped = 0  # messages lost to a full buffer (reported as Gap events)

    def _decode(self, raw: Any) -> E:
        raise NotImplementedError

    def _fill(self) -> bool:
        with self._read_lock:
            if not self._pending:
                self._fetch()
            return bool(self._pending)

    def _fetch(self) -> None:
        """Append what the feed has now to the pending events; the caller holds _read_lock."""
        for raw in self._feed.fetch():
            if isinstance(raw, Gap):
                self.dropped += raw.count
                self._note_gap(raw)
            self._pending.append(raw)

    def take_all(self) -> list[E]:
        """Every event available now, decoded, in order, with one read of the feed. An event
        that cannot be decoded is logged and left out (for callbacks, which have no caller to
        raise to)."""
        events: list[E] = []
        if self._feed.closed:
            return events
        with self._read_lock:
            self._fetch()
            while self._pending:
                try:
                    events.append(self._pop())
                except SerializationError:
                    log.exception("sharedkv: a message could not be decoded; it was skipped")
        return events

    def _note_gap(self, gap: Gap) -> None:
        pass

    def _pop(self) -> E:
        return self.hand_out(self._pending.popleft())

    def hand_out(self, raw: Any) -> E:
        """One raw event, decoded and counted as handed out (also for one that its feed gave
        straight to a callback, without a fetch)."""
        self.received += 1
        if isinstance(raw, Gap):
            return raw  # type: ignore[return-value]  # E always includes Gap
        return self._decode(raw)

    @property
    def closed(self) -> bool:
        return self._feed.closed

    def get_nowait(self) -> E | None:
        """The next event, or ``None`` when none is waiting."""
        if self._fill():
            return self._pop()
        if self._feed.closed:
            raise ClosedError("this subscription is closed")
        return None

    def get(self, timeout: float | None = None) -> E:
        """The next event; raises :class:`~sharedkv.TimeoutError` after ``timeout`` seconds
        (default 30), :class:`~sharedkv.ClosedError` once closed."""
        limit = resolve_timeout(timeout)
        # retry_until's loop, unrolled: this is the path of every message a thread waits for,
        # and a feed of events needs no arming.
        feed = self._feed
        deadline = time.monotonic() + limit
        while True:
            generation = feed.generation
            event = self.get_nowait()
            if event is not None:
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"nothing arrived within {limit} s")
            feed.wait(generation, remaining)

    async def get_async(self, timeout: float | None = None) -> E:
        """``get`` for coroutines: waits on the event loop, never blocking a thread."""
        limit = resolve_timeout(timeout)
        event = await retry_until_async(self.get_nowait, self._feed, limit)
        if event is None:
            raise TimeoutError(f"nothing arrived within {limit} s")
        return event

    def __iter__(self) -> Iterator[E]:
        """Every event until the subscription (or its store) is closed."""
        while True:
            generation = self._feed.generation
            try:
                event = self.get_nowait()
            except ClosedError:
                return
            if event is not None:
                yield event
            else:
                self._feed.wait(generation, 3600.0)

    def __aiter__(self) -> AsyncIterator[E]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[E]:
        while True:
            generation = self._feed.generation
            try:
                event = self.get_nowait()
            except ClosedError:
                return
            if event is not None:
                yield event
            else:
                await wait_async(self._feed, generation, 3600.0)

    def close(self) -> None:
        """Stop receiving; idempotent. Iterators end, ``get`` raises ClosedError."""
        self._feed.close()

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self: Any) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Subscription(_Stream["Message | Gap"]):
    """Messages published to channels matching this subscription's patterns.

    Yields :class:`~sharedkv.Message` objects, and a :class:`~sharedkv.Gap` where messages were
    lost because this subscriber fell behind its bounded buffer (``dropped`` counts them).
    """

    def __init__(
        self, feed: Feed, codec: Codec, patterns: tuple[str, ...], on_gap: Callable[[int], None]
    ) -> None:
        super().__init__(feed, codec)
        self.patterns = patterns
        self._on_gap = on_gap

    def _decode(self, raw: Any) -> Message | Gap:
        channel, payload, seq, pattern = raw
        return Message(channel, self._codec.decode(payload), seq, pattern)

    def _note_gap(self, gap: Gap) -> None:
        with contextlib.suppress(Exception):
            self._on_gap(gap.count)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Subscription {list(self.patterns)} {state} received={self.received}>"


class Watch(_Stream["Change | Gap"]):
    """Changes (set, delete, expire) to keys matching a pattern, in revision order."""

    def __init__(self, feed: Feed, codec: Codec, pattern: str) -> None:
        super().__init__(feed, codec)
        self.pattern = pattern

    def _decode(self, raw: Any) -> Change:
        kind, key, revision, payload = raw
        value = None if payload is None else self._codec.decode(payload)
        return Change(kind, key, revision, value)

    def __repr__(self) -> str:
        return f"<Watch {self.pattern!r} {'closed' if self.closed else 'open'}>"


Callback = Callable[[Any], Any]


def is_async_callable(func: Callback) -> bool:
    """Whether calling ``func`` makes a coroutine (an ``async def`` function or callable)."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - async callable objects
    )


class _Handler:
    """One registered callback: its subscription, and where it runs."""

    def __init__(self, subscription: Subscription, func: Callback, transform: Callback) -> None:
        self.subscription = subscription
        self.func = func
        self.transform = transform  # what the callback receives: the Message, or only its data
        self.is_async = is_async_callable(func)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._remove: Callable[[], None] | None = None

    def events(self) -> list[Message]:
        return [event for event in self.subscription.take_all() if isinstance(event, Message)]

    def deliver(self, raw: Any) -> None:
        """Run the sync callback with one raw message that its feed handed over directly
        (see ``Feed.deliver_to``), on the thread that received it."""
        try:
            message = self.subscription.hand_out(raw)
        except SerializationError:
            log.exception("sharedkv: a message could not be decoded; it was skipped")
            return
        self._call(message)

    # -- async callbacks ----------------------------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

        def wake() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._schedule)

        self._remove = self.subscription._feed.add_wakeup(wake)
        loop.call_soon(self._schedule)

    def unbind(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        self.loop = None

    def _schedule(self) -> None:
        if not self._draining and self.loop is not None:
            self._draining = True
            self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while True:
                events = self.events()
                if not events:
                    return
                for message in events:
                    try:
                        await self.func(self.transform(message))
                    except Exception:
                        log.exception("sharedkv: message callback %r failed", self.func)
        finally:
            self._draining = False

    # -- sync callbacks -----------------------------------------------------------------------
    def run_sync(self) -> None:
        for message in self.events():
            self._call(message)

    def _call(self, message: Message | Gap) -> None:
        """Run the sync callback; its failure is logged and stops nothing."""
        try:
            self.func(self.transform(message))
        except Exception:
            log.exception("sharedkv: message callback %r failed", self.func)


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class CallbackRunner:
    """Runs message callbacks: sync ones on a ``sharedkv-callbacks`` thread, async ones on
    their event loop. One per store handle. Sync callbacks run on the backend's callback thread
    when their feed has one, else on a thread of this runner, started on first use."""

    def __init__(self) -> None:
        self._handlers: list[_Handler] = []
        self._waiting: queue.SimpleQueue[_Handler | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unbound: list[_Handler] = []  # async callbacks waiting for start_receive_loop()
        self._serving: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._stopped = False
        self._pid = os.getpid()

    def add(self, subscription: Subscription, func: Callback, transform: Callback) -> None:
        if self._pid != os.getpid():
            self._forget_parent()
        handler = _Handler(subscription, func, transform)
        with self._lock:
            self._handlers.append(handler)
        if handler.is_async:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                with self._lock:
                    self._unbound.append(handler)
                return
            handler.bind(loop)
            return
        feed = subscription._feed
        if feed.wakes_on_callback_thread:
            feed.add_wakeup(handler.run_sync)
            feed.deliver_to(handler.deliver)
            feed.refresh()  # for messages that came before the wake-up was added
            return
        self._ensure_thread()
        feed.add_wakeup(partial(self._waiting.put, handler))
        self._waiting.put(handler)

    def _forget_parent(self) -> None:
        # A forked child inherits this object but not its thread, and the parent's
        # subscriptions do not follow it (they are closed in the child): start afresh.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._thread = None
        self._waiting = queue.SimpleQueue()
        self._handlers = [h for h in self._handlers if not h.subscription.closed]
        self._unbound = [h for h in self._unbound if not h.subscription.closed]
        self._serving = []

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sharedkv-callbacks", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            handler = self._waiting.get()
            if handler is None:
                return
            handler.run_sync()

    async def run_loop(self) -> None:
        """Bind waiting async callbacks to the running loop and serve them until closed."""
        loop = asyncio.get_running_loop()
        with self._lock:
            handlers, self._unbound = self._unbound, []
        for handler in handlers:
            handler.bind(loop)
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._stopped:
                done.set_result(None)
            self._serving.append((loop, done))
        try:
            await done
        finally:
            with self._lock:
                self._serving.remove((loop, done))
            for handler in handlers:
                handler.unbind()
            with self._lock:
                self._unbound.extend(h for h in handlers if not h.subscription.closed)

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            handlers, self._handlers = self._handlers, []
            thread, self._thread = self._thread, None
            serving = list(self._serving)
        for loop, done in serving:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_finish, done)
        for handler in handlers:
            handler.unbind()
            handler.subscription.close()
        if thread is not None:
            self._waiting.put(None)
            if thread is not threading.current_thread():
                thread.join(timeout=5)
