"""The one error tree of sharedkv.

Every error the library raises on purpose derives from :class:`SharedKVError`, and also from the
standard exception a Python user would reach for first, so ``except ValueError`` or
``except TimeoutError`` keep working::

    SharedKVError
    ├── InvalidKeyError           (ValueError)    key empty, too long, or containing NUL
    ├── InvalidURLError           (ValueError)    a store address that cannot be parsed
    ├── SerializationError        (TypeError)     a value that cannot be encoded or decoded
    ├── ClosedError               (RuntimeError)  use of a closed store, subscription or queue
    ├── StoreNotFoundError        (LookupError)   an address that names no live store
    ├── MissingDependencyError    (ImportError)   an optional extra is not installed
    ├── BackendError                              the storage engine failed
    │   ├── StoreFullError                        the store's memory or disk is exhausted
    │   └── BackendUnavailableError (ConnectionError)  a server cannot be reached in time
    ├── TimeoutError              (TimeoutError)  a wait ran out
    │   └── LockTimeoutError                      ... while acquiring a lock or semaphore
    ├── LockNotOwnedError         (RuntimeError)  release of a lock this thread does not hold
    ├── RevisionTooOldError                       watch(since=...) older than the retained history
    ├── QueueEmpty                (queue.Empty)   get_nowait() on an empty queue
    ├── QueueFull                 (queue.Full)    put_nowait() on a full bounded queue
    └── QueueWriteError                           items a buffered queue handle held were lost

A wrong *type* of argument (a key that is not ``str``, a ttl that is not a number) raises the
plain built-in ``TypeError``, as the standard library does.
"""

from __future__ import annotations

import builtins
import queue

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "ClosedError",
    "InvalidKeyError",
    "InvalidURLError",
    "LockNotOwnedError",
    "LockTimeoutError",
    "MissingDependencyError",
    "QueueEmpty",
    "QueueFull",
    "QueueWriteError",
    "RevisionTooOldError",
    "SerializationError",
    "SharedKVError",
    "StoreFullError",
    "StoreNotFoundError",
    "TimeoutError",
]


class SharedKVError(Exception):
    """Base class of every error sharedkv raises on purpose."""


class InvalidKeyError(SharedKVError, ValueError):
    """A key is empty, longer than the backend allows, or contains a NUL character."""


class InvalidURLError(SharedKVError, ValueError):
    """A store address could not be understood."""


class SerializationError(SharedKVError, TypeError):
    """A value could not be serialized, or stored bytes could not be decoded."""


class ClosedError(SharedKVError, RuntimeError):
    """The store, subscription or queue was closed and cannot be used any more."""


class StoreNotFoundError(SharedKVError, LookupError):
    """The address names no live store."""


class MissingDependencyError(SharedKVError, ImportError):
    """An optional dependency is missing; the message names the install command."""


class BackendError(SharedKVError):
    """The storage engine failed."""


class StoreFullError(BackendError):
    """The store's memory (or disk) is exhausted; the failed write changed nothing."""


class BackendUnavailableError(BackendError, ConnectionError):
    """A store server could not be reached within the configured time."""


class TimeoutError(SharedKVError, builtins.TimeoutError):
    """A blocking call ran out of time."""


class LockTimeoutError(TimeoutError):
    """A lock or semaphore could not be acquired in time."""


class LockNotOwnedError(SharedKVError, RuntimeError):
    """A lock was released by a thread or process that does not hold it."""


class RevisionTooOldError(SharedKVError):
    """``watch(since=...)`` asked for changes older than the retained history.

    ``oldest`` is the oldest revision still retained: watch from there (after reloading state)."""

    def __init__(self, message: str, oldest: int) -> None:
        super().__init__(message)
        self.oldest = oldest


class QueueEmpty(SharedKVError, queue.Empty):
    """``get_nowait()`` found the queue empty."""


class QueueFull(SharedKVError, queue.Full):
    """``put_nowait()`` found the bounded queue full."""


class QueueWriteError(SharedKVError):
    """Items a buffered queue handle held were lost: put on it and never written (its feeder
    failed, or ``close()`` found no room for them in time), or taken by it and not put back.

    Raised by the handle's next ``put``, ``flush`` or ``close``, once per loss; ``lost`` is the
    number of items, and ``__cause__`` the error that lost them."""

    def __init__(self, message: str, lost: int) -> None:
        super().__init__(message)
        self.lost = lost
