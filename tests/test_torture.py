"""Crash torture in CI (a short run of tests/torture/torture.py), and the crash cases it led to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import sharedkv
from sharedkv._backends import _notify

from .conftest import unique_name

TORTURE = Path(__file__).parent / "torture" / "torture.py"


def _run_torture(*args: str, timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(TORTURE), "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("TORTURE-SUMMARY ")]
    assert lines, f"no summary (exit {out.returncode}):\n{out.stdout}\n{out.stderr}"
    summary: dict[str, Any] = json.loads(lines[-1].split(" ", 1)[1])
    return summary


def test_torture_short_run() -> None:
    seconds = float(os.environ.get("SHAREDKV_TORTURE_SECONDS", "20"))
    summary = _run_torture(
        "--duration",
        str(seconds),
        "--seed",
        os.environ.get("SHAREDKV_TORTURE_SEED", "1"),
        "--url",
        f"shm://{unique_name('torture')}",
        timeout=seconds + 120,
    )
    assert summary["violations"] == 0, summary["violation_samples"]
    assert summary["kills"] >= seconds, summary  # about five a second here; at least one
    assert summary["ops_acknowledged"] > 0 and summary["fresh_process_checks"] > 0


# -- the creating process is nothing special --------------------------------------------------
_CREATOR = """
import sharedkv, sys
s = sharedkv.Store({url!r})
s.set("made-by", "creator")
s.set("mine", 1, ephemeral=True)
s.lock("held").acquire()
s.subscribe("news")
print("ready", flush=True)
sys.stdin.readline()
"""


def _vanishes(store: sharedkv.Store, key: str, within: float = 1.0) -> bool:
    deadline = time.monotonic() + within
    while store.get(key) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return not store.keys(key)


def test_creator_crash_leaves_store_to_others() -> None:
    url = f"shm://{unique_name('creator')}"
    with subprocess.Popen(
        [sys.executable, "-c", _CREATOR.format(url=url)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as creator:
        assert creator.stdout is not None and creator.stdout.readline().strip() == "ready"
        store = sharedkv.Store(url + "?create=0")
        assert store.get("mine") == 1
        creator.kill()
    path = store.path
    try:
        assert store.get("made-by") == "creator"  # its writes stay
        assert _vanishes(store, "mine")  # its ephemeral key goes
        lock = store.lock("held")
        assert lock.acquire(timeout=1.0)  # its lock is free
        lock.release()
        assert store.publish("news", 1) == 0  # its subscription is gone
        assert store.set("after", 2) and store.get("after") == 2
    finally:
        store.close()
    assert path is not None and not os.path.exists(path)  # the last user removed it


# -- file:// stores: acknowledged writes survive the death of every process ----------------------
_FILE_WRITER = """
import sharedkv, sys
s = sharedkv.Store({url!r})
i = 0
while True:
    s.set(f"k{{i}}", {{"i": i}})
    s.incr("n")
    print(i, flush=True)
    i += 1
"""


@pytest.mark.parametrize("durable", [False, True])
def test_file_store_keeps_acknowledged_writes_of_killed_writers(
    tmp_path: Path, durable: bool
) -> None:
    url = f"file://{tmp_path}/state" + ("?durable=1" if durable else "")
    acked = -1
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", _FILE_WRITER.format(url=url)], stdout=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stdout is not None
            for _ in range(50):
                acked = int(proc.stdout.readline())
            proc.kill()
    with sharedkv.Store(url) as store:  # no process was attached: a cold open, as after a reboot
        for i in range(acked + 1):
            assert store.get(f"k{i}") == {"i": i}
        assert store.get("n") >= acked + 1


# -- races the torture found, reproduced deterministically --------------------------------------
_PUBLISHER = """
import sharedkv
from sharedkv._backends import _notify
s = sharedkv.Store({url!r})
real = _notify.Notifier.send
_notify.Notifier.send = lambda self, *hint: _notify.FULL  # the receiver's socket is full
s.publish("ch.a", "first")
_notify.Notifier.send = real
s.publish("ch.b", "second")
s.close()
"""


def test_publication_order_across_channels_after_a_drop() -> None:
    # docs/architecture.md: messages from one publisher reach a subscriber in publication order,
    # across channels too. Here the wake-up for "ch.a" is dropped (the subscriber's socket is
    # full), the one for "ch.b" arrives, and the subscriber reads before its notifier thread
    # gets to the overflow flag (as happens under CPU load).
    url = f"shm://{unique_name('order')}"
    with sharedkv.Store(url) as store:
        sub = store.subscribe("ch.*")
        notifier: Any = store.backend._notifier  # type: ignore[attr-defined]
        routed, release = threading.Event(), threading.Event()
        route, on_idle = notifier.route, notifier._on_idle

        def slow_route(kind: int, name: str | None, message: bytes | None = None) -> None:
            route(kind, name, message)
            routed.set()

        def slow_idle(hints: list[tuple[int, str]]) -> None:
            if routed.is_set():
                release.wait(2.0)
            on_idle(hints)

        notifier.route, notifier._on_idle = slow_route, slow_idle
        subprocess.run([sys.executable, "-c", _PUBLISHER.format(url=url)], check=True, timeout=60)
        routed.wait(10)
        first = sub.get(timeout=10)
        release.set()
        second = sub.get(timeout=10)
        sub.close()
        assert [first.data, second.data] == ["first", "second"]  # type: ignore[union-attr]


def test_publication_order_while_the_overflow_flag_is_cleared() -> None:
    # As above, but the subscriber reads just after its notifier thread cleared the overflow
    # flag and before it marked the feeds for a full re-read (the thread is preempted there).
    url = f"shm://{unique_name('order')}"
    with sharedkv.Store(url) as store:
        sub = store.subscribe("ch.*")
        feed: Any = sub._feed
        clearing, release = threading.Event(), threading.Event()
        hint = feed.hint

        def slow_hint(name: str | None) -> None:
            if name is None:  # "re-read everything": the overflow was noticed
                clearing.set()
                release.wait(2.0)
            hint(name)

        feed.hint = slow_hint
        subprocess.run([sys.executable, "-c", _PUBLISHER.format(url=url)], check=True, timeout=60)
        clearing.wait(10)
        first = sub.get(timeout=10)
        release.set()
        second = sub.get(timeout=10)
        sub.close()
        assert [first.data, second.data] == ["first", "second"]  # type: ignore[union-attr]


_THREE = """
import sharedkv, sys
s = sharedkv.Store(sys.argv[1])
for channel, data in [("ch.x", "m1"), ("ch.y", "m2"), ("ch.x", "m3")]:
    s.publish(channel, data)
