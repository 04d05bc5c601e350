"""Named FIFO queues shared by every process of a store.

Each item is taken by exactly one consumer: removing it is one atomic transaction. Delivery is
*at most once* when a consumer dies: an item a process has taken is gone from the queue, even if
the process is killed before it acts on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ClosedError, QueueEmpty, QueueFull
from ._wait import resolve_timeout, retry_until, retry_until_async

if TYPE_CHECKING:
    from ._backends.base import Backend, Feed
    from ._codec import Codec

__all__ = ["Queue"]

_NONE = object()


class Queue:
    """A cross-process FIFO queue: ``put``/``get`` with timeouts, and ``async`` twins."""

    def __init__(self, backend: Backend, codec: Codec, name: str, maxsize: int = 0) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError("maxsize must be an int")
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0 (0 means unbounded)")
        self.name = name
        self.maxsize = maxsize
        self._backend = backend
        self._codec = codec
        self._feed: Feed | None = None
        self._closed = False

    def _wake_feed(self) -> Feed:
        if self._closed:
            raise ClosedError(f"queue {self.name!r} is closed")
        if self._feed is None:
            self._feed = self._backend.queue_feed(self.name)
        return self._feed

    # -- non-blocking -------------------------------------------------------------------
    def put_nowait(self, item: Any) -> None:
        if self._closed:
            raise ClosedError(f"queue {self.name!r} is closed")
        if not self._backend.queue_put(self.name, self._codec.encode(item), self.maxsize):
            raise QueueFull(f"queue {self.name!r} is full ({self.maxsize} items)")

    def get_nowait(self) -> Any:
        if self._closed:
            raise ClosedError(f"queue {self.name!r} is closed")
        raw = self._backend.queue_get(self.name)
        if raw is None:
            raise QueueEmpty(f"queue {self.name!r} is empty")
        return self._codec.decode(raw)

    # -- blocking ---------------------------------------------------------------------------
    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item``; on a full bounded queue wait up to ``timeout`` (default 30 s),
        then raise :class:`~sharedkv.QueueFull`."""
        data = self._codec.encode(item)
        if self._try_put(data):
            return
        if not block:
            raise QueueFull(f"queue {self.name!r} is full ({self.maxsize} items)")
        limit = resolve_timeout(timeout)
        if retry_until(lambda: self._try_put(data) or None, self._wake_feed(), limit) is None:
            raise QueueFull(f"queue {self.name!r} stayed full for {limit} s")

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest item; wait up to ``timeout`` (default 30 s) for one,
        then raise :class:`~sharedkv.QueueEmpty`."""
        if not block:
            return self.get_nowait()
        raw = self._backend.queue_get(self.name)
        if raw is None:
            limit = resolve_timeout(timeout)
            raw = retry_until(lambda: self._backend.queue_get(self.name), self._wake_feed(), limit)
            if raw is None:
                raise QueueEmpty(f"queue {self.name!r} stayed empty for {limit} s")
        return self._codec.decode(raw)

    async def put_async(self, item: Any, timeout: float | None = None) -> None:
        data = self._codec.encode(item)
        if self._try_put(data):
            return
        limit = resolve_timeout(timeout)
        ok = await retry_until_async(lambda: self._try_put(data) or None, self._wake_feed(), limit)
        if ok is None:
            raise QueueFull(f"queue {self.name!r} stayed full for {limit} s")

    async def get_async(self, timeout: float | None = None) -> Any:
        raw = self._backend.queue_get(self.name)
        if raw is None:
            limit = resolve_timeout(timeout)
            raw = await retry_until_async(
                lambda: self._backend.queue_get(self.name), self._wake_feed(), limit
            )
            if raw is None:
                raise QueueEmpty(f"queue {self.name!r} stayed empty for {limit} s")
        return self._codec.decode(raw)

    def _try_put(self, data: bytes) -> bool:
        if self._closed:
            raise ClosedError(f"queue {self.name!r} is closed")
        return self._backend.queue_put(self.name, data, self.maxsize)

    # -- inspection and lifecycle ---------------------------------------------------------------
    def qsize(self) -> int:
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
