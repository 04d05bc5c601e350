"""The behaviour suite: every backend must pass it unchanged (see conftest.BACKENDS)."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import pytest

import sharedkv
from sharedkv import Change, Gap, Message


# -- key-value basics ------------------------------------------------------------------------
def test_set_get_delete(store: sharedkv.Store) -> None:
    assert store.get("missing") is None
    assert store.get("missing", 42) == 42
    assert store.set("config", {"lang": "en", "n": [1, 2, 3]}) is True
    assert store.get("config") == {"lang": "en", "n": [1, 2, 3]}
    assert store.delete("config") is True
    assert store.delete("config") is False
    with pytest.raises(KeyError):
        store.delete("config", ignore_key_error=False)
    assert store.get("config") is None


@pytest.mark.parametrize(
    "value",
    [
        0,
        -7,
        2**80,
        1.5,
        "text",
        b"\x00bytes",
        None,
        True,
        [1, "a"],
        (1, 2),
        {"a": {"b": None}},
        {1, 2},
    ],
)
def test_values_round_trip(store: sharedkv.Store, value: object) -> None:
    store.set("v", value)
    got = store.get("v", default="absent")
    assert got == value and type(got) is type(value)


def test_get_returns_a_copy(store: sharedkv.Store) -> None:
    store.set("list", [1, 2])
    got = store.get("list")
    got.append(3)
    assert store.get("list") == [1, 2]


def test_mapping_protocol(store: sharedkv.Store) -> None:
    store["a"] = 1
    store["b"] = 2
    assert store["a"] == 1
    assert "a" in store and "zzz" not in store and 3 not in store  # type: ignore[operator]
    assert len(store) == 2
    assert sorted(store) == ["a", "b"]
    del store["a"]
    with pytest.raises(KeyError):
        del store["a"]
    with pytest.raises(KeyError):
        store["a"]
    assert store.pop("b") == 2
    assert store.pop("b", "dflt") == "dflt"
    with pytest.raises(KeyError):
        store.pop("b")
    assert len(store) == 0


def test_keys_items_patterns(store: sharedkv.Store) -> None:
    store.set_many({"user:1": "ann", "user:2": "bob", "job:1": "x", "user:10": "cy"})
    assert store.keys() == ["job:1", "user:1", "user:10", "user:2"]
    assert store.keys("user:?") == ["user:1", "user:2"]
    assert store.keys("user:*") == ["user:1", "user:10", "user:2"]
    assert store.keys("[jk]ob:*") == ["job:1"]
    assert store.items("user:1*") == [("user:1", "ann"), ("user:10", "cy")]
    assert store.values("job:*") == ["x"]
    store.clear()
    assert store.keys() == [] and len(store) == 0


def test_get_all_is_a_snapshot_copy(store: sharedkv.Store) -> None:
    store.set_many({"a": [1], "b": 2})
    snapshot = store.get_all()
    assert snapshot == {"a": [1], "b": 2}
    snapshot["a"].append(99)
    snapshot["c"] = 3
    store.set("b", 20)
    assert snapshot["b"] == 2
    assert store.get_all() == {"a": [1], "b": 20}


def test_get_many_and_set_many(store: sharedkv.Store) -> None:
    store.set_many({"x": 1, "y": [2], "z": None})
    assert store.get_many(["x", "y", "z", "nope"]) == {"x": 1, "y": [2], "z": None}
    assert store.get_many([]) == {}


def test_set_many_is_all_or_nothing(store: sharedkv.Store) -> None:
    store.set("keep", "old")
    with pytest.raises(sharedkv.SerializationError):
        store.set_many({"keep": "new", "bad": lambda: None})
    with pytest.raises(TypeError):
        store.set_many({"keep": "new", 5: "bad key"})  # type: ignore[dict-item]
    assert store.get("keep") == "old" and "bad" not in store


# -- atomic operations -------------------------------------------------------------------------
def test_add(store: sharedkv.Store) -> None:
    assert store.add("k", 1) is True
    assert store.add("k", 2) is False
    assert store.get("k") == 1


def test_incr(store: sharedkv.Store) -> None:
    assert store.incr("n") == 1
    assert store.incr("n", 10) == 11
    assert store.decr("n", 2) == 9
    assert store.get("n") == 9
    store.set("n", 100)
    assert store.incr("n") == 101
    store.set("s", "text")
    with pytest.raises(TypeError):
        store.incr("s")
    assert store.get("s") == "text"
    with pytest.raises(TypeError):
        store.incr("n", 1.5)  # type: ignore[arg-type]


def test_update(store: sharedkv.Store) -> None:
    assert store.update("doc", lambda d: {**d, "a": 1}, default={}) == {"a": 1}
    assert store.update("doc", lambda d: {**d, "b": 2}) == {"a": 1, "b": 2}
    assert store.get("doc") == {"a": 1, "b": 2}


def test_update_is_atomic_across_threads(store: sharedkv.Store) -> None:
    def work() -> None:
        for _ in range(50):
            store.update("list", lambda v: [*v, 1], default=[])
            store.incr("counter")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.get("list")) == 200
    assert store.get("counter") == 200


# -- revisions ---------------------------------------------------------------------------------
def test_revisions_increase_store_wide(store: sharedkv.Store) -> None:
    store.set("a", 1)
    ra = store.get_entry("a")
    store.set("b", 1)
    rb = store.get_entry("b")
    assert ra is not None and rb is not None
    assert 0 < ra.revision < rb.revision <= store.revision
    assert store.get_entry("missing") is None


def test_compare_and_set(store: sharedkv.Store) -> None:
    assert store.set("k", "v1", if_revision=0) is True
    assert store.set("k", "x", if_revision=0) is False
    entry = store.get_entry("k")
    assert entry is not None and entry.value == "v1"
    assert store.set("k", "v2", if_revision=entry.revision) is True
    assert store.set("k", "v3", if_revision=entry.revision) is False
    assert store.get("k") == "v2"
    new = store.get_entry("k")
    assert new is not None and new.revision > entry.revision
    assert store.delete("k", if_revision=entry.revision) is False
    assert store.delete("k", if_revision=new.revision) is True


# -- TTL ---------------------------------------------------------------------------------------
def test_ttl_expires_for_every_reader(store: sharedkv.Store) -> None:
    store.set("t", "v", ttl=0.3)
    store.set("keep", "v")
    ttl = store.ttl("t")
    assert ttl is not None and 0 < ttl <= 0.3
    assert store.ttl("keep") is None
    with pytest.raises(KeyError):
        store.ttl("missing")
    time.sleep(0.45)
    assert store.get("t") is None
    assert "t" not in store
    assert store.keys() == ["keep"]
    assert len(store) == 1
    assert store.get_all() == {"keep": "v"}
    assert store.add("t", "again") is True


def test_expire_and_persist(store: sharedkv.Store) -> None:
    store.set("k", 1)
    assert store.expire("k", 0.3) is True
    assert store.ttl("k") is not None
    assert store.persist("k") is True
    assert store.ttl("k") is None
    assert store.expire("missing", 1) is False
    assert store.persist("missing") is False
    store.expire("k", 0.2)
    time.sleep(0.35)
    assert store.get("k") is None


def test_incr_keeps_ttl(store: sharedkv.Store) -> None:
    store.set("n", 1, ttl=30)
    store.incr("n")
    ttl = store.ttl("n")
    assert ttl is not None and 25 < ttl <= 30


def test_set_without_ttl_clears_it(store: sharedkv.Store) -> None:
    store.set("k", 1, ttl=30)
    store.set("k", 2)
    assert store.ttl("k") is None


# -- bad input leaves the store unchanged ----------------------------------------------------------
@pytest.mark.parametrize("key", [5, None, b"bytes", ("t",)])
def test_non_str_keys(store: sharedkv.Store, key: object) -> None:
    with pytest.raises(TypeError, match="keys must be str"):
        store.set(key, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.get(key)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["", "a" * 600, "é" * 300, "nul\0byte", "\ud800"])
def test_invalid_keys(store: sharedkv.Store, key: str) -> None:
    with pytest.raises(sharedkv.InvalidKeyError):
        store.set(key, 1)
    assert len(store) == 0


def test_longest_key(store: sharedkv.Store) -> None:
    key = "k" * store.backend.max_key_bytes
    store.set(key, 1)
    assert store.get(key) == 1


def test_unpicklable_value(store: sharedkv.Store) -> None:
    store.set("k", "old")
    with pytest.raises(sharedkv.SerializationError, match="cannot serialize"):
        store.set("k", lambda: 1)
    with pytest.raises(sharedkv.SerializationError):
        store.set("k", threading.Lock())
    assert store.get("k") == "old"


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
def test_bad_ttl_values(store: sharedkv.Store, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        store.set("k", 1, ttl=ttl)
    assert "k" not in store


@pytest.mark.parametrize("ttl", ["5", [1], True])
def test_bad_ttl_types(store: sharedkv.Store, ttl: object) -> None:
    with pytest.raises(TypeError, match="ttl"):
        store.set("k", 1, ttl=ttl)  # type: ignore[arg-type]
    assert "k" not in store


def test_use_after_close(store: sharedkv.Store) -> None:
    store.set("k", 1)
    store.close()
    store.close()  # idempotent
    assert store.closed
    for call in (lambda: store.get("k"), lambda: store.set("k", 2), lambda: len(store)):
        with pytest.raises(sharedkv.ClosedError):
            call()


def test_context_manager(store: sharedkv.Store) -> None:
    with store as s:
        s.set("k", 1)
    assert store.closed


# -- publish / subscribe ---------------------------------------------------------------------
def test_publish_subscribe(store: sharedkv.Store) -> None:
    assert store.publish("nobody", "x") == 0
    with store.subscribe("orders", "alerts.*") as sub:
        assert store.publish("orders", {"id": 1}) == 1
        assert store.publish("alerts.disk", "full") == 1
        assert store.publish("other", "ignored") == 0
        m1 = sub.get(timeout=5)
        m2 = sub.get(timeout=5)
        assert isinstance(m1, Message) and isinstance(m2, Message)
        assert (m1.channel, m1.data, m1.seq, m1.pattern) == ("orders", {"id": 1}, 1, None)
        assert (m2.channel, m2.data, m2.pattern) == ("alerts.disk", "full", "alerts.*")
        assert sub.get_nowait() is None
        with pytest.raises(sharedkv.TimeoutError):
            sub.get(timeout=0.05)
    with pytest.raises(sharedkv.ClosedError):
        sub.get(timeout=0.1)


def test_stats_count_published_messages(store: sharedkv.Store) -> None:
    before = store.stats()["messages_published"]
    with store.subscribe("counted.*"):
        assert store.publish("counted.a", 1) == 1
        assert store.publish("counted.a", 2) == 1
        assert store.publish("counted.b", 3) == 1
    assert store.stats()["messages_published"] - before == 3


def test_sequence_numbers_and_order(store: sharedkv.Store) -> None:
    with store.subscribe("c") as sub:
        for i in range(50):
            store.publish("c", i)
        got = [sub.get(timeout=5) for _ in range(50)]
    assert [m.data for m in got] == list(range(50))  # type: ignore[union-attr]
    seqs = [m.seq for m in got]  # type: ignore[union-attr]
    assert seqs == list(range(seqs[0], seqs[0] + 50))


def test_two_subscribers_each_get_every_message(store: sharedkv.Store) -> None:
    with store.subscribe("c") as a, store.subscribe("c*") as b:
        assert store.publish("c", "m") == 2
        assert a.get(timeout=5).data == "m"  # type: ignore[union-attr]
        assert b.get(timeout=5).data == "m"  # type: ignore[union-attr]


def test_slow_subscriber_gets_gap_marker() -> None:
    for url in ("memory://", None):
        s = sharedkv.Store(url or f"shm://gap-{time.time_ns()}", buffer=10)
        try:
            with s.subscribe("c") as sub:
                for i in range(25):
                    s.publish("c", i)
                events = [sub.get(timeout=5)]
                while (e := sub.get_nowait()) is not None:
                    events.append(e)
            gaps = [e for e in events if isinstance(e, Gap)]
            messages = [e for e in events if isinstance(e, Message)]
            assert len(gaps) <= 1
            dropped = sum(g.count for g in gaps)
            assert dropped + len(messages) == 25
            assert len(messages) == 10
            assert [m.data for m in messages] == list(range(15, 25))
        finally:
            s.close()


@pytest.mark.parametrize("size", [1000, 5000])  # trimmed by copy, and by a view of the map
def test_byte_bound_keeps_the_newest_messages_that_fit(size: int) -> None:
    payload = b"p" * size
    encoded = len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    bound = 10 * size
    fit = bound // encoded  # the newest messages whose payloads fit in buffer_bytes
    for url in ("memory://", None):
        s = sharedkv.Store(url or f"shm://bytes-{time.time_ns()}", buffer=1000, buffer_bytes=bound)
        try:
            with s.subscribe("c") as sub:
                # Many times the bound: the retained bytes must not drift as messages are trimmed.
                for _ in range(200):
                    s.publish("c", payload)
                events = [sub.get(timeout=5)]
                while (e := sub.get_nowait()) is not None:
                    events.append(e)
            messages = [e for e in events if isinstance(e, Message)]
            dropped = sum(e.count for e in events if isinstance(e, Gap))
            assert [m.seq for m in messages] == list(range(201 - fit, 201)), url
            assert dropped == 200 - fit
        finally:
            s.close()


def test_large_payload(store: sharedkv.Store) -> None:
    big = b"x" * (1 << 20)
    with store.subscribe("big") as sub:
        store.publish("big", big)
        assert sub.get(timeout=5).data == big  # type: ignore[union-attr]


def test_callbacks_sync(store: sharedkv.Store) -> None:
    got: list[object] = []
    done = threading.Event()

    @store.on_message("cb.*")
    def handle(msg: Message) -> None:
        got.append((msg.channel, msg.data, threading.current_thread().name))
        if len(got) == 2:
            done.set()

    @store.on_message("cb.*")
    def broken(msg: Message) -> None:
        raise RuntimeError("one failing callback must not stop the others")

    store.publish("cb.a", 1)
    store.publish("cb.b", 2)
    assert done.wait(5)
    assert got == [("cb.a", 1, "sharedkv-callbacks"), ("cb.b", 2, "sharedkv-callbacks")]


def _refuse_to_load() -> None:
    raise ValueError("this value cannot be loaded")


class _Unloadable:
    """Pickles fine, fails to unpickle: a message that reaches a subscriber undecodable."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _refuse_to_load, ()


