"""The backend interface: byte-level primitives that every storage engine provides.

A backend stores ``bytes`` under ``str`` keys and knows nothing of serializers, the mapping
protocol, callbacks or asyncio; :class:`sharedkv.Store` adds those once for every backend.

Conventions shared by every method:

* ``ttl`` is ``None`` (no expiry) or a positive number of seconds, already validated.
* Revisions are store-wide, start at 1 and only grow. ``if_revision=None`` writes unconditionally,
  ``0`` only when the key is absent, ``n`` only when the key is at revision ``n``.
* Operations on several keys are atomic: all applied or none.

Messaging (pub/sub, ``watch``, and the wake-ups of blocking queue and lock waits) is exposed as
:class:`Feed` objects. A backend feeds them through :meth:`Feed.notify` from whatever thread its
notification layer uses; the feed turns that into wake-ups for threads and event loops.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "Backend",
    "Change",
    "Decoder",
    "Feed",
    "Gap",
    "HintedFeed",
    "LockInfo",
    "Message",
    "Record",
]


#: ``decode(data, trailer)``: the value stored in ``data`` without its last ``trailer`` bytes
Decoder = Callable[[bytes, int], Any]


class Record(NamedTuple):
    """A stored value with its metadata."""

    value: bytes
    revision: int
    expires_at: float | None  # wall-clock time.time() seconds, or None


@dataclass(frozen=True)
class Message:
    """One published message, as a subscriber receives it."""

    channel: str
    data: Any
    seq: int  # per-channel sequence number, from 1, without holes on the publisher side
    pattern: str | None = None  # the subscription pattern that matched, if any


@dataclass(frozen=True)
class Gap:
    """Messages this subscriber lost because it fell behind its bounded buffer.

    ``first_seq``..``last_seq`` (inclusive) of ``channel`` were dropped; ``count`` of them.
    """

    channel: str
    first_seq: int
    last_seq: int

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1


@dataclass(frozen=True)
class Change:
    """A change to a key, as ``watch`` reports it.

    ``kind`` is ``"set"``, ``"delete"`` or ``"expire"``; ``value`` is the new value for
    ``"set"`` and ``None`` otherwise.
    """

    kind: str
    key: str
    revision: int
    value: Any = None


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock: process id, thread id and name, and since when (``time.time()``).

    ``ident`` tells one acquisition from another (a semaphore may be held twice by one thread).
    """

    pid: int
    thread_id: int
    thread_name: str
    since: float
    ident: int = 0


@dataclass
class _Wakeup:
    callback: Callable[[], None]
    active: bool = field(default=True)


