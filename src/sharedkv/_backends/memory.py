"""The in-process reference backend (``memory://``): plain dicts behind one lock.

It shares nothing with other processes. It exists for tests, for single-process programs, and as
the reference the other backends are checked against: the same behaviour suite runs on all.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from .._codec import decode_int
from .._errors import ClosedError, RevisionTooOldError
from ._notify import glob_matches
from .base import Backend, Feed, Gap, HintedFeed, LockInfo, Record

__all__ = ["MemoryBackend"]


@dataclass
class _Channel:
    last: int = 0
    nbytes: int = 0
    log: deque[tuple[int, int, bytes]] = field(default_factory=deque)  # seq, msg id, payload


class MemoryBackend(Backend):
    def __init__(
        self,
        *,
        history: int = 4096,
        history_bytes: int = 32 << 20,
        buffer: int = 1024,
        buffer_bytes: int = 8 << 20,
    ) -> None:
        self.url = "memory://"
        self.max_key_bytes = 511
        self._lock = threading.RLock()
        self._data: dict[str, Record] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; stale entries are skipped
        self._rev = 0
        self._history_limit = history
        self._history: deque[tuple[int, str, str, bytes | None]] = deque()
        self._history_bytes_limit = history_bytes
        self._history_bytes = 0
        self._buffer = max(1, buffer)
        self._buffer_bytes = buffer_bytes
        self._channels: dict[str, _Channel] = {}
        self._msgid = 0
        self._dropped = 0
        self._queues: dict[str, deque[bytes]] = {}
        self._locks: dict[str, dict[int, LockInfo]] = {}  # name -> ident -> holder
        self._feeds: list[_MemFeed] = []
        self._timer: threading.Thread | None = None
        self._timer_cond = threading.Condition(self._lock)
        self._closed = False

    # -- helpers --------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise ClosedError("the store is closed")

    def _live(self, key: str) -> Record | None:
        rec = self._data.get(key)
        if rec is not None and rec.expires_at is not None and rec.expires_at <= time.time():
            self._expire_now()
            return None
        return rec

    def _changed(self, kind: str, key: str, value: bytes | None) -> int:
        self._rev += 1
        if self._history_limit > 0:
            self._history.append((self._rev, kind, key, value))
            self._history_bytes += len(key) + len(value or b"")
            while len(self._history) > 1 and (
                len(self._history) > self._history_limit
                or self._history_bytes > self._history_bytes_limit
            ):
                _, _, old_key, old_value = self._history.popleft()
                self._history_bytes -= len(old_key) + len(old_value or b"")
        self._wake("k", key)
        return self._rev

    def _wake(self, kind: str, name: str) -> None:
        for feed in list(self._feeds):
            if feed.kind == kind and glob_matches(feed.patterns, name) is not None:
                feed.hint(name)

    def _write(self, key: str, value: bytes, ttl: float | None) -> int:
        rev = self._changed("set", key, value)
        expires_at = None if ttl is None else time.time() + ttl
        self._data[key] = Record(value, rev, expires_at)
        if expires_at is not None:
            heapq.heappush(self._expiries, (expires_at, key))
            self._timer_cond.notify_all()
        return rev

    def _expire_now(self) -> None:
        now = time.time()
        while self._expiries and self._expiries[0][0] <= now:
            at, key = heapq.heappop(self._expiries)
            rec = self._data.get(key)
            if rec is not None and rec.expires_at == at:
                del self._data[key]
                self._changed("expire", key, None)

    # -- key-value ------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        rec = self.get_record(key)
        return None if rec is None else rec.value

    def get_record(self, key: str) -> Record | None:
        with self._lock:
            self._check()
            return self._live(key)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            self._check()
            return [None if (r := self._live(k)) is None else r.value for k in keys]

    def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        if_revision: int | None = None,
        ephemeral: bool = False,
    ) -> int:
        with self._lock:
            self._check()
            if if_revision is not None:
                rec = self._live(key)
                if (0 if rec is None else rec.revision) != if_revision:
                    return 0
            return self._write(key, value, ttl)

    def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None) -> int:
        with self._lock:
            self._check()
            rev = self._rev
            for key, value in items:
                rev = self._write(key, value, ttl)
            return rev

    def delete(self, key: str, *, if_revision: int | None = None) -> bool:
        with self._lock:
            self._check()
            rec = self._live(key)
            if rec is None or (if_revision is not None and rec.revision != if_revision):
                return False
            del self._data[key]
            self._changed("delete", key, None)
            return True

    def pop(self, key: str) -> bytes | None:
        with self._lock:
            self._check()
            rec = self._live(key)
            if rec is None:
                return None
            del self._data[key]
            self._changed("delete", key, None)
            return rec.value

    def incr(self, key: str, amount: int) -> int:
        with self._lock:
            self._check()
            rec = self._live(key)
            result = decode_int(None if rec is None else rec.value, repr(key)) + amount
            ttl = None
            if rec is not None and rec.expires_at is not None:
                ttl = rec.expires_at - time.time()
            self._write(key, str(result).encode(), ttl)
            return result

    def expire(self, key: str, ttl: float | None) -> bool:
        with self._lock:
            self._check()
            rec = self._live(key)
            if rec is None:
                return False
            if ttl is not None or rec.expires_at is not None:
                self._write(key, rec.value, ttl)
            return True

    def items(self, pattern: str | None = None) -> list[tuple[str, bytes]]:
        with self._lock:
            self._check()
            self._expire_now()
            return sorted(
                (k, r.value)
                for k, r in self._data.items()
                if pattern is None or fnmatchcase(k, pattern)
            )

    def count(self) -> int:
        with self._lock:
            self._check()
            self._expire_now()
            return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._check()
            for key in sorted(self._data):
                self._changed("delete", key, None)
            self._data.clear()
            self._expiries.clear()

    def revision(self) -> int:
        with self._lock:
            self._check()
            return self._rev

    # -- messaging ------------------------------------------------------------------------
    def publish(self, channel: str, payload: bytes) -> int:
        with self._lock:
            self._check()
            targets = [
                f for f in self._feeds if f.kind == "m" and glob_matches(f.patterns, channel)
            ]
            if not targets:
                return 0
            chan = self._channels.setdefault(channel, _Channel())
            chan.last += 1
            self._msgid += 1
            chan.log.append((chan.last, self._msgid, payload))
            chan.nbytes += len(payload)
            while len(chan.log) > 1 and (
                len(chan.log) > self._buffer or chan.nbytes > self._buffer_bytes
            ):
                chan.nbytes -= len(chan.log.popleft()[2])
        for feed in targets:
            feed.hint(channel)
        return len(targets)

    def subscribe(self, patterns: Iterable[str], *, callbacks: bool = False) -> Feed:
        with self._lock:
            self._check()
            return _MemMessageFeed(self, tuple(patterns))

    def watch(self, pattern: str, since: int | None) -> Feed:
        with self._lock:
            self._check()
            if since is not None and since < self._rev:
                oldest = self._history[0][0] if self._history else self._rev + 1
                if since + 1 < oldest:
                    raise RevisionTooOldError(
                        f"changes after revision {since} are no longer retained "
                        f"(the oldest retained is {oldest})",
                        oldest,
                    )
            feed = _MemWatchFeed(self, pattern, self._rev if since is None else since)
            self._ensure_timer()
        if since is not None:
            feed.hint(None)
        return feed

    def _ensure_timer(self) -> None:
        # Watchers must see "expire" events when a key's time comes, even if nobody writes.
        if self._timer is None:
            self._timer = threading.Thread(
                target=self._run_timer, name="sharedkv-memory-expiry", daemon=True
            )
            self._timer.start()

    def _run_timer(self) -> None:
        with self._lock:
            while not self._closed:
                self._expire_now()
                timeout = None
                if self._expiries:
                    timeout = max(0.0, self._expiries[0][0] - time.time())
                self._timer_cond.wait(timeout)

    # -- queues --------------------------------------------------------------------------
    def queue_put(self, name: str, item: bytes, maxsize: int) -> bool:
        with self._lock:
            self._check()
            q = self._queues.setdefault(name, deque())
            if maxsize > 0 and len(q) >= maxsize:
                return False
            q.append(item)
            self._wake("q", name)
            return True

    def queue_put_many(self, name: str, items: Sequence[bytes], maxsize: int) -> bool:
        with self._lock:
            self._check()
            q = self._queues.setdefault(name, deque())
            if maxsize > 0 and len(q) + len(items) > maxsize:
                return False
            q.extend(items)
            self._wake("q", name)
            return True

    def queue_get(self, name: str) -> bytes | None:
        with self._lock:
            self._check()
            q = self._queues.get(name)
            if not q:
                return None
            item = q.popleft()
            self._wake("q", name)
            return item

    def queue_get_many(self, name: str, max_items: int) -> list[bytes]:
        with self._lock:
            self._check()
            q = self._queues.get(name)
            if not q:
                return []
            taken = [q.popleft() for _ in range(min(max_items, len(q)))]
            self._wake("q", name)
            return taken

    def queue_size(self, name: str) -> int:
        with self._lock:
            self._check()
            return len(self._queues.get(name, ()))

    def queue_feed(self, name: str) -> Feed:
        with self._lock:
            self._check()
            return _MemFeed(self, "q", (name,))

    # -- locks ---------------------------------------------------------------------------
    def lock_acquire(self, name: str, limit: int, owner: LockInfo) -> bool:
        with self._lock:
            self._check()
            holders = self._locks.setdefault(name, {})
            if len(holders) >= limit:
                return False
            holders[owner.ident] = owner
            return True

    def lock_release(self, name: str, owner: LockInfo) -> bool:
        with self._lock:
            self._check()
            holders = self._locks.get(name, {})
            if holders.pop(owner.ident, None) is None:
                return False
            self._wake("l", name)
            return True

    def lock_owners(self, name: str) -> list[LockInfo]:
        with self._lock:
            self._check()
            return list(self._locks.get(name, {}).values())

    def lock_names(self) -> list[str]:
        with self._lock:
            return sorted(name for name, holders in self._locks.items() if holders)

    def lock_feed(self, name: str) -> Feed:
        with self._lock:
            self._check()
            return _MemFeed(self, "l", (name,))

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            feeds = list(self._feeds)
            self._timer_cond.notify_all()
        for feed in feeds:
            feed.close()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(timeout=5)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "url": self.url,
                "keys": self.count(),
                "revision": self._rev,
                "messages_published": self._msgid,
                "messages_dropped": self._dropped,
                "locks_held": sum(len(h) for h in self._locks.values()),
            }

    def add_dropped(self, count: int) -> None:
        with self._lock:
            self._dropped += count


class _MemFeed(HintedFeed):
    def __init__(self, backend: MemoryBackend, kind: str, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.backend = backend
        self.kind = kind
        self.patterns = patterns
        backend._feeds.append(self)

    def fetch(self) -> list[Any]:
        self.take_hints()
        return []

    def close(self) -> None:
        with self.backend._lock:
            if self in self.backend._feeds:
                self.backend._feeds.remove(self)
        super().close()


class _MemMessageFeed(_MemFeed):
    def __init__(self, backend: MemoryBackend, patterns: tuple[str, ...]) -> None:
        super().__init__(backend, "m", patterns)
        # Where each channel stood when we subscribed (see the shared-memory backend).
        self._cursors = {
            name: chan.last
            for name, chan in backend._channels.items()
            if glob_matches(patterns, name) is not None
        }

    def fetch(self) -> list[Any]:
        dirty, everything = self.take_hints()
        if not dirty and not everything:
            return []
        events: list[tuple[int, Any]] = []
        with self.backend._lock:
            if everything:
                dirty = list(self.backend._channels)
            for channel in dirty:
                pattern = glob_matches(self.patterns, channel)
                chan = self.backend._channels.get(channel)
                if pattern is None or chan is None or not chan.log:
                    continue
                cursor = self._cursors.get(channel, 0)
                first = chan.log[0][0]
                if cursor + 1 < first:
                    events.append((0, Gap(channel, cursor + 1, first - 1)))
                shown = None if pattern == channel else pattern
                for seq, msgid, payload in chan.log:
                    if seq > cursor:
                        events.append((msgid, (channel, payload, seq, shown)))
                self._cursors[channel] = chan.last
        events.sort(key=lambda e: e[0])
        return [e for _, e in events]


class _MemWatchFeed(_MemFeed):
    def __init__(self, backend: MemoryBackend, pattern: str, cursor: int) -> None:
        super().__init__(backend, "k", (pattern,))
        self._cursor = cursor

    def fetch(self) -> list[Any]:
        dirty, everything = self.take_hints()
        if not dirty and not everything:
            return []
        pattern = self.patterns[0]
        out: list[Any] = []
        with self.backend._lock:
            for rev, kind, key, value in self.backend._history:
                if rev <= self._cursor:
                    continue
                self._cursor = rev
                if fnmatchcase(key, pattern):
                    out.append((kind, key, rev, value))
        return out
