"""Locks and semaphores owned by a process, released when that process dies.

On the shared-memory backend a holder is identified by its pid and start time; a waiter that
finds the holder gone (the operating system says so) takes the lock over, so a lock held by a
process killed with SIGKILL is free for the next waiter within :data:`RECHECK` seconds, with no
lease or TTL to tune. Waiting is woken by the release itself; ``RECHECK`` only bounds how long a
death can go unnoticed.

Fairness: none is promised. Waiters race when a lock is released, as with ``threading.Lock``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING

from ._backends.base import LockInfo
from ._errors import LockNotOwnedError, LockTimeoutError
from ._wait import resolve_timeout, retry_until, retry_until_async

if TYPE_CHECKING:
    from ._backends.base import Backend, Feed

__all__ = ["Lock", "RLock", "Semaphore"]

#: longest sleep of a waiter between checks that the holder is still alive, in seconds
RECHECK = 0.25

_idents = itertools.count(int.from_bytes(secrets.token_bytes(4), "little") << 20)


class Semaphore:
    """At most ``value`` holders at once, across threads and processes.

    ``acquire(timeout=...)`` returns ``False`` when time runs out; ``with`` raises
    :class:`~sharedkv.LockTimeoutError` instead.
    """

    def __init__(self, backend: Backend, name: str, value: int, timeout: float | None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("a semaphore's value must be an int")
        if value < 1:
            raise ValueError("a semaphore's value must be >= 1")
        self.name = name
        self.value = value
        self.timeout = resolve_timeout(timeout)
        self._backend = backend
        self._feed: Feed | None = None
        self._held: list[LockInfo] = []  # this handle's acquisitions, newest last
        self._guard = threading.Lock()

    def _holder(self) -> LockInfo:
        thread = threading.current_thread()
        return LockInfo(
            pid=os.getpid(),
            thread_id=threading.get_ident(),
            thread_name=thread.name,
            since=time.time(),
            ident=next(_idents),
        )

    def _try(self) -> LockInfo | None:
        holder = self._holder()
        if self._backend.lock_acquire(self.name, self.value, holder):
            with self._guard:
                self._held.append(holder)
            return holder
        return None

    def _wake_feed(self) -> Feed:
        if self._feed is None:
            self._feed = self._backend.lock_feed(self.name)
        return self._feed

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if self._try() is not None:
            return True
        if not blocking:
            return False
        limit = self.timeout if timeout is None else resolve_timeout(timeout)
        return retry_until(self._try, self._wake_feed(), limit, RECHECK) is not None

    async def acquire_async(self, timeout: float | None = None) -> bool:
        if self._try() is not None:
            return True
        limit = self.timeout if timeout is None else resolve_timeout(timeout)
        return await retry_until_async(self._try, self._wake_feed(), limit, RECHECK) is not None

    def release(self) -> None:
        """Give back the newest acquisition made by this thread through this handle."""
        me = threading.get_ident()
        with self._guard:
            mine = [h for h in self._held if h.thread_id == me]
            if not mine:
                raise LockNotOwnedError(
                    f"{type(self).__name__.lower()} {self.name!r} is not held by this thread"
                )
            holder = mine[-1]
            self._held.remove(holder)
        if not self._backend.lock_release(self.name, holder):
            raise LockNotOwnedError(
                f"{self.name!r} was no longer held: it was taken over after this process "
                "was presumed dead"
            )

    def owners(self) -> list[LockInfo]:
        """Who holds it now: pid, thread, since when."""
        return self._backend.lock_owners(self.name)

    def locked(self) -> bool:
        return len(self.owners()) >= self.value

    def __enter__(self) -> Semaphore:
        if not self.acquire():
            raise LockTimeoutError(f"could not acquire {self.name!r} within {self.timeout} s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Semaphore:
        if not await self.acquire_async():
            raise LockTimeoutError(f"could not acquire {self.name!r} within {self.timeout} s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()
            self._feed = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} value={self.value}>"


class Lock(Semaphore):
    """A mutual-exclusion lock across threads and processes; not re-entrant."""

    def __init__(self, backend: Backend, name: str, timeout: float | None) -> None:
        super().__init__(backend, name, 1, timeout)

    def owner(self) -> LockInfo | None:
        """The holder (pid, thread id and name, since when), or ``None`` when free."""
        owners = self.owners()
        return owners[0] if owners else None


class RLock(Lock):
    """A re-entrant lock: the thread holding it may acquire it again (release as many times)."""

    def __init__(self, backend: Backend, name: str, timeout: float | None) -> None:
        super().__init__(backend, name, timeout)
        self._depth: dict[int, int] = {}

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        me = threading.get_ident()
        if self._depth.get(me):
            self._depth[me] += 1
            return True
        if super().acquire(blocking, timeout):
            self._depth[me] = 1
            return True
        return False

    def release(self) -> None:
        me = threading.get_ident()
        depth = self._depth.get(me, 0)
        if depth > 1:
            self._depth[me] = depth - 1
            return
        if depth == 0:
            raise LockNotOwnedError(f"rlock {self.name!r} is not held by this thread")
        del self._depth[me]
        super().release()
