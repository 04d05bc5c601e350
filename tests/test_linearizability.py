"""Linearizability: histories recorded by several processes are checked with a Wing-Gong search.

Each process records, for every operation, when it started and when it returned
(``time.monotonic_ns()`` is one clock for the whole machine), what it asked and what it got. A
history is linearizable when every operation can be given a single instant between its start and
its return such that the results are those of a sequential execution. Keys are independent, so
the history is checked key by key (linearizability is compositional), each with a small
depth-first search memoized on (operations done, state): Lowe's variant of Wing and Gong.

Registers use get_entry / set / compare-and-set (``if_revision``) / delete; counters use get and
incr. Every value written is unique, so a revision seen by any reader names one write, and a
compare-and-set can be judged against the register's current write.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

import sharedkv

from .conftest import BACKENDS, unique_name


@dataclass(frozen=True)
class Op:
    """One operation of a history: who, when (ns), on which key, what was asked and answered."""

    proc: int
    start: int
    end: int
    key: str
    kind: str
    arg: Any
    result: Any


# A model: initial state, and step(state, op) -> new state, or None when ``op``'s result is
# impossible in ``state``.
Step = Callable[[Hashable, Op], "Hashable | None"]
_ABSENT = ("absent",)


def register_model(history: Sequence[Op]) -> tuple[Hashable, Step]:
    """A register read with get_entry, written with set, compare-and-set and delete.

    Revisions are store-wide and unique to a write, so the revisions that readers saw tell which
    write a compare-and-set's ``if_revision`` names."""
    write_of_revision: dict[int, Any] = {}
    for op in history:
        if op.kind == "get_entry" and op.result is not None:
            value, revision = op.result
            write_of_revision[revision] = value

    def step(state: Hashable, op: Op) -> Hashable | None:
        if op.kind == "get_entry":
            seen = _ABSENT if op.result is None else op.result[0]
            return state if seen == state else None
        if op.kind == "set":
            return op.arg if op.result else None
        if op.kind == "cas":
            value, revision = op.arg
            if revision == 0:
                matches = state == _ABSENT
            else:
                matches = state != _ABSENT and write_of_revision.get(revision, _ABSENT) == state
            if op.result != matches:
                return None
            return value if matches else state
        if op.kind == "delete":
            if op.result != (state != _ABSENT):
                return None
            return _ABSENT
        raise AssertionError(op.kind)

    return _ABSENT, step


def counter_model(history: Sequence[Op]) -> tuple[Hashable, Step]:
    """An integer read with get (absent = 0) and changed with incr (which returns the sum)."""

    def step(state: Hashable, op: Op) -> Hashable | None:
        assert isinstance(state, int)
        if op.kind == "get":
            return state if (op.result or 0) == state else None
        if op.kind == "incr":
            return op.result if op.result == state + op.arg else None
        raise AssertionError(op.kind)

    return 0, step


def linearizable(
    history: Sequence[Op], model: tuple[Hashable, Step], budget: int = 2_000_000
) -> bool:
    """Whether one object's ``history`` has a linearization valid for ``model``."""
    ops = sorted(history, key=lambda op: op.start)
    n = len(ops)
    full = (1 << n) - 1
    initial, step = model
    seen: set[tuple[int, Hashable]] = set()
    stack: list[tuple[int, Hashable]] = [(0, initial)]
    while stack:
        done, state = stack.pop()
        if done == full:
            return True
        if (done, state) in seen:
            continue
        seen.add((done, state))
        if len(seen) > budget:
            raise RuntimeError(f"history of {n} operations too hard to check")
        # An operation can go next only if no pending operation returned before it started.
        pending = [i for i in range(n) if not done >> i & 1]
        horizon = min(ops[i].end for i in pending)
        for i in pending:
            op = ops[i]
            if op.start > horizon:
                break  # sorted by start: no later one can go next either
            after = step(state, op)
            if after is not None:
                stack.append((done | 1 << i, after))
    return False


