"""The user-facing store: one API over every backend.

:class:`Store` validates input, serializes values and builds the mapping protocol, compare-and-set
loops, subscriptions, queues and locks on top of a backend's byte-level primitives. It holds no
backend-specific logic. :class:`AsyncStore` is its asyncio face with the same method names.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from ._backends import open_backend, release_backend
from ._backends.base import Backend, Message
from ._codec import Codec, Serializer
from ._errors import ClosedError, InvalidKeyError
from ._lock import Lock, RLock, Semaphore
from ._messaging import CallbackRunner, Subscription, Watch, is_async_callable
from ._queue import Queue, close_buffered_queues, close_queues, open_queue

__all__ = ["AsyncStore", "Entry", "Store"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
_MISSING: Any = object()


@dataclass(frozen=True)
class Entry:
    """A value with its revision and expiry, as returned by :meth:`Store.get_entry`."""

    value: Any
    revision: int
    expires_at: float | None  # time.time() seconds, or None

    @property
    def ttl(self) -> float | None:
        """Seconds left before expiry, or None when the key does not expire."""
        return None if self.expires_at is None else max(0.0, self.expires_at - time.time())


def _check_ttl(ttl: float | None) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__qualname__}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl must be a positive, finite number of seconds, not {ttl!r}")
    return float(ttl)


def _check_revision(revision: int | None) -> int | None:
    if revision is None:
        return None
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise TypeError("if_revision must be an int")
    if revision < 0:
        raise ValueError("if_revision must be >= 0 (0 means: only if absent)")
    return revision


class Store:
    """One key-value store and message bus, shared by every thread and process that opens it.

    ``Store()`` is the process tree's default shared-memory store: children started in any
    way reach the same data with no wiring. Other addresses: ``"shm://NAME"`` (named, any process
    of this user), ``"file:///dir"`` (on disk), ``"memory://"`` (this process only),
    ``"redis://host:port/db"``.

    Options of shared-memory and file stores: ``read_cache`` (bytes each process may keep of
    values it read, never stale; default 32 MiB, 0 turns it off), ``history``/``history_bytes``
    (changes kept for ``watch(since=)``), ``buffer``/``buffer_bytes`` (messages kept per
    channel for slow subscribers). See docs/architecture.md.

    >>> store = Store("memory://")
    >>> store.set("config", {"lang": "en"})
    True
    >>> store.get("config")
    {'lang': 'en'}
    >>> store.incr("visits"), store.incr("visits", 10)
    (1, 11)
    >>> store.close()
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        serializer: Serializer | None = None,
        **options: Any,
    ) -> None:
        self._codec = Codec(serializer)
        self._decode = self._codec.decode
        self._decode_trailed = self._codec.decode_trailed
        self._options = options
        self._backend: Backend
        self._backend, self.url = open_backend(url, options)
        self._max_key = self._backend.max_key_bytes
        self._max_name = self._backend.max_name_bytes
        self._closed = False
        self._callbacks: CallbackRunner | None = None
        self._guard = threading.Lock()
        self._buffered_queues: weakref.WeakSet[Queue] = weakref.WeakSet()
        _open_stores.add(self)

    # -- identity, pickling, lifecycle ----------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        # A store travels as its address: the receiving process attaches to the same data.
        serializer = self._codec.serializer
        return (_reopen, (self.url, serializer, self._options))

    def __repr__(self) -> str:
        # The address may hold a password (redis://user:secret@host): never print it.
        shown = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", self.url)
        return f"<Store {shown!r}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def path(self) -> str | None:
        """The directory holding the store's files (shared-memory and file stores)."""
        return getattr(self._backend, "path", None)

    def close(self) -> None:
        """Release this handle; idempotent. Subscriptions and callbacks end. Buffered queue
        handles opened from it are closed first (raising what their ``close()`` raises, once
        the store is closed all the same)."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
            callbacks, self._callbacks = self._callbacks, None
            buffered_queues = list(self._buffered_queues)
        try:
            close_queues(buffered_queues)  # while the backend is open: they write what they hold
        finally:
            if callbacks is not None:
                callbacks.close()
            _open_stores.discard(self)
            backend, self._backend = self._backend, _CLOSED
            release_backend(backend)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> Backend:
        # After close() this is a stand-in that raises ClosedError on any use, so the hot
        # paths need no "is it closed?" test of their own.
        return self._backend

    def _key(self, key: str) -> str:
        # The fast path for the common key: ASCII (so its length is its size in bytes), no NUL.
        if type(key) is str and key.isascii() and 0 < len(key) <= self._max_key and "\0" not in key:
            return key
        return self._check_key_slow(key)

    def _check_key_slow(self, key: Any, what: str = "key", limit: int = 0) -> str:
        limit = limit or self._max_key
        if not isinstance(key, str):
            raise TypeError(f"{what}s must be str, not {type(key).__qualname__}")
        if not key:
            raise InvalidKeyError(f"{what}s must not be empty")
        if "\0" in key:
            raise InvalidKeyError(f"{what}s must not contain NUL characters")
        try:
            size = len(key.encode())
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(f"{what} {key[:40]!r} is not valid Unicode text: {exc}") from None
        if size > limit:
            raise InvalidKeyError(
                f"{what} is {size} bytes in UTF-8; this store allows at most {limit}"
            )
        return key

    def _name(self, name: str, what: str) -> str:
        """Check a channel, pattern, queue or lock name (a little shorter than a key)."""
        return self._check_key_slow(name, what, self._backend.max_name_bytes)

    # -- reading ---------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is absent (or expired)."""
        # The fast key check of _key(), inlined: this is the hottest call of the library.
        plain = type(key) is str and key.isascii() and 0 < len(key) <= self._max_key
        if not plain or "\0" in key:
            key = self._check_key_slow(key)
        return self._backend.get_decoded(key, self._decode_trailed, default)

    def get_entry(self, key: str) -> Entry | None:
        """The value with its revision and expiry, or ``None`` when absent."""
        rec = self._live().get_record(self._key(key))
        if rec is None:
            return None
        return Entry(self._codec.decode(rec.value), rec.revision, rec.expires_at)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The present keys among ``keys`` and their values, read at one instant."""
        names = [self._key(k) for k in keys]
        raws = self._live().get_many(names)
        decode = self._codec.decode
        return {k: decode(r) for k, r in zip(names, raws, strict=True) if r is not None}

    def get_all(self) -> dict[str, Any]:
        """A snapshot copy of every key and value, never a live view."""
        return dict(self.items())

    def keys(self, pattern: str = "*") -> list[str]:
        """Keys matching the glob ``pattern`` (``*``, ``?``, ``[abc]``), sorted."""
        return self._live().keys(_check_pattern(pattern))

    def items(self, pattern: str = "*") -> list[tuple[str, Any]]:
        """A snapshot of ``(key, value)`` pairs, sorted by key."""
        decode = self._codec.decode
        return [(k, decode(v)) for k, v in self._live().items(_check_pattern(pattern))]

    def values(self, pattern: str = "*") -> list[Any]:
        return [v for _, v in self.items(pattern)]

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or ``None`` if it never does. KeyError when absent."""
        entry = self._live().get_record(self._key(key))
        if entry is None:
            raise KeyError(key)
        return None if entry.expires_at is None else max(0.0, entry.expires_at - time.time())

    @property
    def revision(self) -> int:
        """The store-wide revision of the latest write."""
        return self._live().revision()

    # -- mapping protocol ------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        raw = self._live().get(self._key(key))
        if raw is None:
            raise KeyError(key)
        return self._codec.decode(raw)

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        if not self._live().delete(self._key(key)):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self._live().get(self._key(key)) is not None

    def __len__(self) -> int:
        return self._live().count()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    # -- writing ---------------------------------------------------------------------------
    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        if_revision: int | None = None,
        ephemeral: bool = False,
    ) -> bool:
        """Store ``value`` under ``key``. Returns whether it was written.

        ``ttl``: seconds until the key expires. ``if_revision``: write only if the key is still
        at that revision (0: only if absent). ``ephemeral``: the key is removed when this process
        exits or dies.
        """
        key = self._key(key)
        data = self._codec.encode(value)
        if ttl is not None:
            ttl = _check_ttl(ttl)
        if if_revision is not None:
            if_revision = _check_revision(if_revision)
        # self._backend rather than self._live(): the same object, one call less on a hot path.
        return bool(
            self._backend.set(key, data, ttl=ttl, if_revision=if_revision, ephemeral=ephemeral)
        )

    def add(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; returns whether it did."""
        return self.set(key, value, ttl=ttl, if_revision=0)

    def set_many(self, mapping: Mapping[str, Any], *, ttl: float | None = None) -> None:
        """Store every item at once: all are written, or (on any bad key or value) none."""
        if not isinstance(mapping, Mapping):
            raise TypeError("set_many() takes a mapping of keys to values")
        items = [(self._key(k), self._codec.encode(v)) for k, v in mapping.items()]
        self._live().set_many(items, ttl=_check_ttl(ttl))

    def delete(
        self, key: str, ignore_key_error: bool = True, *, if_revision: int | None = None
    ) -> bool:
        """Remove ``key``; returns whether it existed. With ``ignore_key_error=False`` a missing
        key raises ``KeyError``."""
        deleted = self._live().delete(self._key(key), if_revision=_check_revision(if_revision))
        if not deleted and not ignore_key_error:
            raise KeyError(key)
        return deleted

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (atomically); ``default`` or KeyError if absent."""
        raw = self._live().pop(self._key(key))
        if raw is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._codec.decode(raw)

    def incr(self, key: str, amount: int = 1) -> int:
        """Add ``amount`` to the integer at ``key`` (a missing key counts as 0), atomically."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"amount must be an int, not {type(amount).__qualname__}")
        return self._live().incr(self._key(key), amount)

    def decr(self, key: str, amount: int = 1) -> int:
        return self.incr(key, -amount)

    def update(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Replace the value with ``fn(old)`` atomically (``old`` is ``default`` when absent) and
        return the new value. ``fn`` may run more than once under contention; keep it pure."""
        key = self._key(key)
        backend = self._live()
        while True:
            rec = backend.get_record(key)
            old = default if rec is None else self._codec.decode(rec.value)
            new = fn(old)
            ttl = None
            if rec is not None and rec.expires_at is not None:
                ttl = rec.expires_at - time.time()
                if ttl <= 0:
                    continue  # expired under us: start again from "absent"
            revision = 0 if rec is None else rec.revision
            if backend.set(key, self._codec.encode(new), ttl=ttl, if_revision=revision):
                return new

    def clear(self) -> None:
        """Remove every key (messages, queues and locks are not affected)."""
        self._live().clear()

    def expire(self, key: str, ttl: float) -> bool:
        """Make ``key`` expire in ``ttl`` seconds; returns False when the key is absent."""
        return self._live().expire(self._key(key), _check_ttl(ttl) if ttl is not None else None)

    def persist(self, key: str) -> bool:
        """Remove the expiry of ``key``; returns False when the key is absent."""
        return self._live().expire(self._key(key), None)

    # -- messaging -------------------------------------------------------------------------
    def publish(self, channel: str, data: Any) -> int:
        """Send ``data`` to every subscriber of ``channel``, in any process; returns how many
        subscriptions it reached. With no subscriber it returns 0 at once, without even
        serializing ``data`` (so a value that cannot be serialized goes unnoticed there)."""
        # The fast name check of _key(), inlined: publish is on the path of every message.
        plain = type(channel) is str and channel.isascii() and 0 < len(channel) <= self._max_name
        if not plain or "\0" in channel:
            channel = self._name(channel, "channel")
        backend = self._backend
        if not backend.has_subscribers(channel):
            return 0  # nobody listens: not even worth pickling the message
        return backend.publish(channel, self._codec.encode(data))

    def subscribe(self, *patterns: str) -> Subscription:
        """A subscription to channels matching any of ``patterns`` (globs)."""
        return self._subscription(self._patterns(patterns), callbacks=False)

    def _patterns(self, patterns: tuple[str, ...]) -> tuple[str, ...]:
        if not patterns:
            raise TypeError("subscribe() needs at least one channel or pattern")
        return tuple(_check_pattern(self._name(p, "pattern")) for p in patterns)

    def _subscription(self, patterns: tuple[str, ...], callbacks: bool) -> Subscription:
        backend = self._live()
        feed = backend.subscribe(patterns, callbacks=callbacks)
        on_gap = getattr(backend, "add_dropped", lambda count: None)
        return Subscription(feed, self._codec, patterns, on_gap)

    def watch(self, pattern: str = "*", since: int | None = None) -> Watch:
        """Changes to keys matching ``pattern``: set, delete and expire events with revisions.

        ``since``: first replay the retained changes after that revision (or raise
        :class:`~sharedkv.RevisionTooOldError`), so a watcher that reconnects misses nothing.
        """
        pattern = _check_pattern(self._name(pattern, "pattern"))
        return Watch(self._live().watch(pattern, _check_revision(since)), self._codec, pattern)

    def on_message(self, *patterns: str) -> Callable[[F], F]:
        """Decorator: call the function with each :class:`~sharedkv.Message` on ``patterns``.

        Sync callbacks run on the ``sharedkv-callbacks`` thread; async ones on the event loop
        that registered them (or the one running :meth:`start_receive_loop`)."""
        return self._register_callback(patterns, lambda message: message)

    def on_subscriber_receive(self, channel: str) -> Callable[[F], F]:
        """The origin's decorator: the callback receives only each message's data."""
        return self._register_callback((channel,), _message_data)

    def _register_callback(
        self, patterns: tuple[str, ...], transform: Callable[[Message], Any]
    ) -> Callable[[F], F]:
        checked = self._patterns(patterns)
        runner = self._callback_runner()  # a closed store fails here, before decorating

        def decorator(func: F) -> F:
            if not callable(func):
                raise TypeError("the decorated object must be callable")
            # A sync callback gets a subscription woken on the backend's callback thread, when
            # it has one, so that the thread receiving the wake-up runs the callback itself.
            subscription = self._subscription(checked, callbacks=not is_async_callable(func))
            runner.add(subscription, func, transform)
            return func

        return decorator

    def _callback_runner(self) -> CallbackRunner:
        with self._guard:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            if self._callbacks is None:
                self._callbacks = CallbackRunner()
            return self._callbacks

    async def start_receive_loop(self) -> None:
        """Run this process's async callbacks on the running event loop until the store closes
        (or the task is cancelled)."""
        await self._callback_runner().run_loop()

    # -- queues and locks --------------------------------------------------------------------
    def queue(self, name: str, maxsize: int = 0, *, buffer: int = 0) -> Queue:
        """The named cross-process FIFO queue (``maxsize`` 0: unbounded).

        With ``buffer`` > 0 the handle holds back up to that many items on each side, as
        ``multiprocessing.Queue`` does: ``put`` returns before the item is written (a feeder
        thread writes batches; ``flush()`` waits for it), ``get`` takes a batch at once. See
        :class:`~sharedkv.Queue` and docs/architecture.md for what that changes."""
        queue = open_queue(
            self._live(), self._codec, self._name(name, "queue name"), maxsize, buffer
        )
        if queue.buffer:
            with self._guard:
                self._buffered_queues.add(queue)
        return queue

    def lock(self, name: str, timeout: float | None = None) -> Lock:
        """A lock across threads and processes, released if its holder's process dies."""
        return Lock(self._live(), self._name(name, "lock name"), timeout)

    def rlock(self, name: str, timeout: float | None = None) -> RLock:
        return RLock(self._live(), self._name(name, "lock name"), timeout)

    def semaphore(self, name: str, value: int = 1, timeout: float | None = None) -> Semaphore:
        return Semaphore(self._live(), self._name(name, "lock name"), value, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters: keys, bytes used, revision, messages published and dropped, locks..."""
        return self._live().stats()


class _ClosedBackend:
    """Stands in for the backend of a closed store: every use raises ClosedError."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # introspection (copy, pickle, doctest) is not "use"
            raise AttributeError(name)
        raise ClosedError("the store is closed")


_CLOSED: Any = _ClosedBackend()


def _message_data(message: Message) -> Any:
    return message.data


def _check_pattern(pattern: str) -> str:
    if not isinstance(pattern, str):
        raise TypeError(f"patterns must be str, not {type(pattern).__qualname__}")
    if not pattern:
        raise ValueError("a pattern must not be empty (use '*' for everything)")
    if pattern.count("[") != pattern.count("]"):
        raise ValueError(f"bad glob pattern {pattern!r}: unbalanced brackets")
    return pattern


def _reopen(url: str, serializer: Serializer, options: dict[str, Any]) -> Store:
    return Store(url, serializer=serializer, **options)


_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # A clean exit releases everything: buffered queue handles write what they hold (also those
    # whose store was dropped), ephemeral keys and locks go, and the last process of a tree
    # removes the store's files.
    close_buffered_queues()
    for store in list(_open_stores):
        with contextlib.suppress(Exception):
            store.close()


class AsyncStore:
    """The asyncio face of :class:`Store`: the same methods, awaited.

    Shared-memory operations take microseconds, so they run inline; only a backend that does
    network I/O (Redis) is driven from a worker thread. Waits (subscriptions, queues, locks) are
    native to the event loop and block no thread.
    """

    def __init__(self, url: str | Store | None = None, **kwargs: Any) -> None:
        self.store = url if isinstance(url, Store) else Store(url, **kwargs)
        self._blocking = bool(getattr(self.store.backend, "blocking_io", False))
        self._executor: Any = None

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._blocking:
            return func(*args, **kwargs)
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sharedkv-async")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(func, *args, **kwargs))

    # Key-value operations: the same signatures as Store, awaited.
    async def get(self, key: str, default: Any = None) -> Any:
        return await self._run(self.store.get, key, default)

    async def get_entry(self, key: str) -> Entry | None:
        return await self._run(self.store.get_entry, key)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        return await self._run(self.store.get_many, list(keys))

    async def get_all(self) -> dict[str, Any]:
        return await self._run(self.store.get_all)

    async def keys(self, pattern: str = "*") -> list[str]:
        return await self._run(self.store.keys, pattern)

    async def items(self, pattern: str = "*") -> list[tuple[str, Any]]:
        return await self._run(self.store.items, pattern)

    async def ttl(self, key: str) -> float | None:
        return await self._run(self.store.ttl, key)

    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        if_revision: int | None = None,
        ephemeral: bool = False,
    ) -> bool:
        return await self._run(
            self.store.set, key, value, ttl=ttl, if_revision=if_revision, ephemeral=ephemeral
        )

    async def add(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        return await self._run(self.store.add, key, value, ttl=ttl)

    async def set_many(self, mapping: Mapping[str, Any], *, ttl: float | None = None) -> None:
        await self._run(self.store.set_many, mapping, ttl=ttl)

    async def delete(
        self, key: str, ignore_key_error: bool = True, *, if_revision: int | None = None
    ) -> bool:
        return await self._run(self.store.delete, key, ignore_key_error, if_revision=if_revision)

    async def pop(self, key: str, default: Any = _MISSING) -> Any:
        return await self._run(self.store.pop, key, default)

    async def incr(self, key: str, amount: int = 1) -> int:
        return await self._run(self.store.incr, key, amount)

    async def decr(self, key: str, amount: int = 1) -> int:
        return await self._run(self.store.decr, key, amount)

    async def update(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        return await self._run(self.store.update, key, fn, default)

    async def clear(self) -> None:
        await self._run(self.store.clear)

    async def expire(self, key: str, ttl: float) -> bool:
        return await self._run(self.store.expire, key, ttl)

    async def persist(self, key: str) -> bool:
        return await self._run(self.store.persist, key)

    async def publish(self, channel: str, data: Any) -> int:
        return await self._run(self.store.publish, channel, data)

    async def stats(self) -> dict[str, Any]:
        return await self._run(self.store.stats)

    @property
    def url(self) -> str:
        return self.store.url

    def subscribe(self, *patterns: str) -> Subscription:
        """A subscription: ``async for message in sub`` or ``await sub.get_async()``."""
        return self.store.subscribe(*patterns)

    def watch(self, pattern: str = "*", since: int | None = None) -> Watch:
        return self.store.watch(pattern, since)

    def on_message(self, *patterns: str) -> Callable[[F], F]:
        return self.store.on_message(*patterns)

    def queue(self, name: str, maxsize: int = 0, *, buffer: int = 0) -> Queue:
        return self.store.queue(name, maxsize, buffer=buffer)

    def lock(self, name: str, timeout: float | None = None) -> Lock:
        return self.store.lock(name, timeout)

    async def start_receive_loop(self) -> None:
        await self.store.start_receive_loop()

    async def close(self) -> None:
        self.store.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncStore {self.store.url!r}>"
