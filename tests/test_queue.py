"""The queue primitive across real processes: exactly-once hand-off, backpressure, timeouts,
prompt wake-ups, and what a consumer killed mid-stream costs (at most the item it held)."""

from __future__ import annotations

import asyncio
import collections
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import sharedkv
from sharedkv import JSONSerializer

from .conftest import unique_name

SPAWN = multiprocessing.get_context("spawn")
DONE = None  # the end-of-stream marker consumers stop at


@pytest.fixture
def qstore() -> Iterator[sharedkv.Store]:
    """A shared-memory store of its own, reachable by children through its address."""
    store = sharedkv.Store(f"shm://{unique_name('q')}")
    try:
        yield store
    finally:
        store.close()


def cross_process(store: sharedkv.Store) -> sharedkv.Store:
    if store.url.startswith("memory://"):
        pytest.skip("a memory:// store is private to one process")
    return store


def _join_all(procs: list[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    stuck = [p for p in procs if p.is_alive()]
    for proc in stuck:
        proc.kill()
        proc.join(5)
    assert not stuck, f"{len(stuck)} children did not finish in {timeout} s"


def _wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- many producers, many consumers: every item exactly once ---------------------------------------
def _producer(url: str, queue: str, who: int, count: int, start: Any) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue)
    start.wait(30)
    for i in range(count):
        q.put((who, i))
    store.close()


def _consumer(url: str, queue: str, who: int, start: Any) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue)
    got = []
    start.wait(30)
    while (item := q.get(timeout=30)) is not DONE:
        got.append(item)
    store.set(f"consumed:{who}", got)
    store.close()


def test_four_producers_four_consumers_every_item_exactly_once(qstore: sharedkv.Store) -> None:
    producers, consumers, per_producer = 4, 4, 10_000
    start = SPAWN.Event()
    prods = [
        SPAWN.Process(target=_producer, args=(qstore.url, "work", p, per_producer, start))
        for p in range(producers)
    ]
    cons = [
        SPAWN.Process(target=_consumer, args=(qstore.url, "work", c, start))
        for c in range(consumers)
    ]
    for proc in prods + cons:
        proc.start()
    start.set()
    _join_all(prods)
    q = qstore.queue("work")
    for _ in range(consumers):
        q.put(DONE)  # after every item, so each consumer stops only once all are taken
    _join_all(cons)
    assert all(p.exitcode == 0 for p in prods + cons)

    per_consumer = [qstore.get(f"consumed:{c}") for c in range(consumers)]
    consumed = collections.Counter(tuple(item) for got in per_consumer for item in got)
    produced = collections.Counter((p, i) for p in range(producers) for i in range(per_producer))
    assert consumed == produced  # as multisets: nothing lost, nothing duplicated
    assert q.qsize() == 0
    # FIFO: whatever share of a producer's items a consumer got, it got them in order.
    for got in per_consumer:
        last: dict[int, int] = {}
        for who, i in got:
            assert i > last.get(who, -1)
            last[who] = i


# -- bounded queues push back -------------------------------------------------------------------
def _bounded_producer(url: str, queue: str, maxsize: int, count: int) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue, maxsize=maxsize)
    for i in range(count):
        q.put(i, timeout=20)
        store.set("progress", i + 1)
    store.close()


def test_bounded_queue_blocks_a_producer_in_another_process(store: sharedkv.Store) -> None:
    cross_process(store)
    maxsize, count = 4, 12
    q = store.queue("bounded", maxsize=maxsize)
    proc = SPAWN.Process(target=_bounded_producer, args=(store.url, "bounded", maxsize, count))
    proc.start()
    try:
        _wait_for(lambda: store.get("progress") == maxsize, what="the queue to fill")
        time.sleep(0.3)
        assert store.get("progress") == maxsize  # blocked: the fifth put waits for room
        assert q.qsize() == maxsize
        got: list[int] = []
        while len(got) < count:
            got.append(q.get(timeout=20))
            assert q.qsize() <= maxsize
        assert got == list(range(count))
    finally:
        _join_all([proc])
    assert proc.exitcode == 0


