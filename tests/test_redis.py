"""Redis-only behaviour: addresses, namespaces, outages, processes, leases, consistency.

Every test here runs against a real ``redis-server`` (the session fixture of conftest, or a
private one where the server must be stopped); without the binary they are skipped.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from fnmatch import fnmatchcase
from typing import Any

import pytest

import sharedkv
from sharedkv import Gap, Message

from ._redis_server import RedisServer, redis_server_binary
from .conftest import unique_name

pytest.importorskip("redis")

from sharedkv._backends.redis import RedisBackend

pytestmark = pytest.mark.redis

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    """A fresh namespace on the session's server."""
    return f"{redis_server.url}?namespace={unique_name('ns')}"


@pytest.fixture
def store(url: str) -> Iterator[sharedkv.Store]:
    s = sharedkv.Store(url)
    try:
        yield s
    finally:
        if not s.closed:
            s.clear()
        s.close()


@pytest.fixture
def private_server() -> Iterator[RedisServer]:
    """A server of this test's own, which the test may stop and start again."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


@contextlib.contextmanager
def killed_on_exit(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- addresses and options ------------------------------------------------------------------
def test_url_is_canonical_and_reopens_the_same_store(redis_server: RedisServer) -> None:
    ns = unique_name("ns")
    port = redis_server.port
    with sharedkv.Store(f"redis://127.0.0.1:{port}", namespace=ns) as s:
        assert s.url == f"redis://127.0.0.1:{port}/0?namespace={ns}"
        s.set("k", "v")
        with sharedkv.Store(s.url) as again:
            assert again.get("k") == "v"
        s.clear()


def test_url_keeps_credentials_and_options() -> None:
    # Parsing only: the address is never contacted.
    from sharedkv._backends.redis import _parse_address

    address, own = _parse_address("redis://ann:p%40ss%3Aw@example.org:7000/3?namespace=a&lease=2")
    assert (address.host, address.port, address.db) == ("example.org", 7000, 3)
    assert (address.username, address.password) == ("ann", "p@ss:w")
    assert own == {"namespace": "a", "lease": "2"}
    assert address.url([("namespace", "a")]) == (
        "redis://ann:p%40ss%3Aw@example.org:7000/3?namespace=a"
    )
    assert address.where == "example.org:7000"  # messages never show the password
    unix, _ = _parse_address("unix:///run/redis.sock?db=2")
    assert (unix.path, unix.db, unix.where) == ("/run/redis.sock", 2, "unix:/run/redis.sock")
    assert unix.url([("namespace", "b")]) == "unix:///run/redis.sock?db=2&namespace=b"


def test_bad_addresses_and_options(redis_server: RedisServer) -> None:
    base = redis_server.url
    with pytest.raises(sharedkv.InvalidURLError, match="unknown option"):
        sharedkv.Store(f"{base}?bogus=1")
    with pytest.raises(sharedkv.InvalidURLError, match="namespace"):
        sharedkv.Store(f"{base}?namespace=a:b")
    with pytest.raises(sharedkv.InvalidURLError, match="twice"):
        sharedkv.Store(f"{base}?namespace=a", namespace="b")
    with pytest.raises(sharedkv.InvalidURLError, match="timeout"):
        sharedkv.Store(f"{base}?timeout=never")
    with pytest.raises(TypeError, match="unknown store option"):
        sharedkv.Store(base, map_size=1 << 20)
    with pytest.raises(sharedkv.InvalidURLError, match="socket path"):
        sharedkv.Store("unix://")


def test_options_from_store_keywords(redis_server: RedisServer) -> None:
    ns = unique_name("ns")
    with sharedkv.Store(
        redis_server.url, namespace=ns, history=16, buffer=8, timeout=2, lease=3
    ) as s:
        assert s.url.endswith(f"?namespace={ns}&timeout=2.0&lease=3.0")
        backend = s.backend
        assert isinstance(backend, RedisBackend)
        assert backend.blocking_io is True
        assert (backend._history, backend._buffer) == (16, 8)


def test_unreachable_server_fails_fast() -> None:
    from ._redis_server import free_port

    t0 = time.monotonic()
    with pytest.raises(sharedkv.BackendUnavailableError, match=r"127\.0\.0\.1"):
        sharedkv.Store(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    assert time.monotonic() - t0 < 5


def test_missing_extra_names_the_install_command() -> None:
    result = run_python(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        import sharedkv
        try:
            sharedkv.Store("redis://127.0.0.1:1/0")
        except sharedkv.MissingDependencyError as exc:
            print("missing:", exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "missing:" in result.stdout and "pip install 'sharedkv[redis]'" in result.stdout


# -- namespaces ----------------------------------------------------------------------------
def test_two_namespaces_on_one_server_are_isolated(redis_server: RedisServer) -> None:
    a = sharedkv.Store(redis_server.url, namespace=unique_name("a"))
    b = sharedkv.Store(redis_server.url, namespace=unique_name("b"))
    try:
        a.set_many({"x": 1, "shared": "a"})
        b.set_many({"y": 2, "shared": "b"})
        assert a.get_all() == {"x": 1, "shared": "a"}
        assert b.get_all() == {"y": 2, "shared": "b"}
        assert a.keys() == ["shared", "x"] and len(b) == 2
        assert a.items("s*") == [("shared", "a")]
        assert a.incr("n") == 1 and b.incr("n") == 1
        with a.subscribe("c") as sub:
            assert b.publish("c", "from b") == 0
            assert a.publish("c", "from a") == 1
            assert sub.get(timeout=5).data == "from a"  # type: ignore[union-attr]
        a.queue("q").put(1)
        assert b.queue("q").qsize() == 0
        a.clear()
        assert a.get_all() == {} and b.get_all() == {"y": 2, "shared": "b", "n": 1}
        b.clear()
    finally:
        a.close()
        b.close()


def test_namespace_with_glob_characters(redis_server: RedisServer) -> None:
    star = sharedkv.Store(redis_server.url, namespace=unique_name("a*"))
    plain = sharedkv.Store(redis_server.url, namespace=star.backend.namespace.replace("*", "x"))  # type: ignore[attr-defined]
    try:
        plain.set("k", 1)
        star.set("k", 2)
        assert star.get_all() == {"k": 2} and plain.get_all() == {"k": 1}
        star.clear()
        assert plain.keys() == ["k"]
        plain.clear()
    finally:
        star.close()
        plain.close()


NAMES = [
    "a", "ab", "abc", "a.b", "a*b", "a?b", "a[b", "a]b", "a\\b", "a-b", "a^b", "é", "aé",
    "aéb", "日本", "x日", "user:1", "user:10", "ü", "A", "[", "]", "!",
]  # fmt: skip
PATTERNS = [
    "*", "a*", "a?", "a??", "?", "??", "a[bc]*", "a[!b]*", "[!a]*", "a[*]b", "a[?]b", "a[[]b",
    "a[]]b", "a\\b", "a[a-c]", "[à-ü]", "[!à-ü]", "x?", "*日*", "a[é]", "a[!é]", "user:?",
    "a[^]b", "a[-]b", "[", "]", "a[b", "*[", "a[!]",
]  # fmt: skip


def test_key_patterns_match_exactly_like_fnmatch(store: sharedkv.Store) -> None:
    store.set_many(dict.fromkeys(NAMES, 0))
    for pattern in PATTERNS:
        if pattern.count("[") != pattern.count("]"):
            continue  # the Store refuses unbalanced brackets before any backend sees them
        expected = sorted(n for n in NAMES if fnmatchcase(n, pattern))
        assert store.keys(pattern) == expected, pattern


def test_channel_patterns_match_exactly_like_fnmatch(store: sharedkv.Store) -> None:
    patterns = [p for p in PATTERNS if p.count("[") == p.count("]")]
    subs = [store.subscribe(p) for p in patterns]
    try:
        for name in NAMES:
            matching = [p for p in patterns if fnmatchcase(name, p)]
            # A negated class with non-ASCII members cannot be told to Redis exactly: it also
            # reaches (and is counted for) other non-ASCII characters. Delivery stays exact.
            wider = [p for p in patterns if "[!" in p and not p.isascii() and not name.isascii()]
            reached = store.publish(name, name)
            assert len(matching) <= reached <= len(set(matching) | set(wider)), name
        for pattern, sub in zip(patterns, subs, strict=True):
            expected = sorted(n for n in NAMES if fnmatchcase(n, pattern))
            got = [sub.get(timeout=5) for _ in expected]
            assert sorted(m.data for m in got) == expected, pattern  # type: ignore[union-attr]
            assert sub.get_nowait() is None, pattern
    finally:
        for sub in subs:
            sub.close()


# -- messaging specifics -------------------------------------------------------------------
def test_publish_counts_every_subscription(store: sharedkv.Store) -> None:
    a = store.subscribe("news")
    b = store.subscribe("news")
    c = store.subscribe("n*")
    d = store.subscribe("n*")
    assert store.publish("news", 1) == 4
    b.close()
    d.close()
    assert store.publish("news", 2) == 2
    assert [m.data for m in (a.get(timeout=5), a.get(timeout=5))] == [1, 2]  # type: ignore[union-attr]
    assert c.get(timeout=5).seq == 1  # type: ignore[union-attr]
    a.close()
    c.close()
    assert store.publish("news", 3) == 0


def test_slow_subscriber_gets_gap_marker(url: str) -> None:
    with sharedkv.Store(url, buffer=10) as s:
        for pattern in ("c", "c*"):  # a channel named exactly, and one met through a pattern
            with s.subscribe(pattern) as sub:
                for i in range(25):
                    s.publish("c", i)
                events = [sub.get(timeout=5)]
                while (e := sub.get_nowait()) is not None:
                    events.append(e)
            gaps = [e for e in events if isinstance(e, Gap)]
            messages = [e for e in events if isinstance(e, Message)]
            assert len(gaps) == 1 and gaps[0].count == 15, pattern
            assert [m.data for m in messages] == list(range(15, 25))
        assert s.stats()["messages_dropped"] == 30
        s.clear()


def test_gap_while_reading(url: str) -> None:
    with sharedkv.Store(url, buffer=5) as s, s.subscribe("c") as sub:
        s.publish("c", 0)
        assert sub.get(timeout=5).data == 0  # type: ignore[union-attr]
        for i in range(1, 21):
            s.publish("c", i)
        events = [sub.get(timeout=5)]
        while (e := sub.get_nowait()) is not None:
            events.append(e)
        assert events[0] == Gap("c", 2, 16)
        assert [m.data for m in events[1:]] == list(range(16, 21))  # type: ignore[union-attr]


def test_messages_before_subscribing_are_not_delivered(store: sharedkv.Store) -> None:
    with store.subscribe("c") as early:
        store.publish("c", "old")
        with store.subscribe("c") as late, store.subscribe("c*") as late_pattern:
            store.publish("c", "new")
            assert late.get(timeout=5).data == "new"  # type: ignore[union-attr]
            assert late_pattern.get(timeout=5).data == "new"  # type: ignore[union-attr]
            assert late.get_nowait() is None and late_pattern.get_nowait() is None
        assert [early.get(timeout=5).data for _ in range(2)] == ["old", "new"]  # type: ignore[union-attr]


def test_watch_since_too_old(url: str) -> None:
    with sharedkv.Store(url, history=5) as s:
        for i in range(40):
            s.set("k", i)
        with pytest.raises(sharedkv.RevisionTooOldError) as info:
            s.watch("k", since=1)
        assert info.value.oldest > 2
        with s.watch("k", since=info.value.oldest - 1) as w:
            first = w.get(timeout=5)
            assert first.kind == "set" and first.revision == info.value.oldest  # type: ignore[union-attr]
        s.clear()


def test_watcher_behind_the_history_gets_a_gap(url: str) -> None:
    with sharedkv.Store(url, history=16) as s:
        s.set("k", -1)
        with s.watch("k") as w:
            for i in range(100):
                s.set("k", i)
            first = w.get(timeout=5)
            rest = []
            while (event := w.get_nowait()) is not None:
                rest.append(event)
        assert isinstance(first, Gap) and first.first_seq == 2
        assert first.last_seq + 1 == rest[0].revision  # type: ignore[union-attr]
        assert [c.value for c in rest][-1] == 99  # type: ignore[union-attr]
        assert 16 <= len(rest) <= 16 + 1 + 16 // 16
        s.clear()


def test_watch_reports_expiry_seen_later(url: str) -> None:
    # No watcher runs while the key expires: the next watch(since=...) still reports it.
    with sharedkv.Store(url) as s:
        s.set("t", 1, ttl=0.1)
        start = s.revision
        time.sleep(0.3)
        with s.watch("t", since=start) as w:
            change = w.get(timeout=5)
        assert (change.kind, change.key) == ("expire", "t")  # type: ignore[union-attr]
        assert change.revision > start  # type: ignore[union-attr]
        s.clear()


# -- values ---------------------------------------------------------------------------------
def test_incr_beyond_64_bits_keeps_ttl(store: sharedkv.Store) -> None:
    store.set("n", 2**63 - 1, ttl=30)
    assert store.incr("n") == 2**63
    assert store.incr("n", 2**70) == 2**63 + 2**70
    assert store.decr("n", 2**63 + 2**70) == 0
    ttl = store.ttl("n")
    assert ttl is not None and 25 < ttl <= 30
    assert store.incr("m", -(2**80)) == -(2**80)


def test_json_serializer(url: str) -> None:
    with sharedkv.Store(url, serializer=sharedkv.JSONSerializer()) as safe:
        safe.set("doc", {"a": [1, 2], "t": (1, "x")})
        with sharedkv.Store(url) as pickling:
            pickling.set("pickled", {"x": 1})
        assert safe.get("doc") == {"a": [1, 2], "t": (1, "x")}
        with pytest.raises(sharedkv.SerializationError, match="refusing"):
            safe.get("pickled")
        safe.clear()


def test_ephemeral_key_reports_only_the_users_ttl(store: sharedkv.Store) -> None:
    store.set("e", 1, ephemeral=True)
    assert store.ttl("e") is None
    store.set("f", 1, ephemeral=True, ttl=20)
    ttl = store.ttl("f")
    assert ttl is not None and 15 < ttl <= 20
    assert store.incr("e") == 2 and store.ttl("e") is None


def test_stats(store: sharedkv.Store) -> None:
    store.set("a", 1)
    with store.subscribe("c"):
        store.publish("c", 1)
    stats = store.stats()
    assert stats["keys"] == 1 and stats["revision"] >= 1
    assert stats["messages_published"] == 1
    assert stats["url"] == store.url and stats["server"].startswith("redis ")


# -- consistency of get_all ------------------------------------------------------------------
def test_get_all_while_writers_run(store: sharedkv.Store) -> None:
    """The documented guarantee: keys unchanged during the call come back with their values,
    and every value returned is one its key really had; nothing more is promised."""
    stable = {f"stable:{i:05d}": i for i in range(2500)}  # several SCAN batches
    store.set_many(stable)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            i = 0
            while not stop.is_set():
                i += 1
                store.set(f"hot:{i % 7}", i)
                store.set(f"churn:{i % 11}", -i)
                store.delete(f"churn:{(i + 5) % 11}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write) for _ in range(2)]
    for t in writers:
        t.start()
    try:
        for _ in range(5):
            snapshot = store.get_all()
            assert {k: v for k, v in snapshot.items() if k.startswith("stable:")} == stable
            for key, value in snapshot.items():
                if key.startswith("hot:"):
                    assert value % 7 == int(key[4:]) and value > 0
                elif key.startswith("churn:"):
                    assert -value % 11 == int(key[6:])
    finally:
        stop.set()
        for t in writers:
            t.join()
    assert not errors


# -- processes ---------------------------------------------------------------------------------
def test_pickled_store_reopens_the_same_data(url: str) -> None:
    with sharedkv.Store(url, buffer=16) as s:
        s.set("k", [1, 2])
        clone = pickle.loads(pickle.dumps(s))
        try:
            assert clone.url == s.url and clone.get("k") == [1, 2]
            assert clone.backend._buffer == 16  # type: ignore[attr-defined]
        finally:
            clone.close()
        s.clear()


def _spawned_child(store: sharedkv.Store) -> None:
    store.set("from_child", store.get("from_parent") + 1)
    store.publish("done", os.getpid())
    store.close()


def test_spawned_child_uses_the_same_store(store: sharedkv.Store) -> None:
    store.set("from_parent", 41)
    ctx = multiprocessing.get_context("spawn")
    with store.subscribe("done") as sub:
        child = ctx.Process(target=_spawned_child, args=(store,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        message = sub.get(timeout=10)
    assert isinstance(message, Message) and message.data == child.pid
    assert store.get("from_child") == 42


def test_forked_child_opens_its_own_connections(store: sharedkv.Store) -> None:
    store.set("k", 1)
    sub = store.subscribe("from-child")
    parent_pool = store.backend._pool  # type: ignore[attr-defined]
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            assert store.get("k") == 1
            assert store.backend._pool is not parent_pool  # type: ignore[attr-defined]
            store.set("child", os.getpid())
            with store.lock("L"):
                store.set("eph", 1, ephemeral=True)
            assert sub.closed  # feeds of the parent are not the child's
            with store.subscribe("echo") as own:
                store.publish("echo", "x")
                assert own.get(timeout=5).data == "x"  # type: ignore[union-attr]
            store.publish("from-child", "hello")
            store.close()
            code = 0
        finally:
            os.write(write_fd, bytes([code]))
            os._exit(code)
    os.close(write_fd)
    try:
        assert os.read(read_fd, 1) == b"\x00"
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    message = sub.get(timeout=5)
    assert isinstance(message, Message) and message.data == "hello"
    assert store.get("child") == pid
    assert "eph" not in store  # the child closed cleanly: its ephemeral key went with it
    store.set("k", 2)  # the parent's own connections still work
    assert store.get("k") == 2
    sub.close()


# -- leases: locks and ephemeral keys ------------------------------------------------------------
LEASE = 2.0
HOLDER = f"""
    import sys, time, sharedkv
    store = sharedkv.Store(sys.argv[1], lease={LEASE})
    store.lock("L").acquire()
    store.set("eph", "alive", ephemeral=True)
    print("ready", flush=True)
    time.sleep(120)
