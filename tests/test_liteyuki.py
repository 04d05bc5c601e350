"""The ``liteyuki.comm`` API on sharedkv, with real spawned and forked children.

Each test below that is named after a defect of the origin shows that we behave well instead:
children may subscribe, a child's ``set`` is applied before it returns, publishing to nobody is
harmless, ``get_all`` is a copy, every wait ends, concurrent large writes never corrupt.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, NewType, Optional, TypeVar, Union

import pytest

import sharedkv
from sharedkv import liteyuki
from sharedkv._backends import ENV_VAR
from sharedkv.liteyuki import (
    Channel,
    GlobalKeyValueStore,
    KeyValueStore,
    get_channel,
    get_channels,
    set_channel,
    set_channels,
    shared_memory,
)

from .conftest import unique_name

METHODS = ["spawn", "fork"]
pytestmark = pytest.mark.filterwarnings(
    # Python 3.12+ warns about fork() in a process with threads; these children only use sharedkv,
    # which replaces every handle it inherited through fork.
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


@pytest.fixture
def sm(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyValueStore]:
    """``shared_memory`` on a fresh default store, as if this process had started the tree."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    shared_memory.close()
    shared_memory.store  # opens the default store; children find it through the environment
    yield shared_memory
    shared_memory.close()


def get_context(method: str) -> Any:
    return multiprocessing.get_context(method)


def run_child(method: str, target: Callable[..., None], *args: Any, timeout: float = 60) -> int:
    """Run ``target(*args)`` in a child started with ``method``; its exit code."""
    proc = get_context(method).Process(target=target, args=args)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        raise AssertionError(f"the child did not finish in {timeout} s")
    code: int = proc.exitcode
    return code


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- key-value: main <-> child -------------------------------------------------------------------
def _child_gets(sm: KeyValueStore, out_key: str) -> None:
    from sharedkv.liteyuki import shared_memory as imported

    assert sm.get("config") == {"lang": "en", "admins": [1, 2]}
    assert imported.get("config") == {"lang": "en", "admins": [1, 2]}  # the same store
    assert sm.get("missing") is None
    assert sm.get("missing", "fallback") == "fallback"
    assert sm.get_all()["config"]["lang"] == "en"
    sm.set(out_key, os.getpid())


@pytest.mark.parametrize("method", METHODS)
def test_main_sets_child_gets(sm: KeyValueStore, method: str) -> None:
    sm.set("config", {"lang": "en", "admins": [1, 2]})
    assert run_child(method, _child_gets, sm, "child-ok") == 0
    assert isinstance(sm.get("child-ok"), int)


def _child_sets(sm: KeyValueStore, ack: Any, go_on: Any) -> None:
    sm.set("state", {"step": 1})
    ack.set()
    go_on.wait(30)
    sm.set("state", {"step": 2})
    sm.delete("doomed")
    os.kill(os.getpid(), signal.SIGKILL)  # no chance to flush anything after the calls returned


@pytest.mark.parametrize("method", METHODS)
def test_child_set_is_applied_when_the_call_returns(sm: KeyValueStore, method: str) -> None:
    """Origin defect: a child's set was a message to the main process, never acknowledged."""
    ctx = get_context(method)
    ack, go_on = ctx.Event(), ctx.Event()
    sm.set("doomed", 1)
    proc = ctx.Process(target=_child_sets, args=(sm, ack, go_on))
    proc.start()
    try:
        assert ack.wait(30)
        assert sm.get("state") == {"step": 1}  # right after the child's call returned
        go_on.set()
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        assert sm.get("state") == {"step": 2}
        assert sm.get("doomed") is None
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def test_delete_get_all_and_instance(sm: KeyValueStore) -> None:
    assert GlobalKeyValueStore.get_instance() is shared_memory is liteyuki.shared_memory
    sm.set("a", [1, 2])
    sm.set("b", "x")
    sm.delete("nothing-here")  # ignored, like the origin
    with pytest.raises(KeyError):
        sm.delete("nothing-here", ignore_key_error=False)
    Channel(unique_name("registered"))  # the channel registry lives in the store too...
    snapshot = sm.get_all()
    assert snapshot == {"a": [1, 2], "b": "x"}  # ...but is not user data
    snapshot["a"].append(3)  # Origin defect: get_all handed out the live dict.
    snapshot["c"] = 1
    assert sm.get("a") == [1, 2] and sm.get("c") is None
    sm.delete("a")
    assert sm.get_all() == {"b": "x"}
    assert sm.store.incr("hits") == 1  # everything else the store offers