def test_put_on_a_full_queue_times_out(store: sharedkv.Store) -> None:
    q = store.queue("full", maxsize=2)
    q.put("a")
    q.put("b")
    with pytest.raises(sharedkv.QueueFull):
        q.put_nowait("c")
    with pytest.raises(sharedkv.QueueFull):
        q.put("c", block=False)
    t0 = time.monotonic()
    with pytest.raises(sharedkv.QueueFull):
        q.put("c", timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2.0
    with pytest.raises(sharedkv.QueueFull):
        asyncio.run(q.put_async("c", timeout=0.1))
    assert [q.get_nowait(), q.get_nowait()] == ["a", "b"]


# -- timeouts ---------------------------------------------------------------------------------------
def test_get_times_out(store: sharedkv.Store) -> None:
    q = store.queue("empty")
    assert math.isfinite(sharedkv.DEFAULT_TIMEOUT) and sharedkv.DEFAULT_TIMEOUT > 0
    with pytest.raises(sharedkv.QueueEmpty):
        q.get_nowait()
    t0 = time.monotonic()
    with pytest.raises(sharedkv.QueueEmpty):
        q.get(block=False)
    with pytest.raises(sharedkv.QueueEmpty):
        q.get(timeout=0)
    assert time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    with pytest.raises(sharedkv.QueueEmpty):
        q.get(timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    with pytest.raises(sharedkv.QueueEmpty):
        asyncio.run(q.get_async(timeout=0.2))
    assert 0.2 <= time.monotonic() - t0 < 2.0
    with pytest.raises(ValueError):
        q.get(timeout=-1)


# -- a blocked get wakes promptly when another process puts ------------------------------------------
ROUNDS = 4
PAUSE = 0.3  # long enough for the other side to be asleep in get()


def _ping_pong(url: str) -> None:
    store = sharedkv.Store(url)
    to_parent, to_child = store.queue("to-parent"), store.queue("to-child")
    for _ in range(ROUNDS):
        time.sleep(PAUSE)
        to_parent.put(time.monotonic())
    latencies = []
    for r in range(ROUNDS):
        sent = asyncio.run(to_child.get_async(timeout=20)) if r % 2 else to_child.get(timeout=20)
        latencies.append(time.monotonic() - sent)
    store.set("child-latencies", latencies)
    store.close()


def test_blocked_get_wakes_promptly_on_a_put_from_another_process(store: sharedkv.Store) -> None:
    cross_process(store)
    to_parent, to_child = store.queue("to-parent"), store.queue("to-child")
    proc = SPAWN.Process(target=_ping_pong, args=(store.url,))
    proc.start()
    try:
        latencies, blocked = [], []
        for r in range(ROUNDS):
            t0 = time.monotonic()
            if r % 2:
                sent = asyncio.run(to_parent.get_async(timeout=20))
            else:
                sent = to_parent.get(timeout=20)
            now = time.monotonic()
            latencies.append(now - sent)
            blocked.append(now - t0)
        for _ in range(ROUNDS):
            time.sleep(PAUSE)
            to_child.put(time.monotonic())
    finally:
        _join_all([proc])
    assert proc.exitcode == 0
    assert max(blocked[1:]) > PAUSE / 3  # the parent really was asleep in get()
    assert max(latencies) < 1.0, latencies
    assert max(store.get("child-latencies")) < 1.0, store.get("child-latencies")


# -- a consumer killed mid-stream -------------------------------------------------------------
def _slow_consumer(url: str, queue: str, who: int, start: Any) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue)
    got = []
    start.wait(30)
    while (item := q.get(timeout=30)) is not DONE:
        got.append(item)
        time.sleep(0.001)
    store.set(f"consumed:{who}", got)
    store.close()


def _victim(url: str, queue: str, start: Any) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue)
    start.wait(30)
    while True:  # until killed
        item = q.get(timeout=30)
        store.set(f"victim:{item}", True)  # recorded only after it was taken
        store.incr("victim-count")
        time.sleep(0.001)


def test_consumer_killed_mid_stream_loses_at_most_its_item(qstore: sharedkv.Store) -> None:
    """The guarantee: delivery is at most once. Taking an item removes it atomically, so an item
    the killed consumer had taken is gone with it (here, at most the one it held), nothing is
    ever delivered twice, and every other item is consumed by the survivors."""
    total, survivors = 3000, 2
    q = qstore.queue("stream")
    for i in range(total):
        q.put(i)
    start = SPAWN.Event()
    victim = SPAWN.Process(target=_victim, args=(qstore.url, "stream", start))
    others = [
        SPAWN.Process(target=_slow_consumer, args=(qstore.url, "stream", c, start))
        for c in range(survivors)
    ]
    for proc in [victim, *others]:
        proc.start()
    start.set()
    try:
        _wait_for(lambda: (qstore.get("victim-count") or 0) >= 100, what="the victim to work")
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)  # at any point: between get and record, mid-commit...
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL
        assert q.qsize() > 0, "the stream ended before the kill; the test proves nothing"
        for _ in range(survivors):
            q.put(DONE)
    finally:
        _join_all(others)
        if victim.is_alive():
            victim.kill()
            victim.join(5)
    assert all(p.exitcode == 0 for p in others)

    by_victim = {int(key.split(":")[1]) for key in qstore.keys("victim:*")}
    by_others = [item for c in range(survivors) for item in qstore.get(f"consumed:{c}")]
    assert len(by_others) == len(set(by_others))  # no duplicates among the survivors
    assert not by_victim & set(by_others)  # nothing taken by two consumers
    lost = set(range(total)) - by_victim - set(by_others)
    assert len(lost) <= 1, lost  # at most the one item the victim held when it died
    assert len(by_victim) >= 100
    # The queue is intact and usable after the kill.
    assert q.qsize() == 0
    q.put("after")
    assert q.get(timeout=5) == "after"


# -- one producer process, one consumer, on every backend that crosses processes --------------------
def _fifo_producer(url: str, count: int) -> None:
    store = sharedkv.Store(url)
    q = store.queue("fifo")
    for i in range(count):
        q.put({"i": i, "pad": "x" * (i % 50)})
    store.close()


