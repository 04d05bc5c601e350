"""Named FIFO queues shared by every process of a store.

Each item is taken by exactly one consumer: removing it is one atomic transaction, and
``get_many`` removes every item it returns in one. ``put_many`` appends all its items in one
transaction, or none. Delivery is *at most once* when a consumer dies: an item a process has
taken is gone from the queue, even if the process is killed before it acts on it (for
``get_many``, every item of the batch).

Those calls are also immediate: when ``put`` returns, the item is in the queue for every
process, and stays there if the producer is killed a moment later; a ``get`` takes only what it
returns. A *buffered* handle, ``store.queue(name, buffer=N)``, gives both up for throughput, as
:class:`multiprocessing.Queue` does with the first. Its ``put`` encodes the item (a bad item
raises there, and nothing is queued) and adds it to the handle's own list; a feeder thread of
the handle (``sharedkv-queue-feeder-<name>``) writes that list with one ``put_many`` as soon as
it has an item, and while it writes, the next items gather for the next batch. ``put`` blocks
(up to its timeout) while ``N`` items of the handle are not yet written, and on a bounded queue
the feeder writes as many as there is room for, so backpressure reaches the producer. Its
``get`` takes up to ``N`` items at once with ``get_many`` and hands them out one by one. So:

* an item is in the queue, for every process, once the feeder wrote it: ``flush()`` waits for
  that; ``close()``, closing the store and a normal exit of the process (including a child of
  ``multiprocessing``, however started) flush too. A process that is killed, or ends with
  ``os._exit``, loses the items it had put and not yet written: at most ``N`` per handle;
* the items a buffered ``get`` took and has not handed out are this handle's alone: ``qsize()``
  does not count them. ``close()`` (and closing the store, and a normal exit) puts them back at
  the queue's *tail*, after any items queued meanwhile, so other consumers then see them out of
  order; a killed process loses them (at most ``N`` per handle; delivery stays at most once);
* order is kept per producer handle (per thread, when threads share one), and every item is
  still taken exactly once;
* an error of the feeder (the store is full, a server is unreachable) loses the items it was
  writing and is raised by the handle's next ``put``, ``flush`` or ``close`` as
  :class:`~sharedkv.QueueWriteError`, with the count and the cause;
* a child process forked with buffered handles starts with empty buffers and a feeder of its
  own: what the parent held stays the parent's to write or put back.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ._backends.base import Feed
from ._errors import ClosedError, QueueEmpty, QueueFull, QueueWriteError
from ._wait import DEFAULT_TIMEOUT, resolve_timeout, retry_until, retry_until_async

if TYPE_CHECKING:
    from ._backends.base import Backend
    from ._codec import Codec

__all__ = ["BufferedQueue", "Queue", "close_buffered_queues", "close_queues", "open_queue"]

log = logging.getLogger("sharedkv")

#: a feeder thread with nothing to write for this long ends; the next put starts another
FEEDER_IDLE_S = 1.0


def open_queue(
    backend: Backend, codec: Codec, name: str, maxsize: int = 0, buffer: int = 0
) -> Queue:
    """A handle on the named queue: buffered (see the module's docstring) when ``buffer`` > 0."""
    if isinstance(buffer, bool) or not isinstance(buffer, int):
        raise TypeError(f"buffer must be an int, not {type(buffer).__qualname__}")
    if buffer < 0:
        raise ValueError(f"buffer must be >= 0 (0 means unbuffered), not {buffer}")
    if buffer:
        return BufferedQueue(backend, codec, name, maxsize, buffer)
    return Queue(backend, codec, name, maxsize)


class Queue:
    """A cross-process FIFO queue: ``put``/``get`` with timeouts, ``put_many``/``get_many`` for
    batches, and ``async`` twins of each. ``store.queue(name, buffer=N)`` gives a buffered
    handle instead, which holds items back to move them in batches (see this module's
    docstring); ``flush()`` waits until a handle holds no item it was given."""

    #: items a handle may hold back on each side; 0: every put and get is its own transaction
    buffer = 0

    def __init__(self, backend: Backend, codec: Codec, name: str, maxsize: int = 0) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError("maxsize must be an int")
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0 (0 means unbounded)")
        self.name = name
        self.maxsize = maxsize
        self._backend = backend
        self._encode = codec.encode
        self._decode = codec.decode
        self._feed: Feed | None = None
        self._closed = False
        # Items this handle took and has not handed out yet: the rest of a batch whose earlier
        # item could not be decoded (so that one bad item does not cost the rest of its batch),
        # and on a buffered handle, what its last get_many took. The next gets return them first.
        self._undelivered: collections.deque[bytes] = collections.deque()

    def _closed_error(self) -> ClosedError:
        return ClosedError(f"queue {self.name!r} is closed")

    def _wake_feed(self) -> Feed:
        if self._closed:
            raise self._closed_error()
        if self._feed is None:
            self._feed = self._backend.queue_feed(self.name)
        return self._feed

    # -- one item ---------------------------------------------------------------------------
    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item``; on a full bounded queue wait up to ``timeout`` (default 30 s),
        then raise :class:`~sharedkv.QueueFull`."""
        if self._closed:
            raise self._closed_error()
        data = self._encode(item)
        if self._backend.queue_put(self.name, data, self.maxsize):
            return
        if not block:
            raise QueueFull(f"queue {self.name!r} is full ({self.maxsize} items)")
        limit = resolve_timeout(timeout)
        if retry_until(lambda: self._offer((data,)), self._wake_feed(), limit) is None:
            raise QueueFull(f"queue {self.name!r} stayed full for {limit} s")

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest item; wait up to ``timeout`` (default 30 s) for one,
        then raise :class:`~sharedkv.QueueEmpty`."""
        if self._closed or self._undelivered:
            taken = self._take(1)
        else:  # the common case, kept short: one backend call, one decode
            raw = self._backend.queue_get(self.name)
            if raw is not None:
                return self._decode(raw)
            taken = None
        return self._first_or_wait(taken, block, timeout)

    def _first_or_wait(self, taken: list[bytes] | None, block: bool, timeout: float | None) -> Any:
        """The first item of ``taken``; if nothing was taken, the first to arrive."""
        if taken is None:
            if not block:
                raise QueueEmpty(f"queue {self.name!r} is empty")
            limit = resolve_timeout(timeout)
            taken = retry_until(lambda: self._take(1), self._wake_feed(), limit)
            if taken is None:
                raise QueueEmpty(f"queue {self.name!r} stayed empty for {limit} s")
        return self._handed_out(taken)[0]

    async def put_async(self, item: Any, timeout: float | None = None) -> None:
        if self._closed:
            raise self._closed_error()
        data = self._encode(item)
        if self._backend.queue_put(self.name, data, self.maxsize):
            return
        limit = resolve_timeout(timeout)
        done = await retry_until_async(lambda: self._offer((data,)), self._wake_feed(), limit)
        if done is None:
            raise QueueFull(f"queue {self.name!r} stayed full for {limit} s")

    async def get_async(self, timeout: float | None = None) -> Any:
        taken = self._take(1)
        if taken is None:
            limit = resolve_timeout(timeout)
            taken = await retry_until_async(lambda: self._take(1), self._wake_feed(), limit)
            if taken is None:
                raise QueueEmpty(f"queue {self.name!r} stayed empty for {limit} s")
        return self._handed_out(taken)[0]

    # -- batches ------------------------------------------------------------------------------
    def put_many(self, items: Iterable[Any], timeout: float | None = None) -> None:
        """Append every item of ``items``, in order, in one transaction: all of them or none.

        ``items`` is any iterable except ``str`` and ``bytes`` (put those with :meth:`put`);
        it is read and serialized before anything is written. On a bounded queue, wait up to
        ``timeout`` (default 30 s) until there is room for the whole batch, then raise
        :class:`~sharedkv.QueueFull`; a batch larger than ``maxsize`` could never fit and
        raises :class:`ValueError` at once."""
        batch = self._batch(items)
        limit = resolve_timeout(timeout)
        if not batch or self._offer(batch):
            return
        if retry_until(lambda: self._offer(batch), self._wake_feed(), limit) is None:
            raise QueueFull(f"queue {self.name!r} had no room for {len(batch)} items for {limit} s")

    def get_many(self, max_items: int, timeout: float | None = None) -> list[Any]:
        """Remove and return the oldest items, at most ``max_items``, in one transaction.

        Waits up to ``timeout`` (default 30 s) for at least one item, then raises
        :class:`~sharedkv.QueueEmpty`; returns as soon as any are there, without waiting to
        fill the batch."""
        _check_max_items(max_items)
        limit = resolve_timeout(timeout)
        taken = self._take(max_items)
        if taken is None:
            taken = retry_until(lambda: self._take(max_items), self._wake_feed(), limit)
            if taken is None:
                raise QueueEmpty(f"queue {self.name!r} stayed empty for {limit} s")
        return self._handed_out(taken)

    async def put_many_async(self, items: Iterable[Any], timeout: float | None = None) -> None:
        """:meth:`put_many` for coroutines: waits for room on the event loop."""
        batch = self._batch(items)
        limit = resolve_timeout(timeout)
        if not batch or self._offer(batch):
            return
        if await retry_until_async(lambda: self._offer(batch), self._wake_feed(), limit) is None:
            raise QueueFull(f"queue {self.name!r} had no room for {len(batch)} items for {limit} s")

    async def get_many_async(self, max_items: int, timeout: float | None = None) -> list[Any]:
        """:meth:`get_many` for coroutines: waits for the first item on the event loop."""
        _check_max_items(max_items)
        limit = resolve_timeout(timeout)
        taken = self._take(max_items)
        if taken is None:
            taken = await retry_until_async(lambda: self._take(max_items), self._wake_feed(), limit)
            if taken is None:
                raise QueueEmpty(f"queue {self.name!r} stayed empty for {limit} s")
        return self._handed_out(taken)

    # -- encoding, attempts and decoding --------------------------------------------------------
    def _batch(self, items: Iterable[Any]) -> list[bytes]:
        """``items`` encoded, checked against ``maxsize``; nothing is written on any error."""
        if self._closed:
            raise self._closed_error()
        if isinstance(items, (str, bytes, bytearray, memoryview)):
            # Iterable, but nearly always one item meant for put(): refuse rather than put
            # each character or byte separately.
            raise TypeError(f"put_many takes an iterable of items, not {type(items).__name__}")
        try:
            iterator = iter(items)
        except TypeError:
            raise TypeError(
                f"put_many takes an iterable of items, not {type(items).__qualname__}"
            ) from None
        batch = [self._encode(item) for item in iterator]
        if self.maxsize and len(batch) > self.maxsize:
            raise ValueError(
                f"a batch of {len(batch)} items can never fit in queue {self.name!r} "
                f"(maxsize {self.maxsize}); split it"
            )
        return batch

    def _offer(self, batch: Sequence[bytes]) -> bool | None:
        """Append the whole batch if there is room now; ``None`` (for retry_until) if not."""
        if self._closed:
            raise self._closed_error()
        if len(batch) == 1:
            done = self._backend.queue_put(self.name, batch[0], self.maxsize)
        else:
            done = self._backend.queue_put_many(self.name, batch, self.maxsize)
        return done or None

    def _take(self, max_items: int) -> list[bytes] | None:
        """Up to ``max_items`` raw items (undelivered ones first); ``None`` when there are none."""
        if self._closed:
            raise self._closed_error()
        if self._undelivered:
            taken: list[bytes] = []
            with contextlib.suppress(IndexError):  # another thread may take the last ones
                while len(taken) < max_items:
                    taken.append(self._undelivered.popleft())
            if taken:
                return taken
        if max_items == 1:
            raw = self._backend.queue_get(self.name)
            return None if raw is None else [raw]
        return self._backend.queue_get_many(self.name, max_items) or None

    def _handed_out(self, taken: list[bytes]) -> list[Any]:
        """``taken`` decoded. An item that cannot be decoded ends the batch: the items before it
        are returned; it raises :class:`~sharedkv.SerializationError` on its own (now, if it
        came first, else on the next get) and the items after it wait in this handle."""
        out = []
        for i, raw in enumerate(taken):
            try:
                out.append(self._decode(raw))
            except Exception:
                if out:
                    self._undelivered.extendleft(reversed(taken[i:]))
                    return out
                self._undelivered.extendleft(reversed(taken[i + 1 :]))
                raise
        return out

    # -- inspection and lifecycle ---------------------------------------------------------------
    def qsize(self) -> int:
        """Items waiting in the queue, for every process; not counting items that handles hold:
        taken and not handed out yet (by a buffered handle, or after an undecodable item), or
        put on a buffered handle and not written yet."""
        return self._backend.queue_size(self.name)

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return bool(self.maxsize) and self.qsize() >= self.maxsize

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every item put on this handle is in the queue: at once, unless the handle
        is buffered (``timeout`` is for those)."""
        resolve_timeout(timeout)
        if self._closed:
            raise self._closed_error()

    async def flush_async(self, timeout: float | None = None) -> None:
        """:meth:`flush` for coroutines."""
        self.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop using the queue from this handle (the items stay for other processes).

        ``timeout`` is for buffered handles: how long to wait to write what they hold. Items
        this handle took and has not handed out (those after an undecodable one) go back to the
        queue's tail."""
        resolve_timeout(timeout)
        self._closed = True
        if self._feed is not None:
            self._feed.close()
        if self._undelivered:
            _put_back(self._backend, self.name, self._undelivered)

    async def close_async(self, timeout: float | None = None) -> None:
        """:meth:`close` for coroutines: a buffered handle's wait for its items to be written
        runs on the event loop."""
        self.close(timeout)

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Queue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close_async()

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} maxsize={self.maxsize}>"