"""


def test_killed_lock_holder_frees_after_the_lease(url: str) -> None:
    with (
        sharedkv.Store(url) as s,
        killed_on_exit(start_python(HOLDER, url)) as holder,
    ):
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        lock = s.lock("L")
        owner = lock.owner()
        assert owner is not None and owner.pid == holder.pid
        # While the holder lives, its thread renews the lease: the lock stays taken.
        assert lock.acquire(timeout=LEASE * 1.5) is False
        assert s.get("eph") == "alive"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        t0 = time.monotonic()
        assert lock.acquire(timeout=10) is True
        assert time.monotonic() - t0 < LEASE + 1.5  # the lease, a waiter's recheck, slack
        assert lock.owner().pid == os.getpid()  # type: ignore[union-attr]
        lock.release()
        deadline = time.monotonic() + 3
        while "eph" in s:  # its lease ran out as well
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.clear()


def test_clean_exit_releases_at_once(url: str) -> None:
    code = """
        import sys, sharedkv
        store = sharedkv.Store(sys.argv[1])
        store.lock("L").acquire()
        store.set("eph", 1, ephemeral=True)
    """  # the interpreter exits without releasing: atexit closes the store
    result = run_python(code, url)
    assert result.returncode == 0, result.stderr
    with sharedkv.Store(url) as s:
        assert s.lock("L").owner() is None
        assert "eph" not in s


# -- outages -----------------------------------------------------------------------------------
def test_server_restart(private_server: RedisServer) -> None:
    s = sharedkv.Store(f"{private_server.url}?namespace=r", timeout=2)
    try:
        s.set("k", 1)
        sub = s.subscribe("c")
        private_server.stop()
        for call in (lambda: s.get("k"), lambda: s.set("k", 2), lambda: s.subscribe("d")):
            t0 = time.monotonic()
            with pytest.raises(sharedkv.BackendUnavailableError, match=r"127\.0\.0\.1"):
                call()
            assert time.monotonic() - t0 < 10
        private_server.start()  # same port, no persistence: the data is gone
        assert s.get("k") is None
        s.set("k", 3)
        assert s.get("k") == 3
        deadline = time.monotonic() + 10  # the subscription comes back by itself
        while s.publish("c", "after") == 0:
            assert time.monotonic() < deadline, "the subscription was not restored"
            time.sleep(0.05)
        message = sub.get(timeout=5)
        assert isinstance(message, Message) and message.data == "after"
        sub.close()
    finally:
        s.close()


def test_calls_against_a_stopped_server_never_hang(private_server: RedisServer) -> None:
    s = sharedkv.Store(f"{private_server.url}?namespace=h", timeout=1)
    try:
        q = s.queue("q")
        private_server.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            t0 = time.monotonic()
            with pytest.raises(sharedkv.BackendUnavailableError):
                q.get(timeout=0.1)
            assert time.monotonic() - t0 < 5
        finally:
            private_server.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        q.put(1)
        assert q.get(timeout=5) == 1
    finally:
        s.close()


# -- lifecycle ---------------------------------------------------------------------------------
def _redis_threads(namespace: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"sharedkv-redis-{namespace}"]


def test_idle_subscriber_uses_no_cpu_and_close_stops_the_thread(url: str) -> None:
    s = sharedkv.Store(url)
    namespace: Any = s.backend.namespace  # type: ignore[attr-defined]
    sub = s.subscribe("c")
    watch = s.watch("*")
    lock = s.lock("L")
    lock.acquire()
    assert len(_redis_threads(namespace)) == 1
    t0 = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - t0 < 0.1  # blocked in a socket read, not polling
    lock.release()
    sub.close()
    watch.close()
    s.close()
    s.close()
    assert _redis_threads(namespace) == []


def test_async_store_runs_redis_calls_in_a_thread(store: sharedkv.Store) -> None:
    import asyncio

    async def main() -> object:
        a = sharedkv.AsyncStore(store)
        await a.set("k", 1)
        return await a.incr("k")

    assert asyncio.run(main()) == 2