def test_fifo_across_processes(store: sharedkv.Store) -> None:
    cross_process(store)
    q = store.queue("fifo")
    proc = SPAWN.Process(target=_fifo_producer, args=(store.url, 500))
    proc.start()
    try:
        got = [q.get(timeout=20)["i"] for _ in range(500)]
    finally:
        _join_all([proc])
    assert got == list(range(500))
    assert q.empty()


# -- batches: put_many / get_many ------------------------------------------------------------
def test_put_many_and_get_many_keep_fifo_order(store: sharedkv.Store) -> None:
    q = store.queue("batch")
    q.put("first")
    q.put_many([{"i": i} for i in range(5)])
    q.put_many(iter(["g1", "g2"]))  # any iterable, generators included
    q.put_many([])  # nothing to do
    assert q.qsize() == 8
    assert q.get_many(3) == ["first", {"i": 0}, {"i": 1}]
    assert q.get() == {"i": 2}
    assert q.get_many(100, timeout=1) == [{"i": 3}, {"i": 4}, "g1", "g2"]  # what is there
    assert q.qsize() == 0
    with pytest.raises(sharedkv.QueueEmpty):
        q.get_many(10, timeout=0)
    t0 = time.monotonic()
    with pytest.raises(sharedkv.QueueEmpty):
        q.get_many(10, timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2.0


def test_large_batches(store: sharedkv.Store) -> None:
    q = store.queue("large", maxsize=5_000)
    q.put_many(range(2_500))  # more values than one Redis command of the script takes
    q.put_many(range(2_500, 5_000))
    assert q.full()
    assert q.get_many(3_000) == list(range(3_000))
    assert q.get_many(3_000) == list(range(3_000, 5_000))


def test_get_many_returns_as_soon_as_one_item_arrives(store: sharedkv.Store) -> None:
    q = store.queue("first-of-batch")
    threading.Timer(0.1, lambda: q.put("late")).start()
    t0 = time.monotonic()
    assert q.get_many(50, timeout=10) == ["late"]
    assert time.monotonic() - t0 < 5


def test_batches_async(store: sharedkv.Store) -> None:
    q = store.queue("abatch", maxsize=3)

    async def main() -> list[Any]:
        await q.put_many_async(["a", "b"])
        with pytest.raises(sharedkv.QueueFull):
            await q.put_many_async(["c", "d"], timeout=0.1)  # room for one only
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, q.get)  # makes room for both
        await q.put_many_async(["c", "d"], timeout=10)
        got = await q.get_many_async(10, timeout=1)
        loop.call_later(0.05, q.put, "e")
        got += await q.get_many_async(10, timeout=10)  # waits for the first item
        with pytest.raises(sharedkv.QueueEmpty):
            await q.get_many_async(10, timeout=0.1)
        return got

    assert asyncio.run(main()) == ["b", "c", "d", "e"]


def test_put_many_is_all_or_nothing_on_a_bounded_queue(store: sharedkv.Store) -> None:
    q = store.queue("bounded-batch", maxsize=4)
    with pytest.raises(ValueError, match="can never fit"):
        q.put_many(range(5))
    assert q.qsize() == 0
    q.put_many([1, 2])
    t0 = time.monotonic()
    with pytest.raises(sharedkv.QueueFull):
        q.put_many([3, 4, 5], timeout=0.2)  # room for two of three: none is put
    assert 0.2 <= time.monotonic() - t0 < 2.0
    with pytest.raises(sharedkv.QueueFull):
        q.put_many([3, 4, 5], timeout=0)
    assert q.qsize() == 2
    q.put_many([3, 4], timeout=0)
    assert q.full()
    assert q.get_many(4) == [1, 2, 3, 4]


def test_bad_batch_input_changes_nothing(store: sharedkv.Store) -> None:
    q = store.queue("bad-batch")
    q.put("kept")

    def items_then_failure() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("the producer's iterable broke")

    for items, error in [
        (5, TypeError),  # not iterable
        (None, TypeError),
        ("abc", TypeError),  # one str, not three one-character items
        (b"abc", TypeError),
        ([1, lambda: None], sharedkv.SerializationError),  # the second cannot be pickled
    ]:
        with pytest.raises(error):
            q.put_many(items)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="broke"):
        q.put_many(items_then_failure())
    with pytest.raises(ValueError):
        q.put_many([1], timeout=-1)
    for max_items, error in [
        (0, ValueError),
        (-3, ValueError),
        (1.5, TypeError),
        (True, TypeError),
    ]:
        with pytest.raises(error):
            q.get_many(max_items)  # type: ignore[arg-type]
        with pytest.raises(error):
            asyncio.run(q.get_many_async(max_items))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        q.get_many(1, timeout=math.nan)
    assert q.qsize() == 1
    assert q.get_many(10) == ["kept"]


def test_closed_handle_refuses_batches(store: sharedkv.Store) -> None:
    q = store.queue("closed-batch")
    q.put_many([1, 2])
    q.close()
    with pytest.raises(sharedkv.ClosedError):
        q.put_many([3])
    with pytest.raises(sharedkv.ClosedError):
        q.get_many(5)
    assert store.queue("closed-batch").get_many(5) == [1, 2]  # the items stay for others


