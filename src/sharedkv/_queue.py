"""Named FIFO queues shared by every process of a store.

Each item is taken by exactly one consumer: removing it is one atomic transaction, and
``get_many`` removes every item it returns in one. ``put_many`` appends all its items in one
transaction, or none. Delivery is *at most once* when a consumer dies: an item a process has
taken is gone from the queue, even if the process is killed before it acts on it (for
``get_many``, every item of the batch).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ._errors import ClosedError, QueueEmpty, QueueFull
from ._wait import resolve_timeout, retry_until, retry_until_async

if TYPE_CHECKING:
    from ._backends.base import Backend, Feed
    from ._codec import Codec

__all__ = ["Queue"]


class Queue:
    """A cross-process FIFO queue: ``put``/``get`` with timeouts, ``put_many``/``get_many`` for
    batches, and ``async`` twins of each."""

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
        # Items a get_many took but could not hand out, because an item before them could not
        # be decoded: the next gets of this handle return them first, so that one bad item
        # does not cost the rest of its batch.
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
        """Items waiting in the queue, for every process (not counting any this handle took
        and holds back after an undecodable item)."""
        return self._backend.queue_size(self.name)

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return bool(self.maxsize) and self.qsize() >= self.maxsize

    def close(self) -> None:
        """Stop using the queue from this handle (the items stay for other processes)."""
        self._closed = True
        if self._feed is not None:
            self._feed.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} maxsize={self.maxsize}>"


def _check_max_items(max_items: int) -> None:
    if isinstance(max_items, bool) or not isinstance(max_items, int):
        raise TypeError(f"max_items must be an int, not {type(max_items).__qualname__}")
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, not {max_items}")
