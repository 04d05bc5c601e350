"""The boundary: who can read a store's files, what decoding may do, what malformed input does,
and how big a store can get.

Set ``SHAREDKV_SLOW=1`` to run the tests marked ``slow`` (a 256 MiB value, a million keys).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sharedkv
from sharedkv import JSONSerializer, SerializationError, SharedKVError
from sharedkv._backends import shm

from .conftest import BACKENDS, unique_name

slow = pytest.mark.skipif(not os.environ.get("SHAREDKV_SLOW"), reason="set SHAREDKV_SLOW=1")

# The shared-memory record trailer (see src/sharedkv/_backends/shm.py): revision, expiry, flags.
TRAILER = struct.Struct("<QdB")


# -- files are private to their user ------------------------------------------------------------
def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _assert_private(directory: str) -> None:
    assert _mode(directory) == 0o700, f"{directory}: {oct(_mode(directory))}"
    entries = list(Path(directory).rglob("*"))
    assert {p.name for p in entries} >= {"data.mdb", "lock.mdb", "attach.lock", "info.json"}
    for path in entries:
        expected = 0o700 if path.is_dir() else 0o600
        assert _mode(path) == expected, f"{path}: {oct(_mode(path))}"


def test_shm_store_files_are_private() -> None:
    with sharedkv.Store(f"shm://{unique_name('perm')}") as store:
        store.set("k", 1)
        store.subscribe("c").close()
        assert store.path is not None
        root = os.path.dirname(store.path)
        assert root == shm.root_dir() and os.path.basename(root) == f"sharedkv-{os.getuid()}"
        assert _mode(root) == 0o700
        assert os.lstat(root).st_uid == os.getuid()
        _assert_private(store.path)


def test_file_store_files_are_private(tmp_path: Path) -> None:
    with sharedkv.Store(f"file://{tmp_path}/state") as store:
        store.set("k", 1)
        _assert_private(str(tmp_path / "state"))


_PERMISSIVE = """
import os, sharedkv
os.umask(0)
s = sharedkv.Store({url!r})
s.set("k", 1)
print(s.path, flush=True)
input()
"""


def test_files_are_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    for url in (f"shm://{unique_name('umask')}", f"file://{tmp_path}/state"):
        with subprocess.Popen(
            [sys.executable, "-c", _PERMISSIVE.format(url=url)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            path = proc.stdout.readline().strip()
            try:
                _assert_private(path)
            finally:
                proc.communicate("\n", timeout=30)


def test_a_loosened_root_is_made_private_again() -> None:
    root = shm.root_dir()
    with sharedkv.Store(f"shm://{unique_name('root')}"):
        os.chmod(root, 0o755)
        try:
            with sharedkv.Store(f"shm://{unique_name('root')}"):
                assert _mode(root) == 0o700
        finally:
            os.chmod(root, 0o700)


# -- the safe serializer never runs code ----------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command: what a hostile writer would store."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.command,))


@pytest.fixture(params=[b for b in BACKENDS if b != "memory"])
def two_stores(request: pytest.FixtureRequest) -> Iterator[tuple[sharedkv.Store, sharedkv.Store]]:
    """The same data opened twice: with the default (pickle) and with the safe serializer."""
    if request.param == "shm":
        url = f"shm://{unique_name('safe')}"
    else:
        pytest.importorskip("redis")
        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?namespace={unique_name('safe')}"
    unsafe = sharedkv.Store(url)
    safe = sharedkv.Store(url, serializer=JSONSerializer())
    yield unsafe, safe
    if not url.startswith("shm"):
        unsafe.clear()
    safe.close()
    unsafe.close()


def test_safe_store_refuses_pickles(two_stores: tuple[sharedkv.Store, sharedkv.Store]) -> None:
    unsafe, safe = two_stores
    unsafe.set("p", {"a": (1, 2)})
    unsafe.set("n", 42)  # integers are plain decimal for every serializer
    safe.set("j", {"a": [1, 2]})
    for read in (
        lambda: safe.get("p"),
        lambda: safe.get_entry("p"),
        lambda: safe.get_many(["p", "j"]),
        safe.get_all,
        safe.items,
        lambda: safe["p"],
        lambda: safe.update("p", lambda old: old),
    ):
        with pytest.raises(SerializationError, match="another serializer"):
            read()
    assert safe.get("n") == 42 and safe.get("j") == {"a": [1, 2]}
    with pytest.raises(SerializationError):
        unsafe.get("j")  # and the other way round: a store decodes only its own format
    unsafe.queue("q").put({"x": 1})
    with pytest.raises(SerializationError):
        safe.queue("q").get(timeout=5)


def test_malicious_pickle_never_runs(
    two_stores: tuple[sharedkv.Store, sharedkv.Store], tmp_path: Path
) -> None:
    unsafe, safe = two_stores
    marker = tmp_path / "owned"
    payload = _Payload(f"touch {marker}")
    sub = safe.subscribe("evil")
    with safe.watch("evil*") as watch:
        unsafe.set("evil", payload)
        unsafe.set_many({"evil2": payload})
        unsafe.queue("evilq").put(payload)
        unsafe.publish("evil", payload)
        for read in (
            lambda: safe.get("evil"),
            lambda: safe.get_entry("evil2"),
            lambda: safe.pop("evil"),
            lambda: safe.queue("evilq").get(timeout=5),
            lambda: sub.get(timeout=5),
            lambda: watch.get(timeout=5),
        ):
            with pytest.raises(SerializationError):
                read()
        assert not marker.exists()
    sub.close()
    # The payload is live: the pickle store would have run it. This is why the safe serializer
    # exists, and why pickle stores must only hold data from trusted writers.
    unsafe.get("evil2")
    assert marker.exists()


def test_unknown_tagged_json_is_refused(two_stores: tuple[sharedkv.Store, sharedkv.Store]) -> None:
    _, safe = two_stores
    safe.set("t", (1, 2))
    assert safe.get("t") == (1, 2)
    forged = JSONSerializer()
    forged.register(complex, "complex", lambda c: [c.real, c.imag], lambda v: complex(*v))
    with sharedkv.Store(safe.url, serializer=forged) as other:
        other.set("c", 1 + 2j)
    with pytest.raises(SerializationError, match="unknown registered type"):
        safe.get("c")


# -- fuzzing what is decoded ------------------------------------------------------------------
FUZZ_SECONDS = 3.0  # per test


def _fuzz_rounds(seconds: float = FUZZ_SECONDS) -> Iterator[int]:
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        yield i
        i += 1


def _random_bytes(rng: random.Random, longest: int = 40) -> bytes:
    return rng.randbytes(
        rng.choice([0, 1, 2, 7, 8, 9, 16, 17, 18, 29, 30, 31, rng.randrange(longest)])
    )


def _plausible_value(rng: random.Random) -> bytes:
    """Random bytes that start like a stored value: a pickle, a decimal, a JSON tag, or not."""
    body = rng.randbytes(rng.randrange(30))
    head = rng.choice([b"\x80", b"\x80\x05", b"-", b"7", b"J", b"J{", bytes([rng.randrange(256)])])
    return head + body  # never empty: see test_malformed_values_give_clear_errors


def _put_raw(store: sharedkv.Store, db_name: str, key: bytes, value: bytes) -> None:
    backend: Any = store.backend
    with backend._env.begin(write=True) as txn:
        txn.put(key, value, db=getattr(backend, db_name))


# What a malformed stored value may legitimately cause: a clear library error, or the error an
# operation documents (a missing key, incr of a non-integer).
ALLOWED: tuple[type[BaseException], ...] = (SharedKVError, KeyError, TypeError)


def _key_operations(store: sharedkv.Store, key: str, incr: bool = True) -> list[Callable[[], Any]]:
    return [
        lambda: store.get(key),
        lambda: store.get_entry(key),
        lambda: store.get_many([key, "other"]),
        store.get_all,
        store.keys,
        lambda: len(store),
        lambda: key in store,
        lambda: store.incr(key) if incr else None,
        lambda: store.pop(key, None),
        lambda: store.expire(key, 100),
        lambda: store.ttl(key),
        lambda: store.update(key, lambda old: 1),
        lambda: store.set(key, 2, if_revision=5),
    ]


def _still_usable(store: sharedkv.Store, key: str) -> None:
    """Whatever was stored under ``key``, the store can overwrite and remove it, and works."""
    assert store.set(key, "good") is True
    assert store.get(key) == "good"
    assert store.delete(key) is True
    assert store.set("canary", 1) and store.get("canary") == 1
    assert store.get("kept") == {"kept": True}


@pytest.mark.parametrize("serializer", [None, JSONSerializer()], ids=["pickle", "json"])
def test_fuzzed_values_give_clear_errors(serializer: Any) -> None:
    rng = random.Random(8)
    with sharedkv.Store(f"shm://{unique_name('fz')}", serializer=serializer) as store:
        store.set("kept", {"kept": True})
        rounds = 0
        for i in _fuzz_rounds():
            rounds += 1
            key = f"k{i % 4}"
            expiry = rng.choice([0.0, 0.0, time.time() + 100])
            record = _plausible_value(rng) + TRAILER.pack(1, expiry, int(expiry > 0))
            _put_raw(store, "_data", key.encode(), record)
            for operation in rng.sample(_key_operations(store, key, incr=False), 4):
                with contextlib.suppress(*ALLOWED):
                    operation()
            if i % 50 == 0:
                _still_usable(store, key)
        assert rounds > 50
        for i in range(4):
            store.delete(f"k{i}")
        _still_usable(store, "k0")


@pytest.mark.parametrize("raw", [b"", b"-}", b"12x", b"7" * 5000 + b"\xff"])
def test_malformed_values_give_clear_errors(raw: bytes) -> None:
    with sharedkv.Store(f"shm://{unique_name('fz')}") as store:
        _put_raw(store, "_data", b"n", raw + TRAILER.pack(1, 0.0, 0))
        with pytest.raises(SerializationError):
            store.get("n")
        with pytest.raises(ALLOWED):
            store.incr("n")


def test_fuzzed_records_give_clear_errors() -> None:
    rng = random.Random(9)
    with sharedkv.Store(f"shm://{unique_name('fz')}") as store:
        store.set("kept", {"kept": True})
        for i in _fuzz_rounds():
            key = f"k{i % 4}"
            _put_raw(store, "_data", key.encode(), _random_bytes(rng))
            for operation in rng.sample(_key_operations(store, key), 4):
                with contextlib.suppress(*ALLOWED):
                    operation()
            _still_usable(store, key)


def test_fuzzed_history_gives_clear_errors() -> None:
    rng = random.Random(10)
    with sharedkv.Store(f"shm://{unique_name('fz')}") as store:
        store.set("kept", {"kept": True})
        for _ in _fuzz_rounds():
            start = store.revision
            for j in range(3):
                store.set(f"w{j}", j)
            revision = rng.randrange(start + 1, store.revision + 1)
            _put_raw(store, "_hist", struct.pack(">Q", revision), _random_bytes(rng))
            with store.watch("*", since=start) as watch:
                for _ in range(4):
                    try:
                        watch.get(timeout=0.2)
                    except sharedkv.TimeoutError:
                        break
                    except SharedKVError:
                        pass
            assert store.get("kept") == {"kept": True}


def test_fuzzed_messages_give_clear_errors() -> None:
    rng = random.Random(11)
    with sharedkv.Store(f"shm://{unique_name('fz')}") as store:
        sub = store.subscribe("c")
        published = 0
        for i in _fuzz_rounds():
            store.publish("c", i)
            published += 1
            # Overwrite the message just published (or add a malformed key beside it).
            seq = struct.pack(">Q", published)
            key = b"c\0" + (seq if rng.random() < 0.7 else _random_bytes(rng, 12))
            _put_raw(store, "_msgs", key, _random_bytes(rng))
            store.publish("c", "next")
            published += 1
            seen_next = False
            for _ in range(4):
                try:
                    event = sub.get(timeout=0.5)
                except sharedkv.TimeoutError:
                    break
                except SharedKVError:
                    continue
                seen_next = seen_next or getattr(event, "data", None) == "next"
            assert seen_next
        sub.close()


def _notify_address(store: sharedkv.Store) -> Any:
    return store.backend._notifier.address  # type: ignore[attr-defined]


_PUBLISH = (
    "import sharedkv, sys; s = sharedkv.Store(sys.argv[1]); s.publish('c', 'real'); s.close()"
)


def test_random_datagrams_are_only_spurious_wakeups(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(12)
    with sharedkv.Store(f"shm://{unique_name('dg')}") as store:
        sub = store.subscribe("c", "d.*")
        watch = store.watch("k*")
        queue = store.queue("q")
        address = _notify_address(store)
        waited: list[float] = []

        def wait_on_queue() -> None:  # a blocked getter, woken by forged hints
            t0 = time.monotonic()
            with contextlib.suppress(sharedkv.QueueEmpty):
                queue.get(timeout=1.0)
            waited.append(time.monotonic() - t0)

        getter = threading.Thread(target=wait_on_queue)
        getter.start()
        sent = 0
        with (
            caplog.at_level(logging.WARNING, logger="sharedkv"),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        ):
            for _ in _fuzz_rounds(2.0):
                datagram = rng.choice(
                    [
                        _random_bytes(rng, 600),
                        rng.choice([b"m", b"k", b"q", b"l"])
                        + rng.choice([b"c", b"d.x", b"q", b"k1"]),
                        b"m" + rng.randbytes(rng.randrange(1, 300)),
                        b"",
                    ]
                )
                with contextlib.suppress(BlockingIOError, OSError):
                    sock.sendto(datagram, address)
                    sent += 1
                if sent % 200 == 0:
                    assert sub.get_nowait() is None  # a forged hint carries no message
            getter.join(10)
            assert sent > 100
            assert waited and waited[0] >= 0.95  # woken, but kept waiting: nothing was put
            assert sub.get_nowait() is None and watch.get_nowait() is None
            # The notifier thread still routes real wake-ups from another process.
            subprocess.run([sys.executable, "-c", _PUBLISH, store.url], check=True, timeout=60)
            assert sub.get(timeout=10).data == "real"  # type: ignore[union-attr]
            store.set("k1", 1)
            assert watch.get(timeout=10).key == "k1"  # type: ignore[union-attr]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        sub.close()
        watch.close()


# -- resource limits --------------------------------------------------------------------------
def _tmpfs_free() -> int:
    st = os.statvfs(os.path.dirname(shm.root_dir()))
    return st.f_bavail * st.f_frsize


def test_a_full_store_says_so_and_stays_usable() -> None:
    with sharedkv.Store(f"shm://{unique_name('full')}", map_size=8 << 20) as store:
        chunk = b"x" * (64 << 10)
        written = []
        with pytest.raises(sharedkv.StoreFullError, match="full"):
            for i in range(1000):
                store.set(f"k{i}", chunk)
                written.append(f"k{i}")
        assert 20 < len(written) < 128
        assert store.get_many(written) == dict.fromkeys(written, chunk)
        # A failed write changes nothing, however many keys it had.
        with pytest.raises(sharedkv.StoreFullError):
            store.set_many({f"batch{i}": chunk for i in range(64)})
        assert store.keys("batch*") == []
        with pytest.raises(sharedkv.StoreFullError):
            store.queue("q").put(chunk * 4)
        assert store.queue("q").qsize() == 0
        # Room made is room to write again.
        for key in written[: len(written) // 2]:
            assert store.delete(key)
        for i in range(5):
            assert store.set(f"again{i}", chunk)
            assert store.get(f"again{i}") == chunk
        assert store.incr("n") == 1
        assert len(store) == len(written) - len(written) // 2 + 6


def test_an_integer_too_long_to_write_is_a_clear_error(store: sharedkv.Store) -> None:
    # Integers are stored as decimal text; past sys.get_int_max_str_digits() there is none.
    with pytest.raises(SerializationError):
        store.set("big", 10**5000)
    assert "big" not in store


@pytest.mark.skipif(_tmpfs_free() < 3 << 30, reason="needs 3 GiB free in the shared-memory tmpfs")
def test_a_store_grows_past_one_gib() -> None:
    with sharedkv.Store(f"shm://{unique_name('gib')}", history=16) as store:
        block = os.urandom(1 << 20) * 16
        count = 66  # 66 x 16 MiB = 1.03 GiB of values
        for i in range(count):
            assert store.set(f"v{i}", block[:-1] + bytes([i]))
        assert store.stats()["bytes_used"] > 1 << 30
        for i in range(count):
            value = store.get(f"v{i}")
            assert len(value) == len(block) and value[-1] == i
        assert len(store) == count


@pytest.mark.slow
@slow
@pytest.mark.skipif(_tmpfs_free() < 2 << 30, reason="needs 2 GiB free in the shared-memory tmpfs")
def test_a_256_mib_value() -> None:
    with sharedkv.Store(f"shm://{unique_name('huge')}") as store:
        value = os.urandom(1 << 20) * 256
        assert store.set("huge", value)
        assert store.get("huge") == value
        assert store.get_entry("huge").value == value  # type: ignore[union-attr]
        assert store.delete("huge")


@pytest.mark.slow
@slow
def test_a_million_keys() -> None:
    with sharedkv.Store(f"shm://{unique_name('many')}", history=16) as store:
        batch = 10_000
        for b in range(100):
            store.set_many({f"k:{b * batch + i:07d}": b * batch + i for i in range(batch)})
        assert len(store) == 1_000_000
        assert store.get("k:0000000") == 0 and store.get("k:0999999") == 999_999
        assert store.keys("k:099999?") == [f"k:099999{i}" for i in range(10)]
        assert store.get_many([f"k:{i:07d}" for i in range(0, 1_000_000, 1000)]) == {
            f"k:{i:07d}": i for i in range(0, 1_000_000, 1000)
        }
        assert store.incr("k:0500000", 1) == 500_001
        assert store.delete("k:0000001") and len(store) == 999_999


def test_pickle_is_the_default() -> None:
    # The warning of docs/reliability.md rests on this: a store decodes pickles unless told not to.
    with sharedkv.Store("memory://") as store:
        store.set("v", {"a": 1})
        raw = store.backend.get("v")
        assert raw is not None and raw[:1] == b"\x80" and pickle.loads(raw) == {"a": 1}