def test_an_undecodable_item_does_not_cost_the_rest_of_its_batch() -> None:
    url = f"shm://{unique_name('codec')}"
    with sharedkv.Store(url) as pickling, sharedkv.Store(url, serializer=JSONSerializer()) as safe:
        mixed = safe.queue("mixed")
        mixed.put_many(["a", "b"])
        pickling.queue("mixed").put({"a set"})  # JSON cannot decode this
        mixed.put_many(["c", "d"])
        assert mixed.get_many(10) == ["a", "b"]  # everything before the bad item
        assert mixed.qsize() == 0  # the rest is held by this handle, taken once
        with pytest.raises(sharedkv.SerializationError):
            mixed.get_many(10)
        assert mixed.get() == "c"
        assert mixed.get_many(10) == ["d"]
        pickling.queue("mixed").put({"another set"})
        with pytest.raises(sharedkv.SerializationError):
            mixed.get_many(10)  # first of its batch: raised at once
        mixed.put("e")
        assert mixed.get_many(10) == ["e"]


def test_closing_a_handle_puts_back_what_it_holds_after_an_undecodable_item() -> None:
    url = f"shm://{unique_name('codec')}"
    with sharedkv.Store(url) as pickling, sharedkv.Store(url, serializer=JSONSerializer()) as safe:
        mixed = safe.queue("held")
        mixed.put("a")
        pickling.queue("held").put({"a set"})  # JSON cannot decode this
        mixed.put_many(["b", "c"])
        assert mixed.get_many(10) == ["a"]  # "b" and "c" are held by this handle now
        with pytest.raises(sharedkv.SerializationError):
            mixed.get()
        mixed.close()
        assert safe.queue("held").get_many(10) == ["b", "c"]  # back in the queue, not lost


# -- batches across threads and processes ------------------------------------------------------
def _batch_producer(url: str, queue: str, who: int, count: int, start: Any) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue)
    start.wait(30)
    i = 0
    while i < count:
        size = min(count - i, 1 + (i * 7 + who) % 50)  # batches of 1 to 50 items
        q.put_many([(who, n) for n in range(i, i + size)])
        i += size
    store.close()


def _batch_consumer(url: str, queue: str, who: int, start: Any) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue)
    got: list[Any] = []
    start.wait(30)
    while True:
        batch = q.get_many(1 + who * 13, timeout=30)  # 1, 14, 27 and 40 items at most
        got += [item for item in batch if item is not DONE]
        if DONE in batch:
            _keep_one_end_marker(q, batch)
            break
    store.set(f"consumed:{who}", got)
    store.close()


def _keep_one_end_marker(q: sharedkv.Queue, batch: list[Any]) -> None:
    """A batch may hold the end markers of other consumers too: give those back."""
    if batch.count(DONE) > 1:
        q.put_many([DONE] * (batch.count(DONE) - 1))


def _check_exactly_once(per_consumer: list[list[Any]], producers: int, per_producer: int) -> None:
    consumed = collections.Counter(tuple(item) for got in per_consumer for item in got)
    produced = collections.Counter((p, i) for p in range(producers) for i in range(per_producer))
    assert consumed == produced  # as multisets: nothing lost, nothing duplicated
    for got in per_consumer:  # FIFO per producer, within whatever share each consumer got
        last: dict[int, int] = {}
        for who, i in got:
            assert i > last.get(who, -1)
            last[who] = i


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_four_producers_four_consumers_in_batches_every_item_exactly_once(
    qstore: sharedkv.Store, method: str
) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    ctx = multiprocessing.get_context(method)
    producers, consumers, per_producer = 4, 4, 5_000
    start = ctx.Event()
    prods = [
        ctx.Process(target=_batch_producer, args=(qstore.url, "work", p, per_producer, start))
        for p in range(producers)
    ]
    cons = [
        ctx.Process(target=_batch_consumer, args=(qstore.url, "work", c, start))
        for c in range(consumers)
    ]
    for proc in prods + cons:
        proc.start()
    start.set()
    _join_all(prods)
    q = qstore.queue("work")
    q.put_many([DONE] * consumers)  # after every item
    _join_all(cons)
    assert all(p.exitcode == 0 for p in prods + cons)
    per_consumer = [qstore.get(f"consumed:{c}") for c in range(consumers)]
    _check_exactly_once(per_consumer, producers, per_producer)
    assert q.qsize() == 0