def test_pickles_as_its_address(sm: KeyValueStore, tmp_path: Path) -> None:
    assert pickle.loads(pickle.dumps(sm)) is sm
    other = KeyValueStore(f"file://{tmp_path}/kv")
    try:
        other.set("k", 1)
        copy = pickle.loads(pickle.dumps(other))
        assert copy is not sm and copy.url == other.url and copy.get("k") == 1
    finally:
        copy.close()
        other.close()


# -- publish / subscribe -------------------------------------------------------------------------
def _child_publishes(sm: KeyValueStore, channel: str, count: int) -> None:
    for i in range(count):
        sm.publish(channel, {"i": i, "pid": os.getpid()})


@pytest.mark.parametrize("method", METHODS)
def test_child_publish_runs_main_async_callback(sm: KeyValueStore, method: str) -> None:
    channel = unique_name("events")
    received: list[Any] = []
    done = asyncio.Event()

    @sm.on_subscriber_receive(channel)
    async def on_event(data: Any) -> None:
        received.append(data)
        if len(received) == 3:
            done.set()

    async def main() -> None:
        loop_task = asyncio.create_task(sm.start_receive_loop())
        ctx = get_context(method)
        proc = ctx.Process(target=_child_publishes, args=(sm, channel, 3))
        proc.start()  # from the main thread: a fork from a worker thread exits with status 1
        await asyncio.to_thread(proc.join, 30)
        assert proc.exitcode == 0
        await asyncio.wait_for(done.wait(), 30)
        loop_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop_task

    asyncio.run(main())
    assert [d["i"] for d in received] == [0, 1, 2]


def _child_subscribes(sm: KeyValueStore, channel: str) -> None:
    received: list[Any] = []
    finished = asyncio.Event()

    @sm.on_subscriber_receive(channel)
    async def on_async(data: Any) -> None:
        received.append(data)
        if data == "last":
            finished.set()

    @sm.on_subscriber_receive(channel)
    def on_sync(data: Any) -> None:  # runs on the store's callback thread
        sm.store.update("sync-seen", lambda seen: [*seen, data], default=[])

    async def main() -> None:
        loop_task = asyncio.create_task(sm.start_receive_loop())
        sm.set("child-ready", True)
        await asyncio.wait_for(finished.wait(), 30)
        loop_task.cancel()

    asyncio.run(main())
    wait_for(lambda: len(sm.get("sync-seen") or []) == 3, what="the sync callback")
    sm.set("child-received", received)


@pytest.mark.parametrize("method", METHODS)
def test_child_subscribes(sm: KeyValueStore, method: str) -> None:
    """Origin defect: on_subscriber_receive raised 'Cannot subscribe in sub process'."""
    channel = unique_name("news")
    in_main: list[Any] = []

    @sm.on_subscriber_receive(channel)
    def also_main(data: Any) -> None:  # started before the fork: the child must not reuse it
        in_main.append(data)

    proc = get_context(method).Process(target=_child_subscribes, args=(sm, channel))
    proc.start()
    try:
        wait_for(lambda: sm.get("child-ready"), what="the child to subscribe")
        for data in ("a", "b", "last"):
            assert sm.publish(channel, data) == 3  # two subscriptions there, one here
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert proc.exitcode == 0
    assert sm.get("child-received") == ["a", "b", "last"]
    assert sm.get("sync-seen") == ["a", "b", "last"]
    wait_for(lambda: len(in_main) == 3, what="the main callback")


