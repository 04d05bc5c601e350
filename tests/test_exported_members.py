"""The public API is what sharedkv.__all__ says, and nothing private leaks into it."""

from __future__ import annotations

import sharedkv

EXPECTED = {
    "AsyncStore", "BackendError", "BackendUnavailableError", "Change", "ClosedError",
    "DEFAULT_TIMEOUT", "Entry", "Gap", "InvalidKeyError", "InvalidURLError", "JSONSerializer",
    "Lock", "LockInfo", "LockNotOwnedError", "LockTimeoutError", "Message",
    "MissingDependencyError", "PickleSerializer", "Queue", "QueueEmpty", "QueueFull",
    "QueueWriteError", "RLock", "RevisionTooOldError", "Semaphore", "SerializationError", "Serializer", "SharedKVError",
    "Store", "StoreFullError", "StoreNotFoundError", "Subscription", "TimeoutError", "Watch",
    "__version__", "shared_memory",
}  # fmt: skip


def test_public_names_are_pinned() -> None:
    assert len(sharedkv.__all__) == len(set(sharedkv.__all__))
    assert set(sharedkv.__all__) == EXPECTED
    for name in EXPECTED - {"__version__", "shared_memory"}:  # shared_memory opens a store
        obj = getattr(sharedkv, name)
        if isinstance(obj, type):
            assert obj.__module__.startswith("sharedkv."), name


def test_every_error_is_a_sharedkv_error() -> None:
    errors = [
        getattr(sharedkv, n) for n in sharedkv.__all__ if n.endswith(("Error", "Empty", "Full"))
    ]
    assert errors
    for error in errors:
        assert issubclass(error, sharedkv.SharedKVError), error
    assert issubclass(sharedkv.TimeoutError, TimeoutError)
    assert issubclass(sharedkv.InvalidKeyError, ValueError)
    assert issubclass(sharedkv.ClosedError, RuntimeError)