def test_threads_share_one_handle_for_batches(store: sharedkv.Store) -> None:
    q = store.queue("threads")
    producers, consumers, per_producer = 4, 4, 1_000
    results: list[list[Any]] = [[] for _ in range(consumers)]

    def produce(who: int) -> None:
        for i in range(0, per_producer, 10):
            q.put_many([(who, n) for n in range(i, i + 10)])

    def consume(who: int) -> None:
        while True:
            batch = q.get_many(7, timeout=30)
            results[who] += [item for item in batch if item is not DONE]
            if DONE in batch:
                _keep_one_end_marker(q, batch)
                return

    threads = [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    threads += [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads[consumers:]:
        thread.join(60)
    q.put_many([DONE] * consumers)  # after every item
    for thread in threads[:consumers]:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    _check_exactly_once(results, producers, per_producer)


def _bounded_batch_producer(url: str, queue: str, maxsize: int, batches: int) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue, maxsize=maxsize)
    for b in range(batches):
        q.put_many([b * 3, b * 3 + 1, b * 3 + 2], timeout=20)
        store.set("batches-put", b + 1)
    store.close()


def test_put_many_blocks_a_producer_in_another_process_until_the_batch_fits(
    store: sharedkv.Store,
) -> None:
    cross_process(store)
    maxsize, batches = 4, 5
    q = store.queue("bounded-batches", maxsize=maxsize)
    proc = SPAWN.Process(
        target=_bounded_batch_producer, args=(store.url, "bounded-batches", maxsize, batches)
    )
    proc.start()
    try:
        _wait_for(lambda: store.get("batches-put") == 1, what="the first batch")
        time.sleep(0.3)
        assert store.get("batches-put") == 1  # 3 queued, the next 3 do not fit in 4
        assert q.qsize() == 3
        got = [q.get()]  # room for one: still not enough for three
        time.sleep(0.3)
        assert store.get("batches-put") == 1 and q.qsize() == 2
        got += q.get_many(2)  # now the second batch fits
        while len(got) < batches * 3:
            got += q.get_many(2, timeout=20)
            assert q.qsize() <= maxsize
        assert got == list(range(batches * 3))
    finally:
        _join_all([proc])
    assert proc.exitcode == 0


def _forked_batch_child(inbox: sharedkv.Queue, outbox: sharedkv.Queue) -> None:
    # The parent's handles, inherited through fork, wait and wake in the child.
    outbox.put_many([("child got", inbox.get_many(10, timeout=20))])


def test_handles_inherited_through_fork_wait_for_batches(qstore: sharedkv.Store) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    inbox, outbox = qstore.queue("to-child"), qstore.queue("to-parent")
    with pytest.raises(sharedkv.QueueEmpty):
        inbox.get_many(5, timeout=0.05)  # the parent waited on this handle before forking
    fork = multiprocessing.get_context("fork")
    proc = fork.Process(target=_forked_batch_child, args=(inbox, outbox))
    proc.start()
    try:
        time.sleep(0.3)  # the child is asleep in get_many
        inbox.put_many(["x", "y"])
        answer = outbox.get_many(10, timeout=20)
    finally:
        _join_all([proc])
    assert proc.exitcode == 0
    assert answer == [("child got", ["x", "y"])]


def _batch_victim(url: str, queue: str, start: Any) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue)
    start.wait(30)
    while True:  # until killed
        for item in q.get_many(10, timeout=30):
            store.set(f"victim:{item}", True)
            store.incr("victim-count")
        time.sleep(0.001)


def _buffered_victim(url: str, queue: str, start: Any) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue, buffer=10)  # takes ten at a time, hands them out one by one
    start.wait(30)
    while True:  # until killed
        item = q.get(timeout=30)
        store.set(f"victim:{item}", True)
        store.incr("victim-count")
        time.sleep(0.001)


@pytest.mark.parametrize(
    "victim_loop", [_batch_victim, _buffered_victim], ids=["get_many", "buffered_get"]
)
def test_consumer_killed_holding_a_batch_loses_at_most_that_batch(
    qstore: sharedkv.Store, victim_loop: Any
) -> None:
    total, survivors, batch = 3000, 2, 10
    q = qstore.queue("stream")
    q.put_many(range(total))
    start = SPAWN.Event()
    victim = SPAWN.Process(target=victim_loop, args=(qstore.url, "stream", start))
    others = [
        SPAWN.Process(target=_slow_consumer, args=(qstore.url, "stream", c, start))
        for c in range(survivors)
    ]
    for proc in [victim, *others]:
        proc.start()
    start.set()
    try:
        _wait_for(lambda: (qstore.get("victim-count") or 0) >= 100, what="the victim to work")
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL
        assert q.qsize() > 0, "the stream ended before the kill; the test proves nothing"
        for _ in range(survivors):
            q.put(DONE)
    finally:
        _join_all(others)
        if victim.is_alive():
            victim.kill()
            victim.join(5)
    assert all(p.exitcode == 0 for p in others)
    by_victim = {int(key.split(":")[1]) for key in qstore.keys("victim:*")}
    by_others = [item for c in range(survivors) for item in qstore.get(f"consumed:{c}")]
    assert len(by_others) == len(set(by_others))
    assert not by_victim & set(by_others)
    lost = set(range(total)) - by_victim - set(by_others)
    assert len(lost) <= batch, lost  # at most the batch the victim held when it died
    assert q.qsize() == 0


# -- buffered handles: store.queue(name, buffer=N) ---------------------------------------------
def _buffered_producer(url: str, queue: str, who: int, count: int, buffer: int) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue, buffer=buffer)
    for i in range(count):
        q.put((who, i))
    store.close()  # closes the handle: writes what it holds


def _stopping_consumer(url: str, queue: str, who: int, buffer: int) -> None:
    store = sharedkv.Store(url)
    q = store.queue(queue, buffer=buffer)
    got = []
    while (item := q.get(timeout=30)) is not DONE:
        got.append(item)
    store.set(f"consumed:{who}", got)
    store.close()  # a buffered handle puts back what it took after its end marker