def test_callback_errors_are_logged_and_delivery_goes_on(
    store: sharedkv.Store, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[object] = []
    done = threading.Event()

    @store.on_message("errs")
    def handle(msg: Message) -> None:
        if msg.data == "raise":
            raise RuntimeError("callback failed on purpose")
        got.append(msg.data)
        if msg.data == "last":
            done.set()

    # One at a time, so that each message reaches the callback thread on its own.
    for data in ("first", 7, _Unloadable(), "raise", "last"):
        assert store.publish("errs", data) == 1
        time.sleep(0.05)
    assert done.wait(5)
    assert got == ["first", 7, "last"]
    logged = [r.getMessage() for r in caplog.records if r.name == "sharedkv"]
    assert any(m.startswith("sharedkv: a message could not be decoded") for m in logged)
    assert any(m.startswith("sharedkv: message callback") for m in logged)


def test_callbacks_async(store: sharedkv.Store) -> None:
    async def main() -> list[object]:
        got: list[object] = []
        done = asyncio.Event()

        @store.on_subscriber_receive("ev")
        async def handle(data: object) -> None:
            got.append(data)
            if len(got) == 3:
                done.set()

        for i in range(3):
            store.publish("ev", i)
        await asyncio.wait_for(done.wait(), 5)
        return got

    assert asyncio.run(main()) == [0, 1, 2]


def test_async_iteration(store: sharedkv.Store) -> None:
    async def main() -> list[object]:
        sub = store.subscribe("a")
        store.publish("a", 1)
        store.publish("a", 2)
        out = []
        async for msg in sub:
            out.append(msg.data)  # type: ignore[union-attr]
            if len(out) == 2:
                sub.close()
        return out

    assert asyncio.run(asyncio.wait_for(main(), 5)) == [1, 2]


# -- watch ----------------------------------------------------------------------------------------
def test_watch(store: sharedkv.Store) -> None:
    with store.watch("user:*") as w:
        store.set("user:1", "ann")
        store.set("other", 0)
        store.delete("user:1")
        events = [w.get(timeout=5) for _ in range(2)]
    assert [(e.kind, e.key, e.value) for e in events] == [  # type: ignore[union-attr]
        ("set", "user:1", "ann"),
        ("delete", "user:1", None),
    ]
    assert events[0].revision < events[1].revision  # type: ignore[union-attr]


def test_watch_since_replays(store: sharedkv.Store) -> None:
    store.set("k", 1)
    start = store.revision
    store.set("k", 2)
    store.set("k", 3)
    with store.watch("k", since=start) as w:
        events = [w.get(timeout=5) for _ in range(2)]
        assert [e.value for e in events] == [2, 3]  # type: ignore[union-attr]
        store.set("k", 4)
        assert w.get(timeout=5).value == 4  # type: ignore[union-attr]


def test_watch_since_too_old() -> None:
    s = sharedkv.Store("memory://", history=5)
    try:
        for i in range(20):
            s.set("k", i)
        with pytest.raises(sharedkv.RevisionTooOldError) as info:
            s.watch("k", since=1)
        assert info.value.oldest > 2
    finally:
        s.close()


def test_watch_sees_expiry(store: sharedkv.Store) -> None:
    with store.watch("t") as w:
        store.set("t", 1, ttl=0.2)
        first = w.get(timeout=5)
        second = w.get(timeout=5)
    assert isinstance(first, Change) and first.kind == "set"
    assert isinstance(second, Change) and second.kind == "expire" and second.key == "t"


# -- queues -------------------------------------------------------------------------------------
def test_queue_fifo(store: sharedkv.Store) -> None:
    q = store.queue("jobs")
    for i in range(5):
        q.put(i)
    assert q.qsize() == 5
    assert [q.get(timeout=1) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(sharedkv.QueueEmpty):
        q.get_nowait()
    with pytest.raises(sharedkv.QueueEmpty):
        q.get(timeout=0.05)


def test_queue_bounded(store: sharedkv.Store) -> None:
    q = store.queue("b", maxsize=2)
    q.put(1)
    q.put(2)
    with pytest.raises(sharedkv.QueueFull):
        q.put_nowait(3)
    with pytest.raises(sharedkv.QueueFull):
        q.put(3, timeout=0.05)
    assert q.get() == 1
    q.put(3, timeout=1)
    assert [q.get(), q.get()] == [2, 3]


def test_queue_blocking_get_wakes(store: sharedkv.Store) -> None:
    q = store.queue("w")
    threading.Timer(0.1, lambda: q.put("late")).start()
    t0 = time.monotonic()
    assert q.get(timeout=5) == "late"
    assert time.monotonic() - t0 < 4


def test_queue_async(store: sharedkv.Store) -> None:
    q = store.queue("aq")

    async def main() -> object:
        asyncio.get_running_loop().call_later(0.05, q.put, "x")
        return await q.get_async(timeout=5)

    assert asyncio.run(main()) == "x"


# -- locks ---------------------------------------------------------------------------------------
def test_lock_basics(store: sharedkv.Store) -> None:
    lock = store.lock("L", timeout=0.2)
    assert lock.acquire() is True
    assert lock.locked()
    owner = lock.owner()
    assert owner is not None and owner.thread_id == threading.get_ident()
    other = store.lock("L", timeout=0.1)
    assert other.acquire(blocking=False) is False
    with pytest.raises(sharedkv.LockTimeoutError), other:
        pass
    lock.release()
    assert not lock.locked() and lock.owner() is None
    with pytest.raises(sharedkv.LockNotOwnedError):
        lock.release()


def test_lock_mutual_exclusion_threads(store: sharedkv.Store) -> None:
    store.set("n", 0)

    def work() -> None:
        lock = store.lock("mutex")
        for _ in range(50):
            with lock:
                store.set("n", store.get("n") + 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("n") == 200


def test_semaphore(store: sharedkv.Store) -> None:
    sem = store.semaphore("S", 2)
    assert sem.acquire(blocking=False) and sem.acquire(blocking=False)
    assert not sem.acquire(blocking=False)
    sem.release()
    assert sem.acquire(blocking=False)


def test_lock_async(store: sharedkv.Store) -> None:
    async def main() -> None:
        lock = store.lock("al", timeout=5)
        holder = store.lock("al")
        assert holder.acquire()
        asyncio.get_running_loop().call_later(0.05, holder.release)
        async with lock:
            assert lock.owner() is not None

    asyncio.run(main())


# -- the async face -------------------------------------------------------------------------------
def test_async_store(store: sharedkv.Store) -> None:
    async def main() -> None:
        a = sharedkv.AsyncStore(store)
        assert await a.set("k", {"v": 1}) is True
        assert await a.get("k") == {"v": 1}
        assert await a.incr("n", 5) == 5
        assert await a.get_all() == {"k": {"v": 1}, "n": 5}
        sub = a.subscribe("ch")
        await a.publish("ch", "hi")
        msg = await sub.get_async(timeout=5)
        assert msg.data == "hi"  # type: ignore[union-attr]
        sub.close()

    asyncio.run(main())


def test_messaging_bad_input(store: sharedkv.Store) -> None:
    with store.subscribe("c") as sub:
        with pytest.raises(sharedkv.SerializationError):
            store.publish("c", lambda: None)
        with pytest.raises(TypeError):
            store.publish(3, "x")  # type: ignore[arg-type]
        assert sub.get_nowait() is None  # nothing half-published
    with pytest.raises(ValueError, match="pattern"):
        store.subscribe("bad[")
    with pytest.raises(TypeError):
        store.subscribe()
    with pytest.raises(ValueError, match="pattern"):
        store.watch("x]")


def test_on_message_needs_a_callable(store: sharedkv.Store) -> None:
    with pytest.raises(TypeError, match="callable"):
        store.on_message("c")(42)  # type: ignore[arg-type]


def test_undecodable_message_fails_alone() -> None:
    from .conftest import unique_name

    url = f"shm://{unique_name('dec')}"
    with (
        sharedkv.Store(url) as writer,
        sharedkv.Store(url, serializer=sharedkv.JSONSerializer()) as safe,
        safe.subscribe("c") as sub,
    ):
        writer.publish("c", {1, 2})  # a pickle: the JSON reader refuses to load it
        safe.publish("c", [1, 2])
        with pytest.raises(sharedkv.SerializationError):
            sub.get(timeout=5)
        assert sub.get(timeout=5).data == [1, 2]  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [-1, "big", 1.5, True])
def test_bad_read_cache_option_is_refused(bad: object) -> None:
    from .conftest import unique_name

    with pytest.raises(ValueError, match="read_cache"):
        sharedkv.Store(f"shm://{unique_name()}", read_cache=bad)
