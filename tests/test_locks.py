"""Locks, semaphores and ephemeral keys owned by processes, across real processes and crashes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import sharedkv

from .conftest import unique_name


@pytest.fixture
def named() -> Iterator[sharedkv.Store]:
    store = sharedkv.Store(f"shm://{unique_name('lk')}")
    yield store
    store.close()


def _critical_sections(store: sharedkv.Store, n: int) -> None:
    lock = store.lock("counter-lock", timeout=60)
    for _ in range(n):
        with lock:
            # A plain read-modify-write: only the lock makes it safe.
            store.set("counter", store.get("counter") + 1)


def test_four_processes_thousand_sections_each(named: sharedkv.Store) -> None:
    named.set("counter", 0)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_critical_sections, args=(named, 1000)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert named.get("counter") == 4000


def _hold_forever(store: sharedkv.Store, ready: Any) -> None:
    store.lock("L").acquire()
    ready.put(os.getpid())
    time.sleep(600)


def _wait_for_lock(store: sharedkv.Store, started: Any, out: Any) -> None:
    lock = store.lock("L", timeout=30)
    started.put(1)
    if lock.acquire():
        out.put((os.getpid(), time.time()))
        time.sleep(0.2)
        lock.release()


def test_killed_holder_frees_lock_within_a_second(named: sharedkv.Store) -> None:
    ctx = multiprocessing.get_context("fork")
    worst = 0.0
    for _ in range(20):
        ready, started, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
        holder = ctx.Process(target=_hold_forever, args=(named, ready))
        holder.start()
        ready.get(timeout=30)
        waiters = [ctx.Process(target=_wait_for_lock, args=(named, started, out)) for _ in range(3)]
        for w in waiters:
            w.start()
        for _ in waiters:
            started.get(timeout=30)
        time.sleep(0.1)  # let them block
        assert out.empty()
        killed_at = time.time()
        os.kill(holder.pid, signal.SIGKILL)
        _, acquired_at = out.get(timeout=10)
        worst = max(worst, acquired_at - killed_at)
        for w in waiters:
            w.join(30)
            assert w.exitcode == 0
        holder.join(5)
    assert worst < 1.0, f"slowest takeover after SIGKILL: {worst:.3f} s"


def test_normal_exit_releases_at_once(named: sharedkv.Store) -> None:
    code = (
        f"import sharedkv, sys\ns = sharedkv.Store({named.url!r})\n"
        "s.lock('L').acquire()\nprint('held', flush=True)\nsys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    lock = named.lock("L", timeout=10)
    owner = lock.owner()
    assert owner is not None and owner.pid == proc.pid and owner.thread_name == "MainThread"
    assert not lock.acquire(blocking=False)
    proc.communicate("\n", timeout=30)
    t0 = time.monotonic()
    assert lock.acquire(timeout=10)
    assert time.monotonic() - t0 < 0.5
    lock.release()


def test_timeouts_and_non_blocking(named: sharedkv.Store) -> None:
    a = named.lock("T")
    b = named.lock("T", timeout=0.2)
    assert a.acquire(blocking=False)
    t0 = time.monotonic()
    assert b.acquire() is False
    assert 0.15 < time.monotonic() - t0 < 5
    with pytest.raises(sharedkv.LockTimeoutError, match="could not acquire"), b:
        pass
    a.release()
    assert b.acquire(blocking=False)
    b.release()
    with pytest.raises(ValueError):
        named.lock("T", timeout=-1)


def test_release_by_non_owner_is_an_error(named: sharedkv.Store) -> None:
    lock = named.lock("N")
    lock.acquire()
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            lock.release()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], sharedkv.LockNotOwnedError)
    assert lock.locked()
    lock.release()


def test_rlock(named: sharedkv.Store) -> None:
    r = named.rlock("R")
    with r, r:
        assert r.locked()
    assert not r.locked()


def test_async_waiters_do_not_block_the_loop(named: sharedkv.Store) -> None:
    holder = named.lock("A")
    holder.acquire()

    async def main() -> list[str]:
        order: list[str] = []

        async def waiter() -> None:
            async with named.lock("A", timeout=10):
                order.append("acquired")

        async def ticker() -> None:
            for _ in range(5):
                order.append("tick")
                await asyncio.sleep(0.02)
            holder.release()

        await asyncio.gather(waiter(), ticker())
        return order

    order = asyncio.run(main())
    assert order.index("acquired") > order.index("tick") and order.count("tick") == 5


# -- ephemeral keys -----------------------------------------------------------------------------
_EPHEMERAL_CHILD = """
import sharedkv, sys, os
s = sharedkv.Store({url!r})
s.set("workers/" + str(os.getpid()), {{"host": "a"}}, ephemeral=True)
print("ready", flush=True)
sys.stdin.readline()
"""


def _start_ephemeral_owner(url: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _EPHEMERAL_CHILD.format(url=url)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("ending", ["clean exit", "SIGKILL"])
def test_ephemeral_keys_vanish_with_their_owner(named: sharedkv.Store, ending: str) -> None:
    with named.watch("workers/*") as watch:
        proc = _start_ephemeral_owner(named.url)
        key = f"workers/{proc.pid}"
        assert named.get(key) == {"host": "a"}
        first = watch.get(timeout=10)
        assert (first.kind, first.key) == ("set", key)  # type: ignore[union-attr]
        if ending == "SIGKILL":
            proc.kill()
        proc.communicate("\n", timeout=30)
        t0 = time.monotonic()
        event = watch.get(timeout=10)
        assert (event.kind, event.key) == ("delete", key)  # type: ignore[union-attr]
        assert time.monotonic() - t0 < 1.0
        assert named.get(key) is None and key not in named.keys("workers/*")