@pytest.mark.parametrize("consumer_buffer", [0, 7])
def test_buffered_producers_every_item_exactly_once_across_processes(
    store: sharedkv.Store, consumer_buffer: int
) -> None:
    cross_process(store)
    producers, consumers, per_producer = 3, 2, 3_000
    prods = [
        SPAWN.Process(target=_buffered_producer, args=(store.url, "work", p, per_producer, 50))
        for p in range(producers)
    ]
    cons = [
        SPAWN.Process(target=_stopping_consumer, args=(store.url, "work", c, consumer_buffer))
        for c in range(consumers)
    ]
    for proc in prods + cons:
        proc.start()
    _join_all(prods)
    q = store.queue("work")
    q.put_many([DONE] * consumers)  # after every item
    _join_all(cons)
    assert all(p.exitcode == 0 for p in prods + cons)
    per_consumer = [store.get(f"consumed:{c}") for c in range(consumers)]
    _check_exactly_once(per_consumer, producers, per_producer)
    assert q.qsize() == 0


def test_buffered_put_is_written_promptly_and_close_flushes(store: sharedkv.Store) -> None:
    q = store.queue("prompt", buffer=1_000)
    other = store.queue("prompt")
    q.put("a")  # one item, far from a full buffer: written within about a millisecond
    assert other.get(timeout=5) == "a"
    for i in range(10):
        q.put(i)
    q.close()
    assert other.get_many(20) == list(range(10))  # in the queue when close() returns
    feeders = [t for t in threading.enumerate() if t.name == "sharedkv-queue-feeder-prompt"]
    assert not feeders, feeders  # its feeder thread has ended
    with pytest.raises(sharedkv.ClosedError):
        q.put("after close")
    with pytest.raises(sharedkv.ClosedError):
        q.flush()
    q.close()  # idempotent


def test_flush_and_store_close_write_what_a_buffered_handle_holds(store: sharedkv.Store) -> None:
    cross_process(store)  # a second Store on the same data
    q = store.queue("flushed", buffer=100)
    q.put_many(["first"])  # writes what the handle holds first, then the batch, at once
    for i in range(50):
        q.put(i)
    q.flush()
    assert q.qsize() == 51
    with sharedkv.Store(store.url) as writer:
        held = writer.queue("flushed", buffer=1_000)
        for i in range(50, 60):
            held.put(i)
    # writer.close() closed the handle first: the items are in the queue
    assert q.get_many(100) == ["first", *range(60)]


def test_buffered_consumer_puts_back_what_it_took_when_closed(store: sharedkv.Store) -> None:
    q = store.queue("taken", buffer=100)
    other = store.queue("taken")
    other.put_many(range(10))
    assert q.get() == 0
    assert other.qsize() == 0  # the other nine are this handle's now
    assert q.get_many(3) == [1, 2, 3]  # what the handle holds comes first
    other.put("later")
    q.close()
    # Back at the tail, after what was put meanwhile: each item still taken exactly once.
    assert other.get_many(20) == ["later", 4, 5, 6, 7, 8, 9]


def test_a_dropped_buffered_consumer_puts_back_what_it_took(store: sharedkv.Store) -> None:
    other = store.queue("dropped")
    other.put_many(range(5))
    q = store.queue("dropped", buffer=100)
    assert q.get() == 0
    del q  # never closed: what it took goes back when it is collected
    assert other.get_many(10) == [1, 2, 3, 4]


def _exit_without_close(url: str) -> None:
    store = sharedkv.Store(url)
    out = store.queue("out", buffer=64)
    for i in range(1_000):
        out.put(i)
    inbox = store.queue("in", buffer=100)
    assert inbox.get(timeout=10) == 0  # takes all ten, hands out one
    # returns: neither the handles nor the store are closed


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_a_child_that_exits_without_closing_writes_and_puts_back(
    store: sharedkv.Store, method: str
) -> None:
    cross_process(store)
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    store.queue("in").put_many(range(10))
    proc = multiprocessing.get_context(method).Process(
        target=_exit_without_close, args=(store.url,)
    )
    proc.start()
    _join_all([proc])
    assert proc.exitcode == 0
    assert store.queue("out").get_many(2_000, timeout=5) == list(range(1_000))
    assert store.queue("in").get_many(20) == list(range(1, 10))


def _recording_buffered_producer(url: str, buffer: int) -> None:
    store = sharedkv.Store(url)
    q = store.queue("stream", buffer=buffer)
    i = 0
    while True:  # until killed
        q.put(i)
        i += 1
        store.set("accepted", i)  # put() returned for items 0 .. i-1


def test_killed_buffered_producer_loses_at_most_its_buffer(store: sharedkv.Store) -> None:
    cross_process(store)
    buffer = 20
    proc = SPAWN.Process(target=_recording_buffered_producer, args=(store.url, buffer))
    proc.start()
    try:
        _wait_for(lambda: (store.get("accepted") or 0) >= 500, what="the producer to work")
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        _join_all([proc])
    accepted = store.get("accepted")
    q = store.queue("stream")
    got = q.get_many(1_000_000, timeout=5)
    assert got == list(range(len(got)))  # in order, no duplicate, no hole
    assert len(got) >= accepted - buffer  # lost: at most what the handle held
    q.put("after")  # the queue is intact
    assert q.get_many(10, timeout=5) == ["after"]


