"""Message delivery between real processes on the shared-memory backend: sync callbacks on the
thread that receives their wake-ups, one wake-up per channel until it is taken, messages carried
in their wake-up, and what happens when a subscriber blocks or dies."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import sharedkv

from .conftest import unique_name

CTX = multiprocessing.get_context("spawn")


@pytest.fixture
def named() -> Iterator[sharedkv.Store]:
    store = sharedkv.Store(f"shm://{unique_name('d')}", buffer=100_000)
    yield store
    store.close()


def _publish_all(store: sharedkv.Store, plan: list[tuple[str, Any, float]]) -> None:
    for channel, data, pause in plan:
        store.publish(channel, data)
        if pause:
            time.sleep(pause)


def _run_publisher(store: sharedkv.Store, plan: list[tuple[str, Any, float]]) -> None:
    proc = CTX.Process(target=_publish_all, args=(store, plan))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0


def _wait_for(condition: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_callbacks_get_every_message_in_publication_order(named: sharedkv.Store) -> None:
    # Paced messages (each wake-up carries its message), bursts (one wake-up for many
    # messages) and several channels, from one publisher: one order, no loss, on the
    # documented thread. A subscription read with get() in the same process sees the same.
    got: list[tuple[str, Any, int, str]] = []

    @named.on_message("ord.*")
    def record(message: sharedkv.Message) -> None:
        got.append((message.channel, message.data, message.seq, threading.current_thread().name))

    plain = named.subscribe("ord.*")
    plan: list[tuple[str, Any, float]] = []
    for i in range(40):  # sporadic
        plan.append((f"ord.{'ab'[i % 2]}", i, 0.002))
    for i in range(40, 2040):  # bursts
        plan.append((f"ord.{'abc'[i % 3]}", i, 0.0))
    big = b"x" * (100 << 10), b"y" * (300 << 10)  # carried, and too big to be carried
    plan += [("ord.a", big[0], 0.01), ("ord.b", big[1], 0.01), ("ord.c", "last", 0.0)]
    _run_publisher(named, plan)
    assert _wait_for(lambda: len(got) == len(plan))
    expected = [data for _, data, _ in plan]
    assert [data for _, data, _, _ in got] == expected
    assert {thread for _, _, _, thread in got} == {"sharedkv-callbacks"}
    for channel in ("ord.a", "ord.b", "ord.c"):
        seqs = [seq for ch, _, seq, _ in got if ch == channel]
        assert seqs == list(range(1, len(seqs) + 1))
    read = [plain.get(timeout=10) for _ in plan]
    assert [m.data for m in read] == expected  # type: ignore[union-attr]
    plain.close()


def test_callbacks_of_two_processes_both_get_everything(named: sharedkv.Store) -> None:
    counts = CTX.Queue()
    ready = CTX.Event()
    child = CTX.Process(target=_count_in_child, args=(named, 500, ready, counts))
    child.start()
    assert ready.wait(30)
    got: list[int] = []
    named.on_message("both")(lambda message: got.append(message.data))
    _run_publisher(named, [("both", i, 0.0005 if i % 50 == 0 else 0.0) for i in range(500)])
    assert counts.get(timeout=30) == list(range(500))
    child.join(30)
    assert _wait_for(lambda: len(got) == 500)
    assert got == list(range(500))


def _count_in_child(store: sharedkv.Store, n: int, ready: Any, out: Any) -> None:
    got: list[int] = []
    done = threading.Event()

    @store.on_message("both")
    def record(message: sharedkv.Message) -> None:
        got.append(message.data)
        if len(got) == n:
            done.set()

    ready.set()
    done.wait(30)
    out.put(got)
    store.close()


def _publish_then_feed_others(store: sharedkv.Store) -> None:
    store.publish("block", "stuck")
    time.sleep(0.2)  # the callback is blocked by now
    store.queue("work").put("item")
    store.publish("free", "passes")


def test_a_blocked_callback_does_not_hold_up_other_waiters(named: sharedkv.Store) -> None:
    # A sync callback that blocks (here until the end of the test) must not keep this
    # process's queue getters and subscription readers from being woken.
    release, blocked = threading.Event(), threading.Event()

    @named.on_message("block")
    def stuck(message: sharedkv.Message) -> None:
        blocked.set()
        release.wait(30)

    free = named.subscribe("free")
    proc = CTX.Process(target=_publish_then_feed_others, args=(named,))
    proc.start()
    try:
        assert blocked.wait(20)
        assert named.queue("work").get(timeout=20) == "item"
        assert free.get(timeout=20).data == "passes"  # type: ignore[union-attr]
    finally:
        release.set()
        proc.join(30)
    free.close()


def _block_in_callback(store: sharedkv.Store, ready: Any) -> None:
    store.on_message("gone")(lambda message: time.sleep(600))
    ready.set()
    time.sleep(600)


def test_a_killed_callback_process_is_forgotten(named: sharedkv.Store) -> None:
    # The child dies while its wake-up for "gone" is untaken (its callback never returns), so
    # publishers send it no more wake-ups for that channel; they still learn of its death.
    ready = CTX.Event()
    child = CTX.Process(target=_block_in_callback, args=(named, ready))
    child.start()
    assert ready.wait(30)
    assert named.publish("gone", 1) == 1
    time.sleep(0.2)
    assert named.publish("gone", 2) == 1  # not woken again while the first is untaken
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join(30)
    assert _wait_for(lambda: named.publish("gone", 3) == 0, timeout=10)


def test_a_subscriber_added_later_gets_only_later_messages(named: sharedkv.Store) -> None:
    named.subscribe("late").close()  # the channel has followers, then none
    _run_publisher(named, [("late", i, 0.0) for i in range(5)])
    got: list[int] = []
    named.on_message("late")(lambda message: got.append(message.data))
    _run_publisher(named, [("late", i, 0.001) for i in range(5, 10)])
    assert _wait_for(lambda: len(got) == 5)
    time.sleep(0.1)
    assert got == list(range(5, 10))


def test_a_forged_wakeup_cannot_carry_a_message(named: sharedkv.Store) -> None:
    # Anyone on the machine can send to an abstract socket: a datagram that claims to carry a
    # message without the store's secret is only a wake-up.
    import pickle
    import socket
    import struct

    got: list[Any] = []
    named.on_message("sec")(lambda message: got.append((message.data, message.seq)))
    address = named.backend._callbacks.address  # type: ignore[attr-defined]
    header = struct.pack("<16sQQ", b"\0" * 16, 1, 1)
    forged = b"csec\0" + header + pickle.dumps("forged")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(forged, address)
    time.sleep(0.2)
    _run_publisher(named, [("sec", "real", 0.0)])
    assert _wait_for(lambda: len(got) == 1)
    time.sleep(0.1)
    assert got == [("real", 1)]


def _read_all(sub: sharedkv.Subscription, n: int, out: list[Any]) -> None:
    for _ in range(n):
        out.append(sub.get(timeout=20).data)  # type: ignore[union-attr]


def test_a_process_with_callbacks_and_readers_on_one_channel(named: sharedkv.Store) -> None:
    # The same process follows a channel with a sync callback, an async callback and a
    # subscription read by a thread, while bursts arrive: each gets every message, in order.
    from_sync: list[Any] = []
    named.on_message("mix")(lambda message: from_sync.append(message.data))
    from_async: list[Any] = []

    async def record(message: sharedkv.Message) -> None:
        from_async.append(message.data)

    named.on_message("mix")(record)
    loop = asyncio.new_event_loop()
    serving = threading.Thread(target=loop.run_until_complete, args=(named.start_receive_loop(),))
    serving.start()
    read: list[Any] = []
    reader = threading.Thread(target=_read_all, args=(named.subscribe("mix"), 300, read))
    reader.start()
    plan = [("mix", i, 0.003 if i % 3 == 0 else 0.0) for i in range(300)]
    try:
        _run_publisher(named, plan)
        reader.join(30)
        assert _wait_for(lambda: len(from_sync) == len(from_async) == 300)
        assert read == from_sync == from_async == list(range(300))
    finally:
        named.close()  # ends the receive loop
        serving.join(10)
        loop.close()


# -- a waiting thread reads its process's socket itself ---------------------------------------
# A thread blocked in get() receives its wake-ups directly (Notifier.lead); when it leaves and
# nothing else in the process needs the socket, the socket stays with the next waiter. These
# tests make sure nothing else in the process is ever left without its wake-ups.


def _publish_paced(store: sharedkv.Store, channel: str, items: list[Any], pause: float) -> None:
    time.sleep(0.3)  # let the parent's readers block first
    for item in items:
        store.publish(channel, item)
        time.sleep(pause)


def _start_publisher(store: sharedkv.Store, channel: str, items: list[Any], pause: float) -> Any:
    proc = CTX.Process(target=_publish_paced, args=(store, channel, items, pause))
    proc.start()
    return proc


def test_two_threads_waiting_on_one_subscription_share_its_messages(
    named: sharedkv.Store,
) -> None:
    sub = named.subscribe("share")
    got: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while len(got) < 40:
                got.append(sub.get(timeout=20).data)
        except (sharedkv.TimeoutError, sharedkv.ClosedError):
            pass  # the other reader took the last message; close() ends this one
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    proc = _start_publisher(named, "share", list(range(40)), 0.005)
    proc.join(60)
    assert _wait_for(lambda: len(got) >= 40)
    sub.close()  # ends the reader still waiting
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert not errors
    assert sorted(got) == list(range(40))


def test_a_waiter_on_one_feed_routes_the_wakeups_of_the_others(named: sharedkv.Store) -> None:
    # One thread blocks in get() on a quiet channel for the whole test; meanwhile callbacks,
    # another thread's subscription, an async reader and a watch (with an expiry) in the same
    # process all get what another process sends.
    quiet = named.subscribe("quiet")
    busy = named.subscribe("busy")
    watch = named.watch("ttl:*")
    waited: list[BaseException] = []

    def wait_quietly() -> None:
        # One long wait: this thread reads the socket for the whole test.
        try:
            quiet.get(timeout=60)
        except sharedkv.ClosedError:
            return
        except BaseException as exc:
            waited.append(exc)

    waiter = threading.Thread(target=wait_quietly)
    waiter.start()
    try:
        time.sleep(0.2)
        by_callback: list[int] = []
        named.on_message("busy")(lambda message: by_callback.append(message.data))

        async def read_async() -> list[int]:
            async_sub = named.subscribe("busy")
            return [(await async_sub.get_async(timeout=20)).data for _ in range(20)]

        async_result: list[list[int]] = []
        async_thread = threading.Thread(
            target=lambda: async_result.append(asyncio.run(read_async()))
        )
        async_thread.start()
        time.sleep(0.2)
        proc = _start_publisher(named, "busy", list(range(20)), 0.01)
        read = [busy.get(timeout=20).data for _ in range(20)]
        proc.join(60)
        async_thread.join(30)
        assert read == list(range(20))
        assert async_result == [list(range(20))]
        assert _wait_for(lambda: len(by_callback) == 20)
        assert by_callback == list(range(20))

        setter = CTX.Process(target=_set_with_ttl, args=(named,))
        setter.start()
        setter.join(60)
        events = [watch.get(timeout=20) for _ in range(2)]
        assert [(e.kind, e.key) for e in events] == [("set", "ttl:k"), ("expire", "ttl:k")]
    finally:
        quiet.close()
        waiter.join(30)
    assert not waiter.is_alive()
    assert not waited


def _set_with_ttl(store: sharedkv.Store) -> None:
    store.set("ttl:k", 1, ttl=0.3)


def test_feeds_opened_after_a_waiter_left_get_their_wakeups(named: sharedkv.Store) -> None:
    # A waiter that had the socket to itself leaves it untended; whatever comes next in this
    # process (a new subscription read from another thread, an async callback) still hears.
    first = named.subscribe("first")
    proc = _start_publisher(named, "first", ["one"], 0)
    assert first.get(timeout=20).data == "one"
    proc.join(60)

    # the same subscription, now read by a coroutine
    async def read_first() -> Any:
        return (await first.get_async(timeout=20)).data

    proc = _start_publisher(named, "first", ["two"], 0)
    assert asyncio.run(read_first()) == "two"
    proc.join(60)

    second = named.subscribe("second")
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(second.get(timeout=20).data))
    reader.start()
    proc = _start_publisher(named, "second", ["2nd"], 0)
    proc.join(60)
    reader.join(30)
    assert got == ["2nd"]

    async def with_async_callback() -> list[Any]:
        received: list[Any] = []
        done = asyncio.Event()

        @named.on_message("third")
        async def handle(message: sharedkv.Message) -> None:
            received.append(message.data)
            done.set()

        publisher = _start_publisher(named, "third", ["three"], 0)
        await asyncio.wait_for(done.wait(), 20)
        publisher.join(60)
        return received

    # the main thread, which led before, now only runs an event loop
    assert asyncio.run(with_async_callback()) == ["three"]


def test_a_waiter_that_times_out_hands_the_socket_to_the_next(named: sharedkv.Store) -> None:
    # Thread A waits first (so it reads the socket) and gives up; thread B, which waited on the
    # same subscription behind it, must still be woken by a later message.
    sub = named.subscribe("handover")
    outcome: dict[str, Any] = {}

    def wait(name: str, timeout: float) -> None:
        started = time.monotonic()
        try:
            outcome[name] = sub.get(timeout=timeout).data
        except sharedkv.TimeoutError:
            outcome[name] = "timeout"
        outcome[name + " waited"] = time.monotonic() - started

    a = threading.Thread(target=wait, args=("a", 0.5))
    a.start()
    time.sleep(0.2)
    b = threading.Thread(target=wait, args=("b", 30))
    b.start()
    a.join(30)
    proc = _start_publisher(named, "handover", ["late"], 0)  # published about 1 s in
    b.join(40)
    proc.join(60)
    assert outcome["a"] == "timeout"
    assert outcome["b"] == "late"
    assert outcome["b waited"] < 15