def _check_max_items(max_items: int) -> None:
    if isinstance(max_items, bool) or not isinstance(max_items, int):
        raise TypeError(f"max_items must be an int, not {type(max_items).__qualname__}")
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, not {max_items}")


class BufferedQueue(Queue):
    """A queue handle that holds back up to ``buffer`` items on each side: ``put`` returns once
    the item is in the handle's list, which a feeder thread writes in batches, and ``get`` takes
    a batch at once. What that changes is in the docstring of this module."""

    def __init__(
        self, backend: Backend, codec: Codec, name: str, maxsize: int, buffer: int
    ) -> None:
        super().__init__(backend, codec, name, maxsize)
        self.buffer = buffer  # >= 1, checked by open_queue()
        self._closing = False  # set by close(): no more puts or gets; _closed follows when done
        self._start_empty()
        # Items taken and not handed out go back to the queue when the handle is closed, or
        # when it is dropped without close(): the finalizer holds the deque, not the handle.
        self._put_back_taken = weakref.finalize(self, _put_back, backend, name, self._undelivered)
        self._put_back_taken.atexit = False  # at exit, close_buffered_queues() closes handles
        with _registry_lock:
            _buffered_handles.add(self)

    def _start_empty(self) -> None:
        """Empty buffers and new locks: for a new handle, and in a forked child, where what the
        parent held is the parent's, and its threads (which may hold these locks) do not exist."""
        self._lock = threading.Lock()  # guards the producer side: the attributes below
        self._work = threading.Condition(self._lock)  # the feeder sleeps here
        self._progress = _ProgressFeed()  # notified whenever the feeder settles items
        self._pending: list[bytes] = []  # encoded, waiting for the feeder
        self._accepted = 0  # items put on this handle so far
        self._settled = 0  # ... of which written, or lost to an error (counted in _lost)
        self._lost = 0  # items lost since the last QueueWriteError was raised ...
        self._lost_to: Exception | None = None  # ... and the first error that lost some
        self._feeder: threading.Thread | None = None
        self._abandoned = False  # close() gave up waiting: the feeder stops, its items are lost
        self._take_lock = threading.Lock()  # guards the consumer side: _undelivered
        self._undelivered.clear()  # in place: the finalizer of the handle holds this deque

    # -- putting ------------------------------------------------------------------------------
    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add ``item`` to this handle's buffer, for the feeder to write as soon as it can.
        While ``buffer`` items of the handle are not written yet, wait up to
        ``timeout`` (default 30 s) for one to be, then raise :class:`~sharedkv.QueueFull`."""
        data = self._encode_to_buffer(item)
        if self._add_pending(data):
            return
        if not block:
            raise QueueFull(
                f"queue {self.name!r}: {self.buffer} items of this handle wait to be written"
            )
        limit = resolve_timeout(timeout)
        if retry_until(partial(self._add_pending, data), self._progress, limit) is None:
            raise self._buffer_stayed_full(limit)

    async def put_async(self, item: Any, timeout: float | None = None) -> None:
        data = self._encode_to_buffer(item)
        if self._add_pending(data):
            return
        limit = resolve_timeout(timeout)
        if await retry_until_async(partial(self._add_pending, data), self._progress, limit) is None:
            raise self._buffer_stayed_full(limit)

    def put_many(self, items: Iterable[Any], timeout: float | None = None) -> None:
        """Write what this handle holds, then ``items`` as :meth:`Queue.put_many` does: in one
        transaction, after the handle's earlier items, in the queue when this returns."""
        deadline = time.monotonic() + resolve_timeout(timeout)
        self.flush(timeout)
        super().put_many(items, max(0.0, deadline - time.monotonic()))

    async def put_many_async(self, items: Iterable[Any], timeout: float | None = None) -> None:
        deadline = time.monotonic() + resolve_timeout(timeout)
        await self.flush_async(timeout)
        await super().put_many_async(items, max(0.0, deadline - time.monotonic()))

    def flush(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` (default 30 s) until every item put on this handle so far is
        written (on a bounded queue, until there was room for it), then raise
        :class:`~sharedkv.QueueFull`; the items stay buffered. Raises
        :class:`~sharedkv.QueueWriteError` if the feeder lost items since the last report."""
        limit = resolve_timeout(timeout)
        target = self._request_flush()
        if retry_until(partial(self._flushed, target), self._progress, limit) is None:
            raise self._unwritten_after(limit)

    async def flush_async(self, timeout: float | None = None) -> None:
        """:meth:`flush` for coroutines: waits on the event loop."""
        limit = resolve_timeout(timeout)
        target = self._request_flush()
        if await retry_until_async(partial(self._flushed, target), self._progress, limit) is None:
            raise self._unwritten_after(limit)

    def _encode_to_buffer(self, item: Any) -> bytes:
        if self._closing:
            raise self._closed_error()
        return self._encode(item)

    def _add_pending(self, data: bytes) -> bool | None:
        """Queue ``data`` for the feeder if the handle has room; ``None`` (for retry_until) if
        not. Raises the feeder's unreported error first: that put then adds nothing."""
        with self._lock:
            self._raise_if_unusable()
            unwritten = self._accepted - self._settled
            if unwritten >= self.buffer:
                return None
            self._pending.append(data)
            self._accepted += 1
            if self._feeder is None:
                self._start_feeder()
            elif len(self._pending) == 1:
                self._work.notify()  # the feeder sleeps only when nothing is pending
        return True

    def _request_flush(self) -> int:
        """How many items a flush waits to see settled: all accepted so far."""
        with self._lock:
            self._raise_if_unusable()
            return self._accepted

    def _flushed(self, target: int) -> bool | None:
        with self._lock:
            self._raise_if_unusable()  # a close() meanwhile reports any loss itself
            return True if self._settled >= target else None

    def _raise_if_unusable(self) -> None:
        if self._closing:
            raise self._closed_error()
        self._raise_lost_items()

    def _raise_lost_items(self) -> None:
        """Report items the handle lost (with the lock held), once."""
        if self._lost_to is not None:
            lost, cause = self._lost, self._lost_to
            self._lost, self._lost_to = 0, None
            raise QueueWriteError(
                f"queue {self.name!r}: {lost} item(s) held by this handle were lost: {cause}",
                lost,
            ) from cause

    def _buffer_stayed_full(self, limit: float) -> QueueFull:
        return QueueFull(
            f"queue {self.name!r}: {self.buffer} items of this handle were still waiting to be "
            f"written after {limit} s"
        )

    def _unwritten_after(self, limit: float) -> QueueFull:
        with self._lock:
            unwritten = self._accepted - self._settled
        return QueueFull(
            f"queue {self.name!r} had no room for {unwritten} items of this handle for {limit} s"
        )

    # -- the feeder thread ----------------------------------------------------------------------
    def _start_feeder(self) -> None:
        # One thread per handle, started by the put that finds none (with the lock held). It
        # holds the handle, so a handle dropped with items pending still writes them.
        self._feeder = threading.Thread(
            target=self._feed_queue, name=f"sharedkv-queue-feeder-{self.name}", daemon=True
        )
        self._feeder.start()
        _close_buffered_queues_at_exit()

    def _feed_queue(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._write(batch)

    def _next_batch(self) -> list[bytes] | None:
        """Every pending item, as soon as there is one; ``None`` when the feeder should end
        (nothing to write for FEEDER_IDLE_S, or close() gave up on the items).

        No waiting for more: batches form by themselves while the previous one is written, or
        while a busy producer holds the GIL (at most ``buffer`` items), and a lone item is
        written at once. (Waiting a millisecond for company made batches no larger between
        two processes, and added that millisecond to the latency.)"""
        with self._lock:
            if not self._pending and not self._closing:
                self._work.wait(FEEDER_IDLE_S)
            if not self._pending or self._abandoned:
                self._feeder = None
                return None
            batch, self._pending = self._pending, []
            return batch

    def _write(self, batch: list[bytes]) -> None:
        """Write ``batch`` in order, as fast as the queue has room for it."""
        try:
            while batch:
                written = self._write_head(batch)
                while written is None:  # a full bounded queue: wait for room, however long
                    if self._abandoned:
                        return  # close() gave up and counts what is not settled as lost
                    attempt = partial(self._write_head, batch)
                    written = retry_until(attempt, self._wake_feed(), FEEDER_IDLE_S)
                self._settle(written)
                batch = batch[written:]
        except Exception as exc:
            self._settle(len(batch), exc)

    def _write_head(self, batch: list[bytes]) -> int | None:
        """Write the longest head of ``batch`` the queue has room for: its length, or ``None``
        when there is no room at all (only a bounded queue refuses a write)."""
        if self._offer(batch):
            return len(batch)
        room = self.maxsize - self._backend.queue_size(self.name)
        if 0 < room < len(batch) and self._offer(batch[:room]):
            return room
        return None

    def _settle(self, count: int, error: Exception | None = None) -> None:
        with self._lock:
            self._settled += count
            if error is not None:
                self._record_loss(count, error)
        self._progress.notify()

    def _record_loss(self, count: int, cause: Exception) -> None:
        """Count items lost to ``cause``, for the next put, flush or close to report (with the
        lock held)."""
        self._lost += count
        self._lost_to = self._lost_to or cause

    # -- getting ------------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item this handle holds; when it holds none, it first takes up to ``buffer``
        items at once, waiting up to ``timeout`` (default 30 s) for one, then raises
        :class:`~sharedkv.QueueEmpty`."""
        return self._first_or_wait(self._take(1), block, timeout)

    def _take(self, max_items: int) -> list[bytes] | None:
        """Up to ``max_items`` of the items this handle holds; when it holds none, it first takes
        up to ``buffer`` (or ``max_items``, if more) in one transaction. ``None``: no items."""
        with self._take_lock:  # so that threads sharing the handle each get items in order
            if self._closing:
                raise self._closed_error()
            held = self._undelivered
            if not held:
                held.extend(self._backend.queue_get_many(self.name, max(max_items, self.buffer)))
                if not held:
                    return None
                _close_buffered_queues_at_exit()
            if max_items == 1:
                return [held.popleft()]
            return [held.popleft() for _ in range(min(max_items, len(held)))]

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Put back the items this handle took and has not handed out (at the tail of the
        queue), wait up to ``timeout`` (default 30 s) for the items put on it to be written,
        and stop using the queue from this handle. Raises :class:`~sharedkv.QueueWriteError`
        (the handle is closed all the same) if items were lost: put and never written (the
        queue stayed full, or the feeder failed), or taken and not put back."""
        limit = resolve_timeout(timeout)
        with self._lock:
            if self._closing:
                return
            self._closing = True
            target = self._accepted
        self._progress.notify()  # puts and flushes waiting on this handle: it is closed
        try:
            self._give_back_taken()
            if retry_until(partial(self._settled_up_to, target), self._progress, limit) is None:
                self._abandon(QueueFull(f"the queue stayed full for {limit} s"))
            self._stop_feeder()
        finally:
            super().close()
        with self._lock:
            self._raise_lost_items()

    async def close_async(self, timeout: float | None = None) -> None:
        """:meth:`close` for coroutines: waits on the event loop for the items put on this
        handle to be written, then closes it as :meth:`close` does."""
        limit = resolve_timeout(timeout)
        deadline = time.monotonic() + limit
        with self._lock:
            closing, target = self._closing, self._accepted
        if not closing:
            # Whether it comes or not, close() below settles the account and reports losses.
            await retry_until_async(partial(self._settled_up_to, target), self._progress, limit)
        self.close(max(0.0, deadline - time.monotonic()))

    def _give_back_taken(self) -> None:
        with self._take_lock:
            count = len(self._undelivered)
            try:
                self._put_back_taken()
            except Exception as exc:
                with self._lock:
                    self._record_loss(count, exc)

    def _settled_up_to(self, target: int) -> bool | None:
        with self._lock:
            return True if self._settled >= target else None

    def _abandon(self, cause: Exception) -> None:
        """Stop the feeder and count what it had not written as lost to ``cause``."""
        with self._lock:
            self._abandoned = True
            self._work.notify()
        if self._feed is not None:
            self._feed.close()  # wakes a feeder waiting for room (else it sees within 1 s)
        self._stop_feeder()
        with self._lock:
            unwritten = self._accepted - self._settled
            if unwritten:
                self._settled += unwritten
                self._record_loss(unwritten, cause)
            self._pending = []

    def _stop_feeder(self) -> None:
        with self._lock:
            feeder = self._feeder
            self._work.notify()
        if feeder is not None and feeder is not threading.current_thread():
            feeder.join(DEFAULT_TIMEOUT)

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} maxsize={self.maxsize} buffer={self.buffer}>"


class _ProgressFeed(Feed):
    """Wakes the threads and coroutines of this process that wait on a buffered handle's
    feeder: for room in the handle's buffer, or for a flush."""

    def fetch(self) -> list[Any]:
        return []


def _put_back(backend: Backend, name: str, taken: collections.deque[bytes]) -> None:
    """Return items a handle took and did not hand out to the queue's tail. maxsize is not
    checked: they were in the queue a moment ago, and waiting for room could lose them."""
    items = list(taken)
    taken.clear()
    if items:
        backend.queue_put_many(name, items, 0)


# -- every buffered handle of this process: closed at exit, emptied in a forked child ----------
_buffered_handles: weakref.WeakSet[BufferedQueue] = weakref.WeakSet()
_registry_lock = threading.Lock()
_exit_finalizer: Any = None  # multiprocessing.util.Finalize


def close_queues(handles: Iterable[Queue]) -> None:
    """Close every handle, then raise the first error (each handle is closed either way)."""
    first: Exception | None = None
    for handle in handles:
        try:
            handle.close()
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


def close_buffered_queues() -> None:
    """Close every buffered handle of this process, logging items lost: when it exits."""
    with _registry_lock:
        handles = list(_buffered_handles)
    for handle in handles:
        try:
            handle.close()
        except Exception as exc:
            log.error("sharedkv: closing %r at exit: %s", handle, exc)


def _close_buffered_queues_at_exit() -> None:
    """Make sure this process closes its buffered handles when it exits.

    A normal exit runs the stores' atexit hook, which does. But multiprocessing ends the
    children it forks (start methods fork and forkserver) with os._exit(), which runs no atexit
    hook, only multiprocessing's own exit finalizers, and it drops the parent's finalizers when
    such a child starts: hence one finalizer per process, registered when a handle first holds
    items there (closing twice is harmless)."""
    global _exit_finalizer
    if _exit_finalizer is None or not _exit_finalizer.still_active():
        from multiprocessing import util

        _exit_finalizer = util.Finalize(None, close_buffered_queues, exitpriority=10)


def _forget_parent_buffers() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for handle in list(_buffered_handles):
        handle._start_empty()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_buffers)