def _bounded_buffered_producer(url: str, maxsize: int, buffer: int, count: int) -> None:
    store = sharedkv.Store(url)
    q = store.queue("bounded", maxsize=maxsize, buffer=buffer)
    for i in range(count):
        q.put(i, timeout=20)
        store.set("progress", i + 1)
    store.close()


def test_a_bounded_queue_pushes_back_on_a_buffered_producer(store: sharedkv.Store) -> None:
    cross_process(store)
    maxsize, buffer, count = 4, 10, 40
    q = store.queue("bounded", maxsize=maxsize)
    proc = SPAWN.Process(
        target=_bounded_buffered_producer, args=(store.url, maxsize, buffer, count)
    )
    proc.start()
    try:
        # The queue full, and the handle holding all it may: the next put waits.
        _wait_for(lambda: store.get("progress") == maxsize + buffer, what="the queue to fill")
        time.sleep(0.3)
        assert store.get("progress") == maxsize + buffer
        assert q.qsize() == maxsize
        got: list[int] = []
        while len(got) < count:
            got.append(q.get(timeout=20))
            assert q.qsize() <= maxsize
        assert got == list(range(count))
    finally:
        _join_all([proc])
    assert proc.exitcode == 0


def test_a_buffered_handle_on_a_full_queue_times_out_and_reports_losses(
    store: sharedkv.Store,
) -> None:
    q = store.queue("full", maxsize=2, buffer=3)
    other = store.queue("full")
    other.put_many(["x", "y"])
    for i in range(3):
        q.put(i, timeout=0)  # held by the handle, waiting for room
    with pytest.raises(sharedkv.QueueFull):
        q.put_nowait(3)
    t0 = time.monotonic()
    with pytest.raises(sharedkv.QueueFull):
        q.put(3, timeout=0.2)
    with pytest.raises(sharedkv.QueueFull):
        q.flush(timeout=0.2)
    with pytest.raises(sharedkv.QueueFull):
        asyncio.run(q.put_async(3, timeout=0.2))
    assert 0.6 <= time.monotonic() - t0 < 5.0
    assert other.get() == "x"  # room for one: the feeder writes the first held item
    _wait_for(lambda: other.qsize() == 2, what="the feeder to use the room")
    with pytest.raises(sharedkv.QueueWriteError) as lost:
        q.close(timeout=0.2)  # no more room: the two items left are lost, and said to be
    assert lost.value.lost == 2
    assert isinstance(lost.value.__cause__, sharedkv.QueueFull)
    assert other.get_many(10) == ["y", 0]
    time.sleep(0.2)
    assert other.qsize() == 0  # the items given up are never written later


def test_feeder_errors_surface_at_the_next_call() -> None:
    with sharedkv.Store(f"shm://{unique_name('full')}", map_size=8 << 20) as store:
        chunk = b"x" * (64 << 10)
        q = store.queue("big", buffer=4)
        accepted, lost = 0, 0
        errors: list[sharedkv.QueueWriteError] = []
        for i in range(400):  # 25 MiB: more than the store holds
            try:
                q.put((i, chunk))
            except sharedkv.QueueWriteError as exc:
                errors.append(exc)  # this put added nothing
                break
            accepted += 1
        assert errors, "the store never filled up"
        try:
            q.flush()
        except sharedkv.QueueWriteError as exc:  # losses after the first report
            errors.append(exc)
        assert all(isinstance(e.__cause__, sharedkv.StoreFullError) for e in errors)
        lost = sum(e.lost for e in errors)
        assert lost >= 1
        written = [i for i, _ in store.queue("big").get_many(1_000)]
        assert written == sorted(written)
        assert len(written) + lost == accepted  # every item accepted: written, or reported lost
        q.put((-1, chunk))  # room again: the handle works on
        q.close()
        assert store.queue("big").get_many(10)[0][0] == -1


def _forked_buffered_child(out: sharedkv.Queue, inbox: sharedkv.Queue) -> None:
    # Handles inherited through fork hold nothing of the parent's here.
    for i in range(3):
        out.put(("child", i))
    inbox.close()  # the parent's taken items are not this child's to put back
    # exits: its own items are written (the queue is full until the parent makes room)