class Feed(ABC):
    """A stream of events (raw bytes decoded by the Store) with thread- and loop-safe wake-ups.

    The backend calls :meth:`notify` whenever new events may be available; readers call
    :meth:`fetch` to take them and :meth:`wait` to sleep until the next ``notify``. Nothing here
    polls: a reader that finds nothing sleeps on a condition variable until notified.
    """

    #: Whether the backend calls this feed's wake-ups on a thread of its own named
    #: ``sharedkv-callbacks`` (a subscription asked for with ``callbacks=True``), so that sync
    #: callbacks can run right there instead of being handed to another thread.
    wakes_on_callback_thread = False

    def __init__(self) -> None:
        # The hot paths take the condition's lock directly (cheaper than the Condition's with).
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._generation = 0
        self._sleepers = 0  # threads in wait(): without any, a notify skips the condition
        # Replaced, never changed in place, so that a notify runs them without a copy.
        self._wakeups: tuple[_Wakeup, ...] = ()
        self.closed = False

    # -- called by the backend's notification layer ---------------------------------------
    def notify(self) -> None:
        with self._mutex:
            self._changed()
        self._run_wakeups()

    def _changed(self) -> None:
        """Count a change and wake the sleeping readers; the caller holds ``_cond``."""
        self._generation += 1
        if self._sleepers:
            self._cond.notify_all()

    def _run_wakeups(self) -> None:
        for wakeup in self._wakeups:
            if wakeup.active:
                wakeup.callback()

    # -- called by readers --------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Grows on every notify; read it before :meth:`fetch`, pass it to :meth:`wait`."""
        return self._generation

    def wait(self, generation: int, timeout: float) -> bool:
        """Sleep until notified after ``generation`` was read, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._generation == generation and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._sleepers += 1
                try:
                    # An infinite timeout (allowed: "wait for ever") would overflow the lock's.
                    self._cond.wait(None if math.isinf(remaining) else remaining)
                finally:
                    self._sleepers -= 1
            return True

    def add_wakeup(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) on every notify; returns its remover."""
        wakeup = _Wakeup(callback)
        with self._cond:
            self._wakeups = (*self._wakeups, wakeup)

        def remove() -> None:
            wakeup.active = False
            with self._cond:
                self._wakeups = tuple(w for w in self._wakeups if w is not wakeup)

        return remove

    def refresh(self) -> None:
        """Run the wake-ups soon, as if anything may have changed, on the thread that usually
        runs them (for example once a wake-up was added, for events that came before it)."""
        self.notify()

    def deliver_to(self, sink: Callable[[Any], None]) -> None:  # noqa: B027 - optional hook
        """Where :attr:`wakes_on_callback_thread`: a feed may hand an event that reaches that
        thread whole, with nothing before it unread, straight to ``sink`` (the raw event, as
        :meth:`fetch` would return it, but its payload possibly a view valid only during the
        call) instead of running its wake-ups for a :meth:`fetch`. Only the callback that is
        this feed's one reader may ask for this."""

    def arm(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Ask to be woken from now on. Wake-up-only feeds (queue and lock waits) register with
        other processes only while someone actually waits, so that writers pay nothing for
        waiters that are not waiting; subscriptions and watches are always armed."""

    def disarm(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """The waiter stopped waiting (see :meth:`arm`)."""

    @abstractmethod
    def fetch(self) -> list[Any]:
        """Everything available now, in order, without blocking (raw events for the Store)."""

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._run_wakeups()


class HintedFeed(Feed):
    """A feed told *which* names changed (a channel, a key): it collects them until the reader
    takes them with :meth:`take_hints`, so a burst of wake-ups for one name is one read."""

    def __init__(self) -> None:
        super().__init__()
        self._hinted: dict[str, None] = {}
        self._everything = False

    def hint(self, name: str | None) -> None:
        """``name`` may have changed; ``None``: anything may have (re-read everything)."""
        with self._mutex:
            if name is None:
                self._everything = True
            else:
                self._hinted[name] = None
            self._changed()
        self._run_wakeups()

    def refresh(self) -> None:
        self.hint(None)

    def take_hints(self) -> tuple[list[str], bool]:
        """The names hinted since the last call, and whether everything must be re-read."""
        with self._mutex:
            names, self._hinted = list(self._hinted), {}
            everything, self._everything = self._everything, False
        return names, everything

    def restore_hints(self, names: list[str], everything: bool) -> None:
        """Put hints back when a read failed, for the next fetch to retry."""
        with self._cond:
            self._hinted.update(dict.fromkeys(names))
            self._everything = self._everything or everything


class Backend(ABC):
    """The storage engine behind a :class:`sharedkv.Store`.

    Subclasses implement the abstract primitives; the other methods have correct but slower
    defaults built on them, which a backend overrides where its engine does better.
    """

    #: the address that reopens this store from another process (``Store(url)``)
    url: str
    #: longest key in UTF-8 bytes
    max_key_bytes: int = 511
    #: longest channel, pattern, queue or lock name in UTF-8 bytes
    max_name_bytes: int = 490

    # -- key-value primitives ---------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or ``None`` when absent or expired."""

    @abstractmethod
    def get_record(self, key: str) -> Record | None: ...

    @abstractmethod
    def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        if_revision: int | None = None,
        ephemeral: bool = False,
    ) -> int:
        """Write ``key``; return its new revision, or 0 when ``if_revision`` did not match."""

    @abstractmethod
    def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None) -> int:
        """Write all items atomically; return the revision of the write."""

    @abstractmethod
    def delete(self, key: str, *, if_revision: int | None = None) -> bool:
        """Remove ``key``; ``False`` when it was absent (or not at ``if_revision``)."""

    @abstractmethod
    def pop(self, key: str) -> bytes | None:
        """Remove ``key`` and return its value, atomically."""

    @abstractmethod
    def incr(self, key: str, amount: int) -> int:
        """Add ``amount`` to the integer at ``key`` (missing = 0) and return the result."""

    @abstractmethod
    def expire(self, key: str, ttl: float | None) -> bool:
        """Set (or with ``None`` remove) the expiry of ``key``; ``False`` when absent."""

    @abstractmethod
    def items(self, pattern: str | None = None) -> list[tuple[str, bytes]]:
        """A consistent snapshot of the live items whose key matches the glob ``pattern``."""

    @abstractmethod
    def count(self) -> int:
        """Number of live keys."""

    @abstractmethod
    def clear(self) -> None: ...

    @abstractmethod
    def revision(self) -> int:
        """The store's current (latest) revision."""

    def get_decoded(self, key: str, decode: Decoder, default: Any) -> Any:
        """``decode(value, 0)`` for the value of ``key``, or ``default`` when it is absent.

        The hot path of ``Store.get``. A backend whose records keep metadata after the value may
        pass the whole record and the metadata's length instead of copying the value out."""
        raw = self.get(key)
        return default if raw is None else decode(raw, 0)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    def keys(self, pattern: str | None = None) -> list[str]:
        return [key for key, _ in self.items(pattern)]

    # -- messaging ------------------------------------------------------------------
    @abstractmethod
    def publish(self, channel: str, payload: bytes) -> int:
        """Send ``payload`` to every subscription matching ``channel``; return how many."""

    def has_subscribers(self, channel: str) -> bool:
        """Whether a publish to ``channel`` could reach anyone; ``True`` when unsure. Lets a
        publish to a channel nobody follows skip serializing its message."""
        return True

    @abstractmethod
    def subscribe(self, patterns: Iterable[str], *, callbacks: bool = False) -> Feed:
        """A feed of ``(channel, payload, seq, pattern)`` tuples and :class:`Gap` markers.

        ``callbacks``: the feed will drive sync callbacks. A backend that has a thread for
        them wakes the feed there (see :attr:`Feed.wakes_on_callback_thread`)."""

    @abstractmethod
    def watch(self, pattern: str, since: int | None) -> Feed:
        """A feed of ``(kind, key, revision, payload_or_None)`` tuples for matching keys.

        With ``since``, replays retained changes after that revision first, or raises
        :class:`~sharedkv.RevisionTooOldError`.
        """

    # -- queues ---------------------------------------------------------------------
    @abstractmethod
    def queue_put(self, name: str, item: bytes, maxsize: int) -> bool:
        """Append ``item``; ``False`` (nothing written) when ``maxsize`` > 0 items are queued."""

    @abstractmethod
    def queue_put_many(self, name: str, items: Sequence[bytes], maxsize: int) -> bool:
        """Append every item, in order, atomically; ``False`` (nothing written) when
        ``maxsize`` > 0 and they do not all fit."""

    @abstractmethod
    def queue_get(self, name: str) -> bytes | None:
        """Remove and return the oldest item, or ``None`` when the queue is empty."""

    @abstractmethod
    def queue_get_many(self, name: str, max_items: int) -> list[bytes]:
        """Remove and return the oldest items, at most ``max_items`` (>= 1), atomically;
        ``[]`` when the queue is empty."""

    @abstractmethod
    def queue_size(self, name: str) -> int: ...

    @abstractmethod
    def queue_feed(self, name: str) -> Feed:
        """A feed notified when the queue may have changed (items put or taken)."""

    # -- locks ------------------------------------------------------------------------
    @abstractmethod
    def lock_acquire(self, name: str, limit: int, owner: LockInfo) -> bool:
        """Take one of ``limit`` slots of lock ``name`` for ``owner``, without waiting.

        Holders whose process has died are released on the way."""

    @abstractmethod
    def lock_release(self, name: str, owner: LockInfo) -> bool:
        """Give back the slot taken as ``owner`` (same ``ident``); ``False`` when not held."""

    @abstractmethod
    def lock_owners(self, name: str) -> list[LockInfo]:
        """The live holders of ``name`` (dead holders are released on the way)."""

    def lock_names(self) -> list[str]:
        """Names of the locks and semaphores that have holders (for inspection tools)."""
        return []

    @abstractmethod
    def lock_feed(self, name: str) -> Feed:
        """A feed notified when the lock may have become free."""

    # -- lifecycle --------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Release every resource of this process; idempotent."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``sharedkv stats`` (keys, bytes, revision, ...)."""
        return {"keys": self.count(), "revision": self.revision()}