s.close()
"""


def test_publication_order_across_channels_with_wakeups_in_flight() -> None:
    # No wake-up is lost here: the notifier thread is only preempted between routing the
    # wake-up for "ch.x" and the one for "ch.y", and the subscriber reads in between.
    url = f"shm://{unique_name('order')}"
    with sharedkv.Store(url) as store:
        sub = store.subscribe("ch.*")
        notifier: Any = store.backend._notifier  # type: ignore[attr-defined]
        published, routed, read = threading.Event(), threading.Event(), threading.Event()
        route = notifier.route

        def slow_route(kind: int, name: str | None, message: bytes | None = None) -> None:
            published.wait(10)
            route(kind, name, message)
            if name == "ch.x" and not routed.is_set():
                routed.set()
                read.wait(2.0)

        notifier.route = slow_route
        subprocess.run([sys.executable, "-c", _THREE, url], check=True, timeout=60)
        published.set()
        routed.wait(10)
        first = sub.get(timeout=10)
        read.set()
        rest = [sub.get(timeout=10), sub.get(timeout=10)]
        sub.close()
        assert [m.data for m in (first, *rest)] == ["m1", "m2", "m3"]  # type: ignore[union-attr]


_ONE = "import sharedkv, sys; s = sharedkv.Store(sys.argv[1]); s.publish(sys.argv[2], sys.argv[3])"


def test_subscribe_listens_before_it_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    # A wake-up sent to a registered process whose socket is not bound yet would be refused, and
    # its message would wait for the next wake-up on that channel: bind first, then register.
    from sharedkv._backends.shm import ShmBackend

    url = f"shm://{unique_name('bind')}"
    with sharedkv.Store(url) as store:
        backend: Any = store.backend
        seen: list[bool] = []
        real = ShmBackend._add_interest

        def add_interest(self: Any, w: Any, kind: bytes, pattern: str, delta: int) -> None:
            seen.append(self._notifier.listening)
            real(self, w, kind, pattern, delta)

        monkeypatch.setattr(ShmBackend, "_add_interest", add_interest)
        sub = store.subscribe("ch.*")
        watch = store.watch("k*")
        assert seen and all(seen)
        subprocess.run([sys.executable, "-c", _ONE, url, "ch.a", "first"], check=True)
        assert sub.get(timeout=5).data == "first"  # type: ignore[union-attr]
        sub.close()
        watch.close()
        assert backend._notifier.listening


_SUBSCRIBER = """
import sharedkv, time
s = sharedkv.Store({url!r})
sub = s.subscribe("ch")
print("ready", flush=True)
time.sleep(600)
"""


def test_no_overflow_flag_outlives_a_reaped_subscriber(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"shm://{unique_name('ovf')}"
    with (
        sharedkv.Store(url) as store,
        subprocess.Popen(
            [sys.executable, "-c", _SUBSCRIBER.format(url=url)], stdout=subprocess.PIPE, text=True
        ) as child,
    ):
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        backend: Any = store.backend
        real = _notify.Notifier.send

        def send(self: _notify.Notifier, token: str, *hint: Any) -> int:
            real(self, token, *hint)
            # The receiver's socket was full; before the publisher writes the overflow flag, the
            # receiver is killed and another process reaps what it left.
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
            backend.reap_dead()
            return _notify.FULL

        monkeypatch.setattr(_notify.Notifier, "send", send)
        store.publish("ch", 1)
        monkeypatch.undo()
        backend.reap_dead()
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            with backend._env.begin(db=backend._meta) as txn:
                flags = [bytes(k) for k, _ in txn.cursor() if bytes(k).startswith(b"ovf")]
            if not flags:
                break
            time.sleep(0.05)
        assert flags == []


_OWNER = """
import sharedkv, sys
s = sharedkv.Store({url!r})
s.set("mine", 1, ephemeral=True)
print("ready", flush=True)
sys.stdin.readline()
"""


def test_ephemeral_key_of_dead_owner_vanishes_at_once() -> None:
    # docs/architecture.md: ephemeral keys of a dead owner vanish for every reader at once.
    url = f"shm://{unique_name('eph')}"
    with (
        sharedkv.Store(url) as store,
        subprocess.Popen(
            [sys.executable, "-c", _OWNER.format(url=url)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as owner,
    ):
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        assert store.get("mine") == 1  # this reader has now seen the owner alive
        owner.kill()
        owner.wait(30)
        seen = store.get("mine")
        if time.monotonic() - t0 > 0.15:
            pytest.skip("the machine was too slow to read again within 0.15 s of the death")
        assert seen is None