def test_a_forked_child_neither_writes_nor_returns_the_parents_buffered_items(
    qstore: sharedkv.Store,
) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    reader = qstore.queue("out")
    reader.put_many([("before", 0), ("before", 1)])
    out = qstore.queue("out", maxsize=2, buffer=10)
    for i in range(5):
        out.put(("parent", i))  # held: the queue is full
    inbox = qstore.queue("in", buffer=10)
    qstore.queue("in").put_many(range(6))
    assert inbox.get() == 0  # holds five more
    proc = multiprocessing.get_context("fork").Process(
        target=_forked_buffered_child, args=(out, inbox)
    )
    proc.start()
    try:
        got = [reader.get(timeout=20) for _ in range(10)]
        time.sleep(0.2)
        with pytest.raises(sharedkv.QueueEmpty):
            reader.get(timeout=0.2)  # nothing twice
    finally:
        _join_all([proc])
    assert proc.exitcode == 0
    assert collections.Counter(got) == collections.Counter(
        [("before", 0), ("before", 1)] + [("parent", i) for i in range(5)]
        + [("child", i) for i in range(3)]
    )  # fmt: skip
    for who in ("parent", "child"):
        mine = [i for w, i in got if w == who]
        assert mine == sorted(mine)
    assert qstore.queue("in").qsize() == 0  # the child put nothing back
    inbox.close()
    assert qstore.queue("in").get_many(10) == [1, 2, 3, 4, 5]


def test_threads_share_one_buffered_handle(store: sharedkv.Store) -> None:
    q = store.queue("threads", buffer=16)
    producers, consumers, per_producer = 4, 4, 1_000
    results: list[list[Any]] = [[] for _ in range(consumers)]

    def produce(who: int) -> None:
        for i in range(per_producer):
            q.put((who, i))

    def consume(who: int) -> None:
        while (item := q.get(timeout=30)) is not DONE:
            results[who].append(item)

    threads = [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    threads += [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads[consumers:]:
        thread.join(60)
    for _ in range(consumers):
        q.put(DONE)  # after every item: one handle keeps each thread's order
    for thread in threads[:consumers]:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    _check_exactly_once(results, producers, per_producer)
    q.close()
    assert store.queue("threads").qsize() == 0


def test_buffered_handles_async(store: sharedkv.Store) -> None:
    q = store.queue("abuffered", maxsize=3, buffer=2)
    other = store.queue("abuffered")

    async def main() -> list[Any]:
        await q.put_async("a")
        await q.put_many_async(["b", "c"])  # writes "a" first, then the batch
        await q.put_async("d")  # held: the queue is full
        await q.put_async("e")
        with pytest.raises(sharedkv.QueueFull):
            await q.put_async("f", timeout=0.1)  # the handle is full too
        with pytest.raises(sharedkv.QueueFull):
            await q.flush_async(timeout=0.1)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, other.get_many, 2)  # room for both held items
        await q.flush_async(timeout=10)
        got = [await q.get_async(timeout=1)]  # takes a buffer's worth, c and d; hands out c
        got += await q.get_many_async(10, timeout=1)  # what the handle holds: d
        got += await q.get_many_async(10, timeout=1)  # up to 10 from the queue: e
        loop.call_later(0.05, other.put, "g")
        got.append(await q.get_async(timeout=10))  # waits for the first item
        return got

    assert asyncio.run(main()) == ["c", "d", "e", "g"]
    q.close()


def test_async_with_a_buffered_handle_writes_everything_on_exit(store: sharedkv.Store) -> None:
    other = store.queue("awith")

    async def main() -> None:
        async with store.queue("awith", buffer=100) as q:
            for i in range(50):
                await q.put_async(i)

    asyncio.run(main())
    assert other.get_many(100) == list(range(50))


def test_close_async_waits_on_the_event_loop_and_reports_losses(store: sharedkv.Store) -> None:
    q = store.queue("aclose", maxsize=1, buffer=3)
    other = store.queue("aclose")
    other.put("x")
    for i in range(2):
        q.put(i, timeout=0)  # held by the handle: the queue has no room

    async def main() -> tuple[int, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        with pytest.raises(sharedkv.QueueWriteError) as lost:
            await q.close_async(timeout=0.3)
        ticker.cancel()
        return ticks, lost.value.lost

    ticks, lost = asyncio.run(main())
    assert ticks >= 5  # the loop ran while the handle waited for room
    assert lost == 2
    assert other.get_many(10) == ["x"]


def test_buffered_handles_check_their_input(store: sharedkv.Store) -> None:
    for buffer, error in [(-1, ValueError), (1.5, TypeError), ("8", TypeError), (True, TypeError)]:
        with pytest.raises(error):
            store.queue("checked", buffer=buffer)  # type: ignore[arg-type]
    q = store.queue("checked", buffer=8)
    assert repr(q) == "<Queue 'checked' maxsize=0 buffer=8>"
    assert (q.buffer, store.queue("checked").buffer) == (8, 0)
    with pytest.raises(sharedkv.SerializationError):
        q.put(lambda: None)  # raised by put itself: nothing is queued
    with pytest.raises(ValueError):
        q.flush(timeout=math.nan)
    q.flush()
    assert q.qsize() == 0
    plain = store.queue("checked")
    plain.flush()  # nothing is ever held back: returns at once
    plain.close()
    with pytest.raises(sharedkv.ClosedError):
        plain.flush()
    q.close()


def test_infinite_timeout_waits_until_an_item_arrives(shm_store: sharedkv.Store) -> None:
    q = shm_store.queue("inf")
    got: list[object] = []
    taker = threading.Thread(target=lambda: got.append(q.get(timeout=float("inf"))))
    taker.start()
    time.sleep(0.2)
    assert taker.is_alive() and not got
    q.put("x")
    taker.join(10)
    assert got == ["x"]