def check_history(history: Sequence[Op]) -> list[str]:
    """The keys whose sub-history is not linearizable (empty: the history is linearizable)."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    bad = []
    for key, ops in sorted(by_key.items()):
        if not _revisions_consistent(ops):
            bad.append(key)
            continue
        make = counter_model if key.startswith("c") else register_model
        if not linearizable(ops, make(ops)):
            bad.append(key)
    return bad


def _revisions_consistent(ops: Sequence[Op]) -> bool:
    """One revision names one write: never two values under one revision, or the reverse."""
    value_of: dict[int, Any] = {}
    revision_of: dict[Any, int] = {}
    for op in ops:
        if op.kind == "get_entry" and op.result is not None:
            value, revision = op.result
            if value_of.setdefault(revision, value) != value:
                return False
            if revision_of.setdefault(value, revision) != revision:
                return False
    return True


# -- the checker rejects what it must reject -----------------------------------------------------
def _op(start: int, end: int, kind: str, arg: Any = None, result: Any = None, key: str = "r") -> Op:
    return Op(0, start, end, key, kind, arg, result)


def test_checker_accepts_overlapping_reads_of_either_value() -> None:
    for seen in (None, ("v1", 5)):
        history = [_op(0, 100, "set", "v1", True), _op(10, 20, "get_entry", result=seen)]
        assert check_history(history) == []


def test_checker_rejects_a_stale_read() -> None:
    history = [_op(0, 10, "set", "v1", True), _op(20, 30, "get_entry", result=None)]
    assert check_history(history) == ["r"]


def test_checker_rejects_a_read_going_back_in_time() -> None:
    # The first read saw the write, so it had happened; a later read cannot miss it.
    history = [
        _op(0, 100, "set", "v1", True),
        _op(10, 20, "get_entry", result=("v1", 5)),
        _op(30, 40, "get_entry", result=None),
    ]
    assert check_history(history) == ["r"]


def test_checker_rejects_a_lost_increment() -> None:
    sequential = [
        _op(0, 10, "incr", 1, 1, key="c"),
        _op(20, 30, "incr", 1, 1, key="c"),
    ]
    assert check_history(sequential) == ["c"]
    concurrent = [
        _op(0, 30, "incr", 1, 2, key="c"),
        _op(5, 25, "incr", 1, 1, key="c"),
        _op(40, 50, "get", result=2, key="c"),
    ]
    assert check_history(concurrent) == []


def test_checker_rejects_two_winning_compare_and_sets() -> None:
    seen = ("v1", 7)
    history = [
        _op(0, 10, "set", "v1", True),
        _op(20, 30, "get_entry", result=seen),
        _op(40, 50, "cas", ("v2", 7), True),
        _op(60, 70, "cas", ("v3", 7), True),  # the register is at v2 now: this must fail
    ]
    assert check_history(history) == ["r"]
    fixed = [*history[:3], _op(60, 70, "cas", ("v3", 7), False)]
    assert check_history(fixed) == []


def test_checker_needs_the_search() -> None:
    # Only one order works: the write of v2 between the two reads, although it started first.
    history = [
        _op(0, 100, "set", "v2", True),
        _op(10, 20, "set", "v1", True),
        _op(30, 40, "get_entry", result=("v1", 1)),
        _op(50, 60, "get_entry", result=("v2", 2)),
    ]
    assert check_history(history) == []
    assert check_history([*history, _op(110, 120, "get_entry", result=("v1", 1))]) == ["r"]


def test_checker_rejects_one_revision_for_two_writes() -> None:
    history = [
        _op(0, 10, "set", "v1", True),
        _op(20, 30, "get_entry", result=("v1", 4)),
        _op(40, 50, "set", "v2", True),
        _op(60, 70, "get_entry", result=("v2", 4)),
    ]
    assert check_history(history) == ["r"]


def test_checker_decomposes_by_key() -> None:
    good = [
        _op(0, 10, "set", "x", True, key="r1"),
        _op(20, 30, "get_entry", result=("x", 1), key="r1"),
    ]
    bad = [_op(0, 10, "set", "y", True, key="r2"), _op(20, 30, "get_entry", result=None, key="r2")]
    assert check_history(good + bad) == ["r2"]


# -- real histories ---------------------------------------------------------------------------
PROCESSES = 4
OPS_PER_PROCESS = 500
REGISTERS = ["r0", "r1"]
COUNTERS = ["c0"]


def _record(url: str, proc: int, seed: int, barrier: Any, out: Any) -> None:
    store = sharedkv.Store(url)
    rng = random.Random(seed * 100 + proc)
    seen: dict[str, int] = {}
    history: list[tuple[Any, ...]] = []
    barrier.wait(60)  # everyone starts together
    for i in range(OPS_PER_PROCESS):
        key = rng.choice(REGISTERS + COUNTERS)
        arg: Any
        if key in COUNTERS:
            if rng.random() < 0.6:
                kind, arg = "incr", 1
                t0 = time.monotonic_ns()
                result: Any = store.incr(key, arg)
            else:
                kind, arg = "get", None
                t0 = time.monotonic_ns()
                result = store.get(key)
        else:
            roll = rng.random()
            value = f"p{proc}-{i}"
            if roll < 0.4:
                kind, arg = "get_entry", None
                t0 = time.monotonic_ns()
                entry = store.get_entry(key)
                result = None if entry is None else (entry.value, entry.revision)
                if entry is not None:
                    seen[key] = entry.revision
            elif roll < 0.65:
                kind, arg = "set", value
                t0 = time.monotonic_ns()
                result = store.set(key, value)
            elif roll < 0.95:
                revision = seen.get(key, 0)
                kind, arg = "cas", (value, revision)
                t0 = time.monotonic_ns()
                result = store.set(key, value, if_revision=revision)
            else:
                kind, arg = "delete", None
                t0 = time.monotonic_ns()
                result = store.delete(key)
        t1 = time.monotonic_ns()
        history.append((proc, t0, t1, key, kind, arg, result))
    store.close()
    out.put(history)


def _url(request: pytest.FixtureRequest, kind: str, tmp_path: Any) -> str:
    if kind == "shm":
        return f"shm://{unique_name('lin')}"
    if kind == "file":
        return f"file://{tmp_path}/lin"
    pytest.importorskip("redis")
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?namespace={unique_name('lin')}"


@pytest.fixture(params=[b for b in BACKENDS if b != "memory"] + ["file"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    url = _url(request, request.param, tmp_path)
    keeper = sharedkv.Store(url)  # keeps the store alive between processes
    yield url
    if not url.startswith(("shm", "file")):
        keeper.clear()
    keeper.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_concurrent_history_is_linearizable(shared_url: str, seed: int) -> None:
    ctx = multiprocessing.get_context("forkserver")
    out, barrier = ctx.Queue(), ctx.Barrier(PROCESSES)
    procs = [
        ctx.Process(target=_record, args=(shared_url, p, seed, barrier, out))
        for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    history = [Op(*row) for _ in procs for row in out.get(timeout=60)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(history) == PROCESSES * OPS_PER_PROCESS
    assert check_history(history) == [], "not linearizable; the history: " + repr(history)
