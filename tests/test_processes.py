"""Sharing across real processes: spawn, fork, forkserver, process pools and subprocess."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

import sharedkv
from sharedkv._backends import ENV_VAR

from .conftest import unique_name

METHODS = ["spawn", "fork", "forkserver"]


@pytest.fixture
def named() -> Iterator[sharedkv.Store]:
    store = sharedkv.Store(f"shm://{unique_name('p')}")
    yield store
    store.close()


@pytest.fixture
def default_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[sharedkv.Store]:
    """A fresh default store for this test (as if this process had started the tree)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    store = sharedkv.Store()
    yield store
    store.close()


# -- children reach the data with no wiring -----------------------------------------------------
def _child_reads_default(out: Any) -> None:
    store = sharedkv.Store()  # no address: the tree's default store, from the environment
    out.put((store.url, store.get("config")))
    store.set("from_child", os.getpid())  # acknowledged: applied before set() returns
    store.close()


@pytest.mark.parametrize("method", METHODS)
def test_default_store_reaches_children(default_store: sharedkv.Store, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    default_store.set("config", {"lang": "en"})
    out = ctx.Queue()
    proc = ctx.Process(target=_child_reads_default, args=(out,))
    proc.start()
    url, config = out.get(timeout=30)
    proc.join(30)
    assert proc.exitcode == 0
    assert url == default_store.url and config == {"lang": "en"}
    assert default_store.get("from_child") == proc.pid


def _child_increments(store: sharedkv.Store, n: int) -> None:
    for _ in range(n):
        store.incr("counter")
        store.update("log", lambda v: v + 1, default=0)


@pytest.mark.parametrize("method", METHODS)
def test_no_lost_updates(named: sharedkv.Store, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=_child_increments, args=(named, 300)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert named.get("counter") == 1200
    assert named.get("log") == 1200


def _pool_task(store: sharedkv.Store, i: int) -> int:
    store.set(f"task:{i}", i * i)
    return int(store.incr("done"))


def test_process_pool_executor(named: sharedkv.Store) -> None:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        results = list(pool.map(_pool_task, [named] * 8, range(8)))
    assert sorted(results) == list(range(1, 9))
    assert named.get_many([f"task:{i}" for i in range(8)]) == {f"task:{i}": i * i for i in range(8)}


def test_subprocess_with_no_wiring(default_store: sharedkv.Store) -> None:
    default_store.set("greeting", "hello")
    code = textwrap.dedent(
        """
        import sharedkv
        store = sharedkv.Store()
        store.set("reply", store.get("greeting") + " back")
        print(store.url)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == default_store.url
    assert default_store.get("reply") == "hello back"


def test_named_store_from_unrelated_process(named: sharedkv.Store) -> None:
    named.set("k", [1, 2])
    code = f"import sharedkv; s = sharedkv.Store({named.url!r}); print(s.get('k')); s.close()"
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.stdout.strip() == "[1, 2]", out.stderr


# -- consistency while writers run ----------------------------------------------------------------
def _transfer(store: sharedkv.Store, rounds: int) -> None:
    # Keep a + b == 100 with every write: a snapshot must never see a half-done transfer.
    for i in range(rounds):
        store.set_many({"a": i % 100, "b": 100 - i % 100})
        store.update("pair", lambda p: (p[0] + 1, p[1] - 1), default=(0, 0))


def test_get_all_is_consistent_while_writers_run(named: sharedkv.Store) -> None:
    named.set_many({"a": 0, "b": 100})
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_transfer, args=(named, 800)) for _ in range(2)]
    for w in writers:
        w.start()
    checked = 0
    while any(w.is_alive() for w in writers) or checked < 50:
        snap = named.get_all()
        assert snap["a"] + snap["b"] == 100
        if "pair" in snap:
            assert sum(snap["pair"]) == 0
        many = named.get_many(["a", "b"])
        assert many["a"] + many["b"] == 100
        checked += 1
    for w in writers:
        w.join(30)
    assert named.get("pair") == (1600, -1600)


# -- messaging across processes -------------------------------------------------------------------
def _subscriber(store: sharedkv.Store, pattern: str, n: int, ready: Any, out: Any) -> None:
    with store.subscribe(pattern) as sub:
        ready.put(os.getpid())
        got = []
        for _ in range(n):
            msg = sub.get(timeout=30)
            got.append((msg.channel, msg.data, msg.seq))  # type: ignore[union-attr]
    out.put(got)


def _publisher(store: sharedkv.Store, channel: str, n: int) -> None:
    for i in range(n):
        store.publish(channel, (channel, i))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_child_to_child_and_parent(named: sharedkv.Store, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    ready, out = ctx.Queue(), ctx.Queue()
    sub = ctx.Process(target=_subscriber, args=(named, "jobs.*", 200, ready, out))
    sub.start()
    ready.get(timeout=30)
    with named.subscribe("jobs.*") as mine:
        pubs = [ctx.Process(target=_publisher, args=(named, f"jobs.{k}", 100)) for k in "ab"]
        for p in pubs:
            p.start()
        got_child = out.get(timeout=60)
        got_parent = [mine.get(timeout=30) for _ in range(200)]
        for p in [*pubs, sub]:
            p.join(30)
    for got in (got_child, [(m.channel, m.data, m.seq) for m in got_parent]):  # type: ignore[union-attr]
        for channel in ("jobs.a", "jobs.b"):
            mine_only = [(data, seq) for ch, data, seq in got if ch == channel]
            # Per-publisher order, and per-channel sequence numbers 1..100 without holes.
            assert [d[1] for d, _ in mine_only] == list(range(100))
            assert [s for _, s in mine_only] == list(range(1, 101))


def _publish_to_child(store: sharedkv.Store, ready: Any, out: Any) -> None:
    _subscriber(store, "to-child", 3, ready, out)


def test_parent_to_child(named: sharedkv.Store) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_publish_to_child, args=(named, ready, out))
    child.start()
    ready.get(timeout=30)
    assert [named.publish("to-child", i) for i in range(3)] == [1, 1, 1]
    assert [d for _, d, _ in out.get(timeout=30)] == [0, 1, 2]
    child.join(30)


def _idle_subscriber(store: sharedkv.Store, ready: Any) -> None:
    sub = store.subscribe("never")
    ready.put(os.getpid())
    sub.get(timeout=60)


def test_killed_subscriber_does_not_slow_publishers(named: sharedkv.Store) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    procs = [ctx.Process(target=_idle_subscriber, args=(named, ready)) for _ in range(3)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=30)
    # An idle subscriber sleeps in the kernel: measure its CPU time over a quiet second.
    cpu_before = _cpu_seconds(procs[0].pid)
    time.sleep(1.0)
    assert _cpu_seconds(procs[0].pid) - cpu_before < 0.05
    for p in procs:
        p.kill()
        p.join(10)
    t0 = time.perf_counter()
    reached = [named.publish("never", i) for i in range(200)]
    elapsed = time.perf_counter() - t0
    assert reached[0] in (0, 3) and all(r == 0 for r in reached[1:])
    assert elapsed < 2.0  # generous: a dead subscriber costs one refused send, once


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _watcher(store: sharedkv.Store, since: int, ready: Any, out: Any) -> None:
    with store.watch("cfg:*", since=since) as w:
        ready.put(1)
        out.put([(c.kind, c.key, c.value) for c in (w.get(timeout=30) for _ in range(4))])  # type: ignore[union-attr]


def test_watch_across_processes(named: sharedkv.Store) -> None:
    named.set("cfg:a", 1)
    since = named.revision
    named.set("cfg:a", 2)  # before the watcher starts: replayed from `since`
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_watcher, args=(named, since, ready, out))
    child.start()
    ready.get(timeout=30)
    named.set("other", 0)
    named.delete("cfg:a")
    named.set("cfg:t", "x", ttl=0.2)
    assert out.get(timeout=30) == [
        ("set", "cfg:a", 2),
        ("delete", "cfg:a", None),
        ("set", "cfg:t", "x"),
        ("expire", "cfg:t", None),
    ]
    child.join(30)


def _child_uses_singleton(out: Any) -> None:
    out.put(sharedkv.shared_memory.get("origin"))


def test_shared_memory_singleton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(sharedkv, "_default", None)
    store = sharedkv.shared_memory
    try:
        assert store is sharedkv.shared_memory
        store.set("origin", "main")
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        child = ctx.Process(target=_child_uses_singleton, args=(out,))
        child.start()
        assert out.get(timeout=30) == "main"
        child.join(30)
    finally:
        store.close()


def test_store_outside_dev_shm(tmp_path: Any) -> None:
    """Where there is no /dev/shm the stores live in another directory (SHAREDKV_DIR here)."""
    code = textwrap.dedent(
        """
        import multiprocessing as mp, sharedkv
        def child(store):
            store.incr("n")
        if __name__ == "__main__":
            store = sharedkv.Store()
            ps = [mp.get_context("spawn").Process(target=child, args=(store,)) for _ in range(2)]
            [p.start() for p in ps]; [p.join() for p in ps]
            print(store.get("n"), store.path)
        """
    )
    script = tmp_path / "prog.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["SHAREDKV_DIR"] = str(tmp_path / "stores")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    count, path = out.stdout.split()
    assert count == "2", out.stderr
    assert path.startswith(str(tmp_path / "stores"))
    assert not os.path.exists(path)  # removed at exit


def test_fork_server_started_before_the_store(tmp_path: Any) -> None:
    """A fork server keeps the environment it started with; children still find their tree."""
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp, os, sharedkv
            def child(q):
                q.put(sharedkv.Store().url)
            if __name__ == "__main__":
                ctx = mp.get_context("forkserver")
                q = ctx.Queue()
                first = sharedkv.Store()
                p = ctx.Process(target=child, args=(q,)); p.start(); p.join()
                assert q.get() == first.url
                first.close()
                del os.environ["SHAREDKV_STORE"]
                second = sharedkv.Store()  # the fork server still names the first one
                p = ctx.Process(target=child, args=(q,)); p.start(); p.join()
                print(q.get() == second.url)
                second.close()
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.stdout.strip() == "True", out.stderr


def _attach_and_read(url: str) -> None:
    with sharedkv.Store(url) as store:
        assert store.get("k") == 1


def test_readers_stay_live_while_other_processes_attach() -> None:
    # Every attach clears the LMDB reader slots of processes that look dead to it; a process
    # that is alive must never look dead, or its next read would fail.
    url = f"shm://{unique_name()}"
    with sharedkv.Store(url) as store:
        store.set("k", 1)
        for _ in range(3):
            assert store.get("k") == 1
            assert store.get_entry("k") is not None
            proc = multiprocessing.get_context("spawn").Process(
                target=_attach_and_read, args=(url,)
            )
            proc.start()
            proc.join(60)
            assert proc.exitcode == 0
            assert store.get("k") == 1 and store.get_entry("k") is not None
            assert store.get_all() == {"k": 1}


def _count_up(url: str, n: int) -> None:
    with sharedkv.Store(url) as store:
        for i in range(1, n + 1):
            store.set("k", i)
            store.set("other", -i)


@pytest.mark.parametrize("read_cache", [32 << 20, 0], ids=["cached", "uncached"])
def test_reads_see_every_commit_of_another_process(read_cache: int) -> None:
    # Each process keeps the values it read until anything commits: reads must still move
    # forward with every write of another process, never back, and end at its last write.
    url = f"shm://{unique_name()}"
    with sharedkv.Store(url, read_cache=read_cache) as store:
        store.set("k", 0)
        writer = multiprocessing.get_context("spawn").Process(target=_count_up, args=(url, 3000))
        writer.start()
        seen = [store.get("k")]
        while writer.is_alive():
            value = store.get("k")
            assert value >= seen[-1], f"read {value} after {seen[-1]}"
            if value != seen[-1]:
                seen.append(value)
        writer.join(60)
        assert writer.exitcode == 0
        assert store.get("k") == 3000 and store.get("other") == -3000
        assert len(seen) > 2  # the reads did see the writer progress, not only its end
