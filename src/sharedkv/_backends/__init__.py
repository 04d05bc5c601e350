"""Turning a store address into a backend.

Addresses:

* ``None``: the process tree's default store. The first process creates an unnamed shared-memory
  store and puts its address in ``SHAREDKV_STORE``, which every child inherits, however started.
* ``memory://``: private to this process.
* ``shm://NAME``: a named shared-memory store, for any process of this user on the machine
  (``?keep=1``: it outlives its last user until removed; ``?create=0``: attach only).
* ``file:///path/to/dir``: an LMDB store on disk that survives restarts (``?durable=1`` flushes
  every commit to disk).
* ``redis://`` and ``rediss://``: a Redis server (``pip install 'sharedkv[redis]'``).

One LMDB environment must not be opened twice by one process (closing either would drop the
other's locks), so shared-memory backends are shared per process and reference-counted.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .._errors import InvalidURLError, MissingDependencyError, StoreNotFoundError
from .base import Backend

__all__ = ["ENV_VAR", "Backend", "open_backend", "release_backend"]

ENV_VAR = "SHAREDKV_STORE"

_lock = threading.Lock()
_shared: dict[tuple[int, str], tuple[Backend, int]] = {}  # (pid, url) -> backend, users

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(query: dict[str, list[str]], name: str, default: bool) -> bool:
    values = query.pop(name, None)
    if not values:
        return default
    value = values[-1].lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidURLError(f"option {name}={values[-1]!r} must be 1/0, true/false, yes/no")


def open_backend(url: str | None, options: dict[str, Any]) -> tuple[Backend, str]:
    """The backend for ``url`` and the canonical address that reopens it elsewhere."""
    if url is None:
        return _open_default(options)
    if not isinstance(url, str):
        raise TypeError(f"a store address must be a str, not {type(url).__qualname__}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend(**_shm_tuning(options)), "memory://"
    if scheme in ("redis", "rediss", "unix"):
        try:
            from .redis import RedisBackend
        except ImportError as exc:
            if exc.name not in ("redis", "hiredis"):
                raise
            raise MissingDependencyError(
                "Redis stores need the redis extra: pip install 'sharedkv[redis]'"
            ) from exc
        backend: Backend = RedisBackend(url, **options)
        return backend, backend.url
    if scheme in ("shm", "file"):
        query = parse_qs(parts.query, keep_blank_values=True)
        kwargs = dict(options)
        kwargs["create"] = _flag(query, "create", bool(kwargs.get("create", True)))
        if scheme == "shm":
            name = unquote(parts.netloc + parts.path).strip("/") or None
            if name is None:
                raise InvalidURLError("shm:// needs a name, for example shm://myapp")
            kwargs["name"] = name
            kwargs["keep"] = _flag(query, "keep", bool(kwargs.get("keep", False)))
        else:
            path = unquote(parts.path)
            if parts.netloc not in ("", "localhost") or not path.startswith("/"):
                raise InvalidURLError(f"file URLs need an absolute path: file:///dir, not {url!r}")
            kwargs["path"] = path
            kwargs["durable"] = _flag(query, "durable", bool(kwargs.get("durable", False)))
        if query:
            raise InvalidURLError(f"unknown option(s) in {url!r}: {', '.join(sorted(query))}")
        return _shared_shm(kwargs)
    raise InvalidURLError(
        f"unsupported store address {url!r}: use shm://NAME, file:///path, memory:// or redis://"
    )


def _shm_tuning(options: dict[str, Any]) -> dict[str, Any]:
    allowed = ("history", "history_bytes", "buffer", "buffer_bytes")
    unknown = set(options) - set(allowed) - {"map_size", "keep", "create", "durable", "read_cache"}
    if unknown:
        raise TypeError(f"unknown store option(s): {', '.join(sorted(unknown))}")
    return {k: v for k, v in options.items() if k in allowed}


def _shared_shm(kwargs: dict[str, Any]) -> tuple[Backend, str]:
    from .shm import ShmBackend

    _shm_tuning({k: v for k, v in kwargs.items() if k not in ("name", "path")})
    with _lock:
        if kwargs.get("name") is None and kwargs.get("path") is None:
            backend = ShmBackend(**kwargs)  # a new unnamed store: nobody can share it yet
            _shared[(os.getpid(), backend.url)] = (backend, 1)
            return backend, backend.url
        if kwargs.get("path") is not None:
            url = f"file://{os.path.abspath(kwargs['path'])}"
        else:
            url = f"shm://{kwargs['name']}"
        key = (os.getpid(), url)
        entry = _shared.get(key)
        if entry is not None and not getattr(entry[0], "_closed", False):
            _shared[key] = (entry[0], entry[1] + 1)
            return entry[0], entry[0].url
        backend = ShmBackend(**kwargs)
        _shared[key] = (backend, 1)
        return backend, backend.url


def _after_fork_in_child() -> None:
    # The child inherits the parent's backend objects; they reopen themselves on first use
    # (see ShmBackend._check). Re-key them so that Store() in the child finds the same object
    # instead of opening the environment a second time in this process.
    global _lock
    _lock = threading.Lock()
    pid = os.getpid()
    for (old_pid, url), entry in list(_shared.items()):
        del _shared[(old_pid, url)]
        _shared[(pid, url)] = entry


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def release_backend(backend: Backend) -> None:
    """One user of ``backend`` is done; close it when it was the last one in this process."""
    with _lock:
        for key, (shared, users) in list(_shared.items()):
            if shared is backend:
                if users > 1:
                    _shared[key] = (shared, users - 1)
                    return
                del _shared[key]
                break
    backend.close()


def _open_default(options: dict[str, Any]) -> tuple[Backend, str]:
    from . import shm

    # Which store is "ours": one named in the environment on purpose comes first, then the
    # default store of our nearest ancestor, then whatever default the environment names.
    address = os.environ.get(ENV_VAR)
    candidates = [address] if address and not shm.is_unnamed(address) else []
    ancestor = shm.nearest_ancestor_store()
    if ancestor:
        candidates.append(ancestor)
    if address and address not in candidates:
        candidates.append(address)
    for candidate in candidates:
        try:
            backend, url = open_backend(_attach_only(candidate), options)
        except StoreNotFoundError:
            continue  # that tree has exited
        os.environ[ENV_VAR] = url
        return backend, url
    shm.sweep_stale()
    backend, url = _shared_shm({**options, "name": None})
    os.environ[ENV_VAR] = url
    return backend, url


def _attach_only(address: str) -> str:
    if address.startswith("shm://") and "create=" not in address:
        return address + ("&" if "?" in address else "?") + "create=0"
    return address
