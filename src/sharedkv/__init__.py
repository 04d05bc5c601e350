"""sharedkv: one shared key-value store and pub/sub bus for every thread and process.

>>> import sharedkv
>>> with sharedkv.Store("memory://") as store:
...     store["greeting"] = "hello"
...     store.get("greeting")
'hello'
"""

from __future__ import annotations

from typing import Any

from ._backends.base import Change, Gap, LockInfo, Message
from ._codec import JSONSerializer, PickleSerializer, Serializer
from ._errors import (
    BackendError,
    BackendUnavailableError,
    ClosedError,
    InvalidKeyError,
    InvalidURLError,
    LockNotOwnedError,
    LockTimeoutError,
    MissingDependencyError,
    QueueEmpty,
    QueueFull,
    QueueWriteError,
    RevisionTooOldError,
    SerializationError,
    SharedKVError,
    StoreFullError,
    StoreNotFoundError,
    TimeoutError,
)
from ._lock import Lock, RLock, Semaphore
from ._messaging import Subscription, Watch
from ._queue import Queue
from ._store import AsyncStore, Entry, Store
from ._wait import DEFAULT_TIMEOUT

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncStore",
    "BackendError",
    "BackendUnavailableError",
    "Change",
    "ClosedError",
    "Entry",
    "Gap",
    "InvalidKeyError",
    "InvalidURLError",
    "JSONSerializer",
    "Lock",
    "LockInfo",
    "LockNotOwnedError",
    "LockTimeoutError",
    "Message",
    "MissingDependencyError",
    "PickleSerializer",
    "Queue",
    "QueueEmpty",
    "QueueFull",
    "QueueWriteError",
    "RLock",
    "RevisionTooOldError",
    "Semaphore",
    "SerializationError",
    "Serializer",
    "SharedKVError",
    "Store",
    "StoreFullError",
    "StoreNotFoundError",
    "Subscription",
    "TimeoutError",
    "Watch",
    "__version__",
    "shared_memory",
]

_default: Store | None = None


def __getattr__(name: str) -> Any:
    # ``sharedkv.shared_memory`` is the process tree's default store, created on first use.
    global _default
    if name == "shared_memory":
        if _default is None or _default.closed:
            _default = Store()
        return _default
    raise AttributeError(f"module 'sharedkv' has no attribute {name!r}")