def _child_publishes_to_nobody(sm: KeyValueStore, channel: str) -> None:
    assert all(sm.publish(channel, i) == 0 for i in range(1000))


def test_publish_with_no_subscriber_is_harmless(sm: KeyValueStore) -> None:
    """Origin defect: a publish to a channel nobody subscribed to killed the bus."""
    channel = unique_name("quiet")
    for i in range(1000):
        assert sm.publish(channel, i) == 0
    assert run_child("spawn", _child_publishes_to_nobody, sm, channel) == 0
    got: list[Any] = []
    arrived = threading.Event()

    @sm.on_subscriber_receive(channel)
    def on_data(data: Any) -> None:
        got.append(data)
        arrived.set()

    assert run_child("spawn", _child_publishes, sm, channel, 1) == 0
    assert arrived.wait(10)
    assert [d["i"] for d in got] == [0]


def test_run_subscriber_receive_funcs(sm: KeyValueStore, caplog: pytest.LogCaptureFixture) -> None:
    channel = unique_name("local")
    seen: list[Any] = []

    @sm.on_subscriber_receive(channel)
    def sync_func(data: Any) -> None:
        seen.append(("sync", data))

    @sm.on_subscriber_receive(channel)
    async def async_func(data: Any) -> None:
        await asyncio.sleep(0)
        seen.append(("async", data))

    @sm.on_subscriber_receive(channel)
    def broken(data: Any) -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="sharedkv"):
        asyncio.run(KeyValueStore.run_subscriber_receive_funcs(channel, 5))
    assert sorted(seen) == [("async", 5), ("sync", 5)]
    assert "boom" in caplog.text
    asyncio.run(KeyValueStore.run_subscriber_receive_funcs(unique_name("none"), 1))  # no-op


# -- channels ---------------------------------------------------------------------------------------
Request = tuple[str, dict[str, Any]]


def _child_requests(requests: Channel[Request], reply_name: str) -> None:
    reply = Channel[Any](reply_name)
    requests.send(("note", {"text": "first"}))
    requests.send(("unhandled", {}))  # no filter accepts it: dropped, the loop goes on
    requests.send(("get", {"key": "answer", "reply": reply}))  # a channel inside an item
    assert reply.receive(timeout=20) == 42
    with pytest.raises(TypeError, match=r"value\[1\] is str"):
        requests.send(("note", "not a dict"))  # type: ignore[arg-type]
    requests.send(("note", {"text": "last"}))


@pytest.mark.parametrize("method", METHODS)
def test_channel_items_from_child_go_to_filtered_handlers(sm: KeyValueStore, method: str) -> None:
    requests = Channel[Request](unique_name("requests"))
    notes: list[str] = []
    done = threading.Event()
    sm.set("answer", 42)

    @requests.on_receive(lambda d: d[0] == "get")
    def on_get(data: Request) -> None:
        data[1]["reply"].send(sm.get(data[1]["key"]))

    async def is_note(data: Request) -> bool:
        return data[0] == "note"

    @requests.on_receive(is_note)
    async def on_note(data: Request) -> None:
        notes.append(data[1]["text"])
        if data[1]["text"] == "last":
            done.set()

    requests.start_receive_loop()
    try:
        assert requests.is_receive_loop_running
        assert run_child(method, _child_requests, requests, unique_name("reply")) == 0
        assert done.wait(30)
    finally:
        requests.close()
    assert notes == ["first", "last"]
    assert not requests.is_receive_loop_running


def _child_receives_late(channel: Channel[int], out_key: str) -> None:
    t0 = time.monotonic()
    value = channel.receive(timeout=20)
    liteyuki.shared_memory.set(out_key, (value, time.monotonic() - t0))


