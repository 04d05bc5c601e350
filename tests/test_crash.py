"""Crashes and leaks: SIGKILL at random moments, and nothing left behind after close or exit."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sharedkv
from sharedkv._backends import ENV_VAR, shm

from .conftest import unique_name


def _writer(url: str, log_path: str, start: int) -> None:
    store = sharedkv.Store(url)
    with open(log_path, "a", buffering=1) as log:
        i = start
        while True:
            # A mix of every kind of write; each is logged only after it was acknowledged.
            store.set(f"k{i}", {"i": i, "pad": "x" * (i % 300)})
            store.incr("acked")
            if i % 7 == 0:
                store.set_many({f"m{i}a": i, f"m{i}b": i})
            store.set(f"d{i}", i)
            store.delete(f"d{i - 5}")
            log.write(f"{i}\n")
            i += 1


def test_sigkill_mid_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    url = f"shm://{unique_name('crash')}"
    keeper = sharedkv.Store(url)  # keeps the store alive between writers
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1)
    log_path = str(tmp_path / "acked.log")
    start = 0
    for _round in range(50):
        proc = ctx.Process(target=_writer, args=(url, log_path, start))
        proc.start()
        time.sleep(rng.uniform(0.02, 0.12))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        with open(log_path) as f:
            acked = [int(line) for line in f if line.strip()]
        start = (acked[-1] + 1) if acked else start
        start += 1000  # the killed writer may have written beyond its log: skip those keys
        # The store opens and answers, and writes go through at once: no stale lock.
        t0 = time.monotonic()
        assert keeper.set("probe", _round) is True
        assert time.monotonic() - t0 < 2.0
    try:
        for i in acked:
            assert keeper.get(f"k{i}") == {"i": i, "pad": "x" * (i % 300)}
            if i % 7 == 0:
                assert keeper.get_many([f"m{i}a", f"m{i}b"]) == {f"m{i}a": i, f"m{i}b": i}
        assert keeper.get("acked") >= len(acked)
    finally:
        keeper.close()


def test_killed_reader_leaves_no_stale_reader_slot() -> None:
    url = f"shm://{unique_name('rd')}"
    store = sharedkv.Store(url)
    store.set("k", 1)
    code = f"import sharedkv, os, signal\ns = sharedkv.Store({url!r})\nwhile True: s.get('k')\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(1.0)
    proc.kill()
    proc.wait(10)
    # A new process cleans the dead reader's slots on open.
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sharedkv; print(sharedkv.Store({url!r}).stats()['readers'])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert str(proc.pid) not in other.stdout, other.stdout + other.stderr
    store.close()


# -- leaks ------------------------------------------------------------------------------------------
def _stores() -> set[str]:
    root = shm.root_dir()
    return set(os.listdir(root)) if os.path.isdir(root) else set()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_close_leaves_no_files_fds_or_threads() -> None:
    gc.collect()
    fds, threads = _fds(), threading.active_count()
    before = _stores()
    url = f"shm://{unique_name('leak')}"
    store = sharedkv.Store(url)
    store.set("k", 1)
    sub = store.subscribe("c")
    store.publish("c", 1)
    sub.get(timeout=5)
    with store.watch("k"):
        store.set("k", 2)

    @store.on_message("cb")
    def _cb(msg: object) -> None:
        pass

    store.queue("q").put(1)
    with store.lock("l"):
        pass
    store.close()
    gc.collect()
    assert _stores() == before
    assert _fds() <= fds, f"leaked fds: {_fds() - fds}"
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads, [t.name for t in threading.enumerate()]


def test_process_exit_removes_unnamed_store() -> None:
    code = (
        "import sharedkv\ns = sharedkv.Store()\ns.set('k', 1)\n"
        "s.subscribe('x')\nprint(s.path)\n"  # left open on purpose: exit must clean up
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    path = out.stdout.strip()
    assert path.startswith(shm.root_dir()), out.stderr
    assert not os.path.exists(path)


def test_crashed_tree_is_swept_by_next_user() -> None:
    code = "import sharedkv, os\ns = sharedkv.Store()\nprint(s.path, flush=True)\nos.kill(os.getpid(), 9)\n"
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    path = out.stdout.strip()
    assert os.path.isdir(path)  # the killed process could not clean up
    removed = shm.sweep_stale(min_age=0)
    assert path in removed and not os.path.exists(path)


def test_store_lives_while_any_process_is_attached() -> None:
    url = f"shm://{unique_name('live')}"
    first = sharedkv.Store(url)
    first.set("k", 1)
    code = f"import sharedkv, sys\ns = sharedkv.Store({url!r}+'?create=0')\nprint(s.get('k'))\nsys.stdin.read()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "1"
    path = first.path
    first.close()
    assert path is not None and os.path.isdir(path)  # the other process still uses it
    proc.communicate("", timeout=30)
    assert not os.path.exists(path)


def test_attach_to_missing_store_is_a_clear_error() -> None:
    with pytest.raises(sharedkv.StoreNotFoundError, match="no store"):
        sharedkv.Store(f"shm://{unique_name('none')}?create=0")


def test_bad_addresses() -> None:
    for url, error in [
        ("ftp://x", sharedkv.InvalidURLError),
        ("shm://bad/name", sharedkv.InvalidURLError),
        ("shm://", sharedkv.InvalidURLError),
        ("file://relative", sharedkv.InvalidURLError),
        ("shm://ok?keep=maybe", sharedkv.InvalidURLError),
        ("shm://ok?colour=blue", sharedkv.InvalidURLError),
    ]:
        with pytest.raises(error):
            sharedkv.Store(url)
    with pytest.raises(TypeError):
        sharedkv.Store(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown store option"):
        sharedkv.Store("memory://", colour="blue")


def test_file_store_survives_restart(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/state?durable=1"
    code = f"import sharedkv; s = sharedkv.Store({url!r}); s.set('boot', s.get('boot', 0) + 1)"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with sharedkv.Store(url) as store:
        assert store.get("boot") == 2


def test_pickled_store_is_its_address() -> None:
    import pickle

    with sharedkv.Store(f"shm://{unique_name()}") as store:
        clone = pickle.loads(pickle.dumps(store))
        assert clone.url == store.url
        clone.set("k", 1)
        assert store.get("k") == 1
        clone.close()