def test_channel_used_before_a_fork_waits_in_the_child(sm: KeyValueStore) -> None:
    channel = Channel[int](unique_name("late"))
    with pytest.raises(TimeoutError):
        channel.receive(timeout=0.05)  # the parent's handle has waited once
    proc = multiprocessing.get_context("fork").Process(
        target=_child_receives_late, args=(channel, "late-result")
    )
    proc.start()
    try:
        time.sleep(0.5)
        channel.send(7)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert proc.exitcode == 0
    value, waited = sm.get("late-result")
    assert value == 7 and waited >= 0.3


def test_receive_times_out(sm: KeyValueStore) -> None:
    """Origin defect: no timeouts, so children hung forever when the main process died."""
    channel = Channel[int](unique_name("idle"))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):  # builtins.TimeoutError, and sharedkv.TimeoutError
        channel.receive(timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2
    with pytest.raises(sharedkv.TimeoutError):
        asyncio.run(channel.async_receive(timeout=0.1))
    channel.send(1)
    assert asyncio.run(channel.async_receive(timeout=5)) == 1
    assert float("inf") > sharedkv.DEFAULT_TIMEOUT  # the default of every wait
    assert run_child("spawn", _child_waits_for_nothing, channel) == 0


def _child_waits_for_nothing(channel: Channel[int]) -> None:
    with pytest.raises(TimeoutError):
        channel.receive(timeout=0.3)


# -- the registry -----------------------------------------------------------------------------
def _child_uses_registry(alias: str, name: str, made_name: str) -> None:
    channel = get_channel(alias)  # no wiring: the default store comes from the environment
    assert channel.name == name and channel is get_channel(name)
    names = get_channels()
    assert {alias, name, "second"} <= set(names)
    with pytest.raises(TypeError):
        channel.send("not an int")  # the type travelled with the channel
    channel.send(7)
    Channel[str](made_name).send("from the child")
    with pytest.raises(KeyError):
        get_channel("no-such-channel")


@pytest.mark.parametrize("method", METHODS)
def test_registry_works_from_a_child(sm: KeyValueStore, method: str) -> None:
    name, alias, made = unique_name("reg"), unique_name("alias"), unique_name("made")
    channel = Channel[int](name)
    set_channel(alias, channel)
    set_channels({"second": Channel(unique_name("second"))})
    assert run_child(method, _child_uses_registry, alias, name, made) == 0
    assert channel.receive(timeout=10) == 7
    made_here = get_channel(made)
    assert made_here.type_check and made_here.receive(timeout=10) == "from the child"
    with pytest.raises(TypeError):
        set_channel("bad", "not a channel")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        set_channels({"bad": 1})  # type: ignore[dict-item]
    with pytest.raises(KeyError):
        get_channel("no-such-channel")


def _child_opens_by_name(name: str) -> None:
    Channel[int](name).send(99)  # the same name in another process: the same channel


def test_names_are_unique_per_process_and_shared_across(sm: KeyValueStore) -> None:
    name = unique_name("unique")
    channel = Channel[int](name)
    with pytest.raises(ValueError, match="already exists"):
        Channel[int](name)
    with pytest.raises(ValueError):
        Channel("")
    with pytest.raises(TypeError):
        Channel(123)  # type: ignore[arg-type]
    assert pickle.loads(pickle.dumps(channel)) is channel
    assert run_child("spawn", _child_opens_by_name, name) == 0
    assert channel.receive(timeout=10) == 99
    channel.close()
    again = Channel[int](name)  # a closed handle frees its name in this process
    assert again is not channel and get_channel(name) is again


def _child_competes(name: str, count_key: str) -> None:
    channel = get_channel(name)
    taken: list[int] = []

    @channel.on_receive()
    def take(item: int) -> None:
        taken.append(item)

    channel.start_receive_loop()
    liteyuki.shared_memory.set("competitor-ready", True)
    wait_for(lambda: liteyuki.shared_memory.get("stop-competing"), what="the stop signal")
    channel.stop_receive_loop()
    liteyuki.shared_memory.set(count_key, taken)


def test_receive_loops_in_two_processes_compete(sm: KeyValueStore) -> None:
    """Point-to-point: with a receive loop in two processes, each item is handled once."""
    channel = Channel[int](unique_name("work"))
    here: list[int] = []

    @channel.on_receive()
    def take(item: int) -> None:
        here.append(item)
        time.sleep(0.001)

    proc = multiprocessing.get_context("spawn").Process(
        target=_child_competes, args=(channel.name, "taken-there")
    )
    proc.start()
    try:
        wait_for(lambda: sm.get("competitor-ready"), what="the child's loop")
        channel.start_receive_loop()
        for i in range(300):
            channel.send(i)
        wait_for(lambda: channel.qsize() == 0, what="the items to be taken")
        time.sleep(0.2)
        sm.set("stop-competing", True)
        proc.join(30)
    finally:
        channel.close()
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert proc.exitcode == 0
    there = sm.get("taken-there")
    assert sorted(here + there) == list(range(300))  # each item once, in one process


# -- concurrent large values --------------------------------------------------------------------
BIG = 100 * 1024
ROUNDS = 20


def big_value(who: int, round_: int) -> bytes:
    stamp = f"<{who}:{round_}>".encode()
    return (stamp * (BIG // len(stamp) + 1))[:BIG]


def _child_writes_big(sm: KeyValueStore, channel: Channel[bytes], who: int, start: Any) -> None:
    start.wait(30)
    for r in range(ROUNDS):
        value = big_value(who, r)
        sm.set(f"big:{who}", value)
        sm.set("big:shared", value)
        channel.send(value)


@pytest.mark.parametrize("method", METHODS)
def test_two_children_write_large_values_at_once(sm: KeyValueStore, method: str) -> None:
    """Origin defect: several children wrote into one pipe end and could interleave bytes."""
    ctx = get_context(method)
    channel = Channel[bytes](unique_name("big"))
    start = ctx.Event()
    procs = [
        ctx.Process(target=_child_writes_big, args=(sm, channel, who, start)) for who in (0, 1)
    ]
    for proc in procs:
        proc.start()
    start.set()
    try:
        received = [channel.receive(timeout=30) for _ in range(2 * ROUNDS)]
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sm.get("big:0") == big_value(0, ROUNDS - 1)
    assert sm.get("big:1") == big_value(1, ROUNDS - 1)
    assert sm.get("big:shared") in (big_value(0, ROUNDS - 1), big_value(1, ROUNDS - 1))
    expected = {big_value(w, r): (w, r) for w in (0, 1) for r in range(ROUNDS)}
    order = [expected[value] for value in received]  # KeyError here would mean a torn value
    assert collections.Counter(order) == collections.Counter(expected.values())
    for who in (0, 1):
        assert [r for w, r in order if w == who] == list(range(ROUNDS))


# -- runtime type checks ---------------------------------------------------------------------------
class Point:
    def __init__(self, x: int) -> None:
        self.x = x


class SubPoint(Point):
    pass


UserId = NewType("UserId", int)
Num = TypeVar("Num", bound=float)

CASES: list[tuple[Any, list[Any], list[Any]]] = [
    (int, [1, True, -5], ["1", 1.5, None]),
    (float, [1.5, 2], ["x", None]),
    (str, ["", "x"], [b"x", 1]),
    (type(None), [None], [0, ""]),
    (None, [None], [0]),
    (Any, [1, "x", None, object()], []),
    (Point, [Point(1), SubPoint(2)], [1, None]),
    (Optional[int], [None, 3], ["3"]),  # noqa: UP045 - the typing spelling is what is tested
    (Union[int, str], [1, "a"], [1.5, None]),  # noqa: UP007
    (int | None, [None, 1], ["1"]),
    (tuple[int, str], [(1, "a")], [(1, 2), (1,), (1, "a", 2), [1, "a"]]),
    (tuple[int, ...], [(), (1, 2, 3)], [(1, "2"), [1]]),
    (tuple[()], [()], [(1,)]),
    (list[int], [[], [1, 2]], [[1, "2"], (1,), {1}]),
    (set[str], [set(), {"a"}], [{"a", 1}, ["a"], frozenset({"a"})]),
    (frozenset[int], [frozenset({1})], [{1}, frozenset({"x"})]),
    (dict[str, int], [{}, {"a": 1}], [{"a": "1"}, {1: 1}, [("a", 1)]]),
    (dict[str, list[Optional[int]]], [{"a": [1, None]}], [{"a": [1, "x"]}]),  # noqa: UP045
    (Literal["get", "set"], ["get", "set"], ["del", 1]),
    (Literal[1, True], [1, True], [2, 1.0]),
    (tuple[str, dict[str, Any]], [("set", {"k": object()})], [("set", 1), (1, {})]),
    (tuple[str, Optional[dict[str, Any]]], [("x", None), ("x", {})], [("x", 1)]),  # noqa: UP045
    (type[Point], [Point, SubPoint], [int, Point(1)]),
    (Annotated[int, "meta"], [1], ["1"]),
    (UserId, [UserId(5)], ["5"]),
    (Num, [1.5, 1], ["x"]),
    (Callable[[int], int], [abs, len], [1]),
    (Channel[int], [], [1]),
]


@pytest.mark.parametrize(("tp", "good", "bad"), CASES, ids=[repr(c[0]) for c in CASES])
def test_typed_channel_checks_values(
    sm: KeyValueStore, tp: Any, good: list[Any], bad: list[Any]
) -> None:
    channel = Channel[tp](unique_name("typed"))
    for value in good:
        channel.check(value)
    for value in bad:
        with pytest.raises(TypeError, match="carries"):
            channel.send(value)
    assert channel.qsize() == 0  # a rejected value is never queued


def test_typed_channel_details(sm: KeyValueStore) -> None:
    channel = Channel[tuple[str, dict[str, Any]]](unique_name("req"))
    channel.send(("set", {"key": "k", "value": [1]}))
    assert channel.receive(timeout=5) == ("set", {"key": "k", "value": [1]})
    with pytest.raises(TypeError, match=r"value\[1\] is int, not dict\[str, Any\]"):
        channel.send(("set", 1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a key of value\[1\] is int, not str"):
        channel.send(("set", {1: 2}))  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="type_check=True needs a type parameter"):
        Channel(unique_name("untyped"), type_check=True)
    unchecked = Channel[int](unique_name("unchecked"), type_check=False)
    unchecked.send("anything")  # type: ignore[arg-type]
    plain: Channel[Any] = Channel(unique_name("plain"))
    assert not plain.type_check and channel.type_check
    plain.send(object)
    with pytest.raises(TypeError, match="cannot check"):
        Channel["int"](unique_name("forward"))
    with pytest.raises(TypeError, match="already parameterised"):
        Channel[int][str]
    assert Channel[int] is Channel[int] and issubclass(Channel[int], Channel)
    nested = Channel[Channel[int]](unique_name("nested"))
    nested.send(plain)  # any channel passes for Channel[...]
    assert nested.receive(timeout=5) is plain
    assert "Channel[int]" in repr(unchecked)


# -- the migration guide's example -------------------------------------------------------------
def test_migration_guide_example_runs(tmp_path: Path) -> None:
    guide = Path(__file__).resolve().parent.parent / "docs" / "migrating-from-liteyuki.md"
    text = guide.read_text()
    section = text[text.index("## A worked example") :]
    program = re.search(r"```python\n(.*?)```", section, re.S)
    expected = re.search(r"It prints:\n\n```text\n(.*?)```", section, re.S)
    assert program is not None and expected is not None
    script = tmp_path / "bot_app.py"
    script.write_text(program.group(1))
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}  # its own process tree
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.group(1)
