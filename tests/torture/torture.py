#!/usr/bin/env python
"""Crash torture: processes hammer one store and are killed with SIGKILL at random moments.

Run it for as long as you like::

    .venv/bin/python tests/torture/torture.py --duration 600 --seed 1

Roles (each a process started from a fork server, replaced by a new *incarnation* when killed):

* **writers** run a random but reproducible plan (``Plan``) mixing every write operation: set
  (with and without TTL), delete, pop, add, compare-and-set, expire, persist, incr, update,
  set_many, ephemeral sets, publish, queue put and get, shared locks with a read-modify-write
  inside, and a lock of their own held across operations. Each writer owns a private key space
  (``w/<incarnation>/...``), and logs each operation's result to its own file, appending and
  flushing only after the call returned;
* **readers** read snapshots and check what a reader can see: revisions and counters never go
  back, ``set_many`` groups are all or nothing;
* **subscribers** check sequence numbers (no hole without a ``Gap``), per-publisher order and no
  duplicates;
* **consumers** block on the shared queue.

After each kill the conductor checks the victim: the store answers at once; the writer's key
space equals its model after the acknowledged operations (or after one more: a write can land
without being logged when the kill comes between the call and the log line); every logged
result matched the model; its ephemeral keys are gone; its own lock is free within one second.
Every few kills it checks more: shared counters and lock-guarded counters against the logs
(every increment returns a distinct value: no lost update, no overlapping critical sections),
a sample of older dead writers again, and a freshly started process that opens the store and
finds no reader slot, process entry, interest, lock holder, ephemeral key, socket or file of a
dead process. At the end every process is killed, the queue is drained and accounted for (no
item duplicated, none lost except one per consumer killed while taking it, as documented), the
conductor's own subscription is accounted for (every acknowledged publish delivered or reported
in a ``Gap``), and closing the store removes its directory.

The last line printed is ``TORTURE-SUMMARY {json}``; the exit status is 1 on any violation.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sharedkv
from sharedkv import Gap, Message

# -- the shape of the workload ------------------------------------------------------------------
S_SLOTS = 48  # plain slots: set, get, delete, pop, compare-and-set, expire, persist
A_SLOTS = 12  # add-only slots (and their deletes)
E_SLOTS = 8  # ephemeral slots
GROUP_SIZES = (2, 3, 5, 8, 13)  # set_many groups, each always written whole
N_LOCKS = 3
N_CHANNELS = 4
QUEUE = "q"
QUEUE_MAX = 2000
LONG_TTL = 86400.0  # long enough never to expire during a run
LOCK_WAIT = 10.0
STORE_OPTIONS: dict[str, Any] = {"buffer": 1 << 15}
STORE_FILES = {"data.mdb", "lock.mdb", "attach.lock", "info.json"}

# Open defects, each reproduced deterministically by an expected failure in tests/test_torture.py.
# Their failures here are counted apart from violations, so that a run still proves everything
# else; --strict counts them as violations. Remove an entry when its test passes.
KNOWN_ISSUES: dict[str, str] = {}

WEIGHTS: dict[str, int] = {
    "set": 18, "get": 8, "del": 6, "pop": 3, "cas": 5, "exp": 2, "per": 2, "add": 4,
    "adel": 2, "many": 6, "incr": 7, "upd": 5, "eph": 4, "sinc": 5, "pub": 8, "qput": 6,
    "qget": 5, "lock": 4, "own": 3,
}  # fmt: skip
_KINDS = list(WEIGHTS)
_CUMULATIVE: list[float] = []
_total = 0
for _kind in _KINDS:
    _total += WEIGHTS[_kind]
    _CUMULATIVE.append(_total)

Op = tuple[str, int, int]  # kind, argument (slot, group, amount, lock or channel), flag


@dataclass(frozen=True)
class Config:
    url: str
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    conductor: int = 0  # the pid whose death ends every worker (see _worker)


def value_for(n: int) -> Any:
    """The value written by operation ``n``: several types, now and then a large one."""
    if n % 211 == 0:
        return {"n": n, "big": "y" * 150_000}
    kind = n % 4
    if kind == 0:
        return n  # stored as a decimal integer
    if kind == 1:
        return {"n": n, "s": "x" * (n % 97)}
    if kind == 2:
        return f"str{n}"
    return [n, bytes(n % 13)]


def ident(value: Any) -> int:
    """The operation number a value from :func:`value_for` was written by."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return int(value["n"])
    if isinstance(value, str):
        return int(value[3:])
    return int(value[0])


class Plan:
    """The reproducible sequence of operations of one writer incarnation."""

    def __init__(self, seed: int, inc: int) -> None:
        self._rng = random.Random(f"sharedkv-torture/{seed}/{inc}")
        self._own_held = False

    def next(self) -> Op:
        rng = self._rng
        kind = _KINDS[bisect.bisect_right(_CUMULATIVE, rng.random() * _total)]
        if kind in ("set", "get", "del", "pop", "cas", "exp", "per"):
            return (kind, rng.randrange(S_SLOTS), int(kind == "set" and rng.random() < 0.2))
        if kind in ("add", "adel"):
            return (kind, rng.randrange(A_SLOTS), 0)
        if kind == "eph":
            return (kind, rng.randrange(E_SLOTS), 0)
        if kind == "many":
            return (kind, rng.randrange(len(GROUP_SIZES)), 0)
        if kind == "incr":
            return (kind, rng.randrange(-3, 6), 0)
        if kind == "lock":
            return (kind, rng.randrange(N_LOCKS), 0)
        if kind == "pub":
            return (kind, rng.randrange(N_CHANNELS), 0)
        if kind == "own":
            self._own_held = not self._own_held
            return (kind, 0, int(self._own_held))  # flag 1: acquire, 0: release
        return (kind, 0, 0)


# -- the model of one writer's key space -----------------------------------------------------
@dataclass
class Model:
    """What a writer's private keys must hold after a sequence of its operations."""

    s: dict[int, tuple[int, bool]] = field(default_factory=dict)  # slot -> (op, has ttl)
    a: dict[int, int] = field(default_factory=dict)
    m: dict[int, int] = field(default_factory=dict)  # group -> op
    c: int | None = None
    u: int | None = None

    def copy(self) -> Model:
        return Model(dict(self.s), dict(self.a), dict(self.m), self.c, self.u)

    def apply(self, op: Op, n: int, result: str | None) -> str | None:
        """Apply operation ``n``; with its logged ``result``, return a complaint if it is wrong."""
        kind, arg, flag = op
        expect: str | None = None
        if kind == "set":
            self.s[arg] = (n, bool(flag))
            expect = "1"
        elif kind == "get":
            expect = str(self.s[arg][0]) if arg in self.s else "-"
        elif kind in ("del", "pop"):
            old = self.s.pop(arg, None)
            if kind == "del":
                expect = "1" if old is not None else "0"
            else:
                expect = str(old[0]) if old is not None else "-"
        elif kind == "cas":
            self.s[arg] = (n, False)
            expect = "1"
        elif kind in ("exp", "per"):
            if arg in self.s:
                self.s[arg] = (self.s[arg][0], kind == "exp")
                expect = "1"
            else:
                expect = "0"
        elif kind == "add":
            expect = "0" if arg in self.a else "1"
            self.a.setdefault(arg, n)
        elif kind == "adel":
            expect = "1" if self.a.pop(arg, None) is not None else "0"
        elif kind == "many":
            self.m[arg] = n
            expect = "1"
        elif kind == "incr":
            self.c = (self.c or 0) + arg
            expect = str(self.c)
        elif kind == "upd":
            self.u = (self.u or 0) + 1
            expect = str(self.u)
        elif kind in ("eph", "own"):
            expect = "1"
        if result is not None and expect is not None and result != expect:
            return f"op {n} {kind}({arg}): logged result {result!r}, the model says {expect!r}"
        return None

    def expected(self, inc: int) -> dict[str, tuple[Any, bool]]:
        """Key -> (value, has expiry) for the writer's non-ephemeral keys."""
        out: dict[str, tuple[Any, bool]] = {}
        for slot, (n, ttl) in self.s.items():
            out[f"w/{inc}/s/{slot}"] = (value_for(n), ttl)
        for slot, n in self.a.items():
            out[f"w/{inc}/a/{slot}"] = (value_for(n), False)
        for group, n in self.m.items():
            for j in range(GROUP_SIZES[group]):
                out[f"w/{inc}/m/{group}/{j}"] = ({"n": n, "j": j}, False)
        if self.c is not None:
            out[f"w/{inc}/c"] = (self.c, False)
        if self.u is not None:
            out[f"w/{inc}/u"] = ({"u": self.u}, False)
        return out


# -- workers ------------------------------------------------------------------------------------
class Log:
    """An append-only log file: one ``os.write`` per line, so a line is in the file once written."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def line(self, text: str) -> None:
        os.write(self.fd, (text + "\n").encode())

    def error(self) -> None:
        self.line("E " + traceback.format_exc().replace("\n", " | "))


def _outlive_guard(conductor: int) -> None:
    """End this worker when the conductor is gone: a conductor killed by a timeout must not
    leave workers running (and loading the machine) for ever."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(conductor, 0)
        except ProcessLookupError:
            os._exit(4)


def _worker(body: Callable[[Log], None], log_path: str, conductor: int = 0) -> None:
    if conductor:
        threading.Thread(target=_outlive_guard, args=(conductor,), daemon=True).start()
    log = Log(log_path)
    try:
        body(log)
    except BaseException:
        log.error()
        os._exit(3)


def writer_main(cfg: Config, inc: int, log_path: str) -> None:
    _worker(lambda log: _writer(cfg, inc, log), log_path, cfg.conductor)


def _writer(cfg: Config, inc: int, log: Log) -> None:
    store = sharedkv.Store(cfg.url, **cfg.options)
    store.set(f"who/{inc}", "writer", ephemeral=True)
    plan = Plan(cfg.seed, inc)
    queue = store.queue(QUEUE, maxsize=QUEUE_MAX)
    own = store.lock(f"lk/{inc}", timeout=5)
    shared = [store.lock(f"lock/{k}", timeout=LOCK_WAIT) for k in range(N_LOCKS)]
    prefix = f"w/{inc}/"
    n = 0
    while True:
        kind, arg, flag = plan.next()
        result: Any
        if kind == "set":
            result = int(
                store.set(f"{prefix}s/{arg}", value_for(n), ttl=LONG_TTL if flag else None)
            )
        elif kind == "get":
            value = store.get(f"{prefix}s/{arg}")
            result = "-" if value is None else ident(value)
        elif kind == "del":
            result = int(store.delete(f"{prefix}s/{arg}"))
        elif kind == "pop":
            value = store.pop(f"{prefix}s/{arg}", None)
            result = "-" if value is None else ident(value)
        elif kind == "cas":
            entry = store.get_entry(f"{prefix}s/{arg}")
            revision = 0 if entry is None else entry.revision
            result = int(store.set(f"{prefix}s/{arg}", value_for(n), if_revision=revision))
        elif kind == "exp":
            result = int(store.expire(f"{prefix}s/{arg}", LONG_TTL))
        elif kind == "per":
            result = int(store.persist(f"{prefix}s/{arg}"))
        elif kind == "add":
            result = int(store.add(f"{prefix}a/{arg}", value_for(n)))
        elif kind == "adel":
            result = int(store.delete(f"{prefix}a/{arg}"))
        elif kind == "many":
            group = {f"{prefix}m/{arg}/{j}": {"n": n, "j": j} for j in range(GROUP_SIZES[arg])}
            store.set_many(group)
            result = 1
        elif kind == "incr":
            result = store.incr(f"{prefix}c", arg)
        elif kind == "upd":
            result = store.update(f"{prefix}u", lambda old: {"u": (old or {"u": 0})["u"] + 1})
            result = result["u"]
        elif kind == "eph":
            result = int(store.set(f"{prefix}e/{arg}", value_for(n), ephemeral=True))
        elif kind == "sinc":
            result = store.incr("shared/c")
        elif kind == "pub":
            result = store.publish(f"ch.{arg}", [inc, n])
        elif kind == "qput":
            try:
                queue.put([inc, n], timeout=0.02)
                result = 1
            except sharedkv.QueueFull:
                result = "full"
        elif kind == "qget":
            try:
                item = queue.get(timeout=0.02)
                result = f"{item[0]}:{item[1]}"
            except sharedkv.QueueEmpty:
                result = "empty"
        elif kind == "lock":
            lock = shared[arg]
            if lock.acquire():
                try:
                    counter = store.get(f"lockctr/{arg}", 0) + 1
                    store.set(f"lockctr/{arg}", counter)
                finally:
                    lock.release()
                result = counter
            else:
                result = "timeout"
        elif kind == "own":
            if flag:
                result = int(own.acquire(blocking=False))
            else:
                own.release()
                result = 1
        else:  # pragma: no cover - the plan only makes the kinds above
            raise AssertionError(kind)
        log.line(f"{n} {kind} {result}")
        n += 1


def reader_main(cfg: Config, inc: int, log_path: str) -> None:
    _worker(lambda log: _reader(cfg, log), log_path, cfg.conductor)


def _reader(cfg: Config, log: Log) -> None:
    store = sharedkv.Store(cfg.url, **cfg.options)
    rng = random.Random()
    last_rev = 0
    last_counter = 0
    writers: list[str] = []
    checks = 0
    loops = 0
    while True:
        loops += 1
        rev = store.revision
        if rev < last_rev:
            log.line(f"V revision went back from {last_rev} to {rev}")
        last_rev = rev
        counter = store.get("shared/c", 0)
        if counter < last_counter:
            log.line(f"V shared/c went back from {last_counter} to {counter}")
        last_counter = counter
        checks += 2
        if loops % 200 == 1:
            writers = [key.split("/", 1)[1] for key in store.keys("who/*")]
        if not writers:
            continue
        inc = rng.choice(writers)
        group = rng.randrange(len(GROUP_SIZES))
        keys = [f"w/{inc}/m/{group}/{j}" for j in range(GROUP_SIZES[group])]
        _check_group(log, keys, store.get_many(keys))
        snapshot = dict(store.items(f"w/{inc}/m/*"))
        for g, size in enumerate(GROUP_SIZES):
            keys = [f"w/{inc}/m/{g}/{j}" for j in range(size)]
            _check_group(log, keys, {k: snapshot[k] for k in keys if k in snapshot})
        checks += 1 + len(GROUP_SIZES)
        if loops % 100 == 0:
            log.line(f"C {checks}")


def _check_group(log: Log, keys: list[str], got: dict[str, Any]) -> None:
    if not got:
        return
    if len(got) != len(keys):
        log.line(f"V set_many group seen half written: {sorted(got)} of {keys}")
        return
    ns = {value["n"] for value in got.values()}
    if len(ns) != 1 or any(got[k]["j"] != j for j, k in enumerate(keys)):
        log.line(f"V set_many group mixes writes: {got}")


def subscriber_main(cfg: Config, inc: int, log_path: str) -> None:
    _worker(lambda log: _subscriber(cfg, log), log_path, cfg.conductor)


class StreamCheck:
    """Checks a subscription's events: contiguous sequence numbers (or a Gap), per-publisher
    order, no duplicates. Complaints go to ``complain``."""

    def __init__(self, complain: Callable[[str], None], known: Callable[[str], None]) -> None:
        self.complain = complain
        self.known = known  # failures of KNOWN_ISSUES
        self.last_seq: dict[str, int] = {}
        self.last_n: dict[tuple[int, str], int] = {}
        self.last_any: dict[int, tuple[int, str]] = {}
        self.received: list[tuple[int, int]] = []
        self.dropped = 0

    def event(self, event: Message | Gap) -> None:
        if isinstance(event, Gap):
            prev = self.last_seq.get(event.channel)
            if prev is not None and event.first_seq != prev + 1:
                self.complain(f"gap {event} does not follow seq {prev}")
            self.last_seq[event.channel] = event.last_seq
            self.dropped += event.count
            return
        prev = self.last_seq.get(event.channel)
        if prev is not None and event.seq != prev + 1:
            self.complain(f"{event.channel}: seq {event.seq} after {prev} with no gap reported")
        self.last_seq[event.channel] = event.seq
        publisher, n = event.data
        last = self.last_n.get((publisher, event.channel), -1)
        if last >= n:
            self.complain(f"{event.channel}: message {n} of publisher {publisher} after its {last}")
        self.last_n[(publisher, event.channel)] = n
        previous = self.last_any.get(publisher)
        if previous is not None and previous[0] > n:
            self.known(
                f"cross-channel-order {event.channel}: message {n} of publisher {publisher} "
                f"after its {previous[0]} on {previous[1]}"
            )
        if previous is None or previous[0] < n:
            self.last_any[publisher] = (n, event.channel)
        self.received.append((publisher, n))


def _subscriber(cfg: Config, log: Log) -> None:
    store = sharedkv.Store(cfg.url, **cfg.options)
    check = StreamCheck(lambda text: log.line(f"V {text}"), lambda text: log.line(f"K {text}"))
    sub = store.subscribe("ch.*")
    count = 0
    while True:
        try:
            event = sub.get(timeout=0.5)
        except sharedkv.TimeoutError:
            continue
        check.event(event)
        count += 1
        if count % 200 == 0:
            log.line(f"C {count}")


def consumer_main(cfg: Config, inc: int, log_path: str) -> None:
    _worker(lambda log: _consumer(cfg, log), log_path, cfg.conductor)


def _consumer(cfg: Config, log: Log) -> None:
    store = sharedkv.Store(cfg.url, **cfg.options)
    queue = store.queue(QUEUE, maxsize=QUEUE_MAX)
    while True:
        try:
            item = queue.get(timeout=1.0)
        except sharedkv.QueueEmpty:
            continue
        log.line(f"G {item[0]}:{item[1]}")


def fresh_main(cfg: Config, out_path: str) -> None:
    """A process that was not running before: it opens the store and inspects it."""
    problems: list[str] = []
    started = time.monotonic()
    try:
        problems = _fresh(cfg, started)
    except BaseException:
        problems.append("fresh process failed: " + traceback.format_exc())
    with open(out_path, "w") as f:
        json.dump({"problems": problems, "seconds": time.monotonic() - started}, f)


def _fresh(cfg: Config, started: float) -> list[str]:
    from sharedkv import _proc

    problems: list[str] = []
    sep = "&" if "?" in cfg.url else "?"
    store = sharedkv.Store(cfg.url + sep + "create=0", **cfg.options)
    opened = time.monotonic() - started
    if opened > 2.0:
        problems.append(f"opening the store took {opened:.2f} s")
    if not store.set("fresh/probe", os.getpid()) or store.get("fresh/probe") != os.getpid():
        problems.append("the store does not answer a set/get probe")
    for pid in store.stats().get("readers", []):
        if not _pid_alive(pid):
            problems.append(f"reader slot of dead process {pid} left behind")
    backend: Any = store.backend
    with backend._env.begin() as txn:
        tables: dict[str, tuple[Any, Callable[[bytes], bytes]]] = {
            "procs": (backend._procs, lambda k: k[: _proc.TOKEN_SIZE]),
            "interest": (backend._interest, lambda k: k[-_proc.TOKEN_SIZE :]),
            "eph": (backend._eph, lambda k: k[: _proc.TOKEN_SIZE]),
            "hinted": (backend._hinted, lambda k: k[: _proc.TOKEN_SIZE]),
            "locks": (
                backend._locks,
                lambda k: k[k.index(b"\0") + 1 : k.index(b"\0") + 1 + _proc.TOKEN_SIZE],
            ),
        }
        for table, (db, token_of) in tables.items():
            for key, _ in txn.cursor(db=db):
                token = bytes(token_of(bytes(key)))
                owner = _proc.ProcessId.from_token(token)
                if not owner.alive():
                    problems.append(f"{table} entry of dead process {owner.pid} left behind")
        for key, _ in txn.cursor(db=backend._meta):
            if bytes(key).startswith(b"ovf"):
                owner = _proc.ProcessId.from_token(bytes(key)[3 : 3 + _proc.TOKEN_SIZE])
                if not owner.alive():
                    problems.append(f"overflow flag of dead process {owner.pid} left behind")
    store_id = backend._store_id
    with open("/proc/net/unix") as f:
        for line in f:
            name = line.split()[-1]
            marker = f"@sharedkv-{store_id}-"
            if name.startswith(marker):
                token_hex = name[len(marker) : len(marker) + 2 * _proc.TOKEN_SIZE]
                owner = _proc.ProcessId.from_token(bytes.fromhex(token_hex))
                if not owner.alive():
                    problems.append(f"socket of dead process {owner.pid} left behind")
    extra = set(os.listdir(store.path or "")) - STORE_FILES
    if extra:
        problems.append(f"unexpected files in the store directory: {sorted(extra)}")
    store.delete("fresh/probe")
    store.close()
    return problems


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


# -- the conductor ------------------------------------------------------------------------------
PRELOAD = [
    "sharedkv",
    "sharedkv._codec",
    "sharedkv._proc",
    "sharedkv._backends.memory",
    "sharedkv._backends.shm",
    "sharedkv._backends._notify",
]

ROLES: dict[str, Callable[[Config, int, str], None]] = {
    "writer": writer_main,
    "reader": reader_main,
    "subscriber": subscriber_main,
    "consumer": consumer_main,
}


@dataclass
class Worker:
    role: str
    inc: int
    proc: Any
    log_path: str
    offset: int = 0
    lines: int = 0
    plan: Plan | None = None
    model: Model = field(default_factory=Model)
    acked: int = 0  # operations acknowledged (writers)
    last_sinc: int = 0
    inflight: Op | None = None
    after: Model | None = None  # the model with the in-flight operation applied
    matched: int = -1  # 0: the state matched the acknowledged ops, 1: one more had landed


class Conductor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.cfg = Config(args.url, args.seed, dict(STORE_OPTIONS), conductor=os.getpid())
        self.logdir = tempfile.mkdtemp(prefix="sharedkv-torture-")
        self.ctx = multiprocessing.get_context("forkserver")
        # The library is imported once, by the fork server: every worker of a run runs the same
        # library code, even if its sources change on disk meanwhile.
        self.ctx.set_forkserver_preload(PRELOAD)
        self.violations: list[str] = []
        self.live: list[Worker] = []
        self.dead_writers: list[Worker] = []
        self.next_inc = 0
        self.kills = 0
        self.started = 0
        self.ops_checked = 0
        self.reader_checks: dict[int, int] = {}
        self.subscriber_events: dict[int, int] = {}
        self.lock_takeover_worst = 0.0
        self.lock_timeouts = 0
        self.fresh_checks = 0
        self.fresh_seen: set[str] = set()
        self.queue_lost = 0
        # Global accounting, fed from every log line exactly once.
        self.sinc_results: set[int] = set()
        self.lock_results: list[set[int]] = [set() for _ in range(N_LOCKS)]
        self.sinc_inflight_dead = 0
        self.lock_inflight_dead = [0] * N_LOCKS
        self.put_acked: set[tuple[int, int]] = set()
        self.put_inflight: set[tuple[int, int]] = set()
        self.taken: set[tuple[int, int]] = set()
        self.take_inflight_dead = 0
        self.published: set[tuple[int, int]] = set()
        self.publish_inflight: set[tuple[int, int]] = set()
        self.sub_lock = threading.Lock()
        self.sub_check = StreamCheck(
            lambda text: self.violate(f"conductor subscription: {text}"), self.known_issue
        )
        self.known: Counter[str] = Counter()
        self.known_samples: dict[str, str] = {}
        self.store: sharedkv.Store | None = None

    # -- reporting ---------------------------------------------------------------------------
    def violate(self, text: str) -> None:
        self.violations.append(text)
        if not self.args.quiet:
            print(f"VIOLATION: {text}", file=sys.stderr, flush=True)

    def known_issue(self, text: str) -> None:
        """A failure of an open defect (KNOWN_ISSUES): counted apart unless --strict."""
        issue = text.split(" ", 1)[0]
        if self.args.strict or issue not in KNOWN_ISSUES:
            self.violate(text)
            return
        self.known[issue] += 1
        self.known_samples.setdefault(issue, text)

    # -- processes ----------------------------------------------------------------------------
    def spawn(self, role: str) -> Worker:
        inc = self.next_inc
        self.next_inc += 1
        log_path = os.path.join(self.logdir, f"{inc}-{role}.log")
        proc = self.ctx.Process(target=ROLES[role], args=(self.cfg, inc, log_path), daemon=True)
        proc.start()
        worker = Worker(role, inc, proc, log_path)
        if role == "writer":
            worker.plan = Plan(self.cfg.seed, inc)
        self.live.append(worker)
        self.started += 1
        return worker

    def kill(self, worker: Worker) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.join(10)
        if worker.proc.exitcode is None:
            self.violate(f"{worker.role} {worker.inc} survived SIGKILL for 10 s")
        elif worker.proc.exitcode != -signal.SIGKILL:
            self.violate(f"{worker.role} {worker.inc} had exited with {worker.proc.exitcode}")
        self.live.remove(worker)
        self.kills += 1

    # -- reading logs ---------------------------------------------------------------------------
    def absorb(self, worker: Worker) -> None:
        """Read the new complete lines of a worker's log, exactly once each."""
        try:
            with open(worker.log_path, "rb") as f:
                f.seek(worker.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        worker.offset += end
        for raw in data[:end].decode().splitlines():
            worker.lines += 1
            self.line(worker, raw)

    def line(self, worker: Worker, text: str) -> None:
        head, _, rest = text.partition(" ")
        if head == "E":
            self.violate(f"{worker.role} {worker.inc} failed: {rest}")
        elif head == "V":
            self.violate(f"{worker.role} {worker.inc}: {rest}")
        elif head == "K":
            self.known_issue(rest)
        elif head == "C":
            count = int(rest)
            if worker.role == "reader":
                self.reader_checks[worker.inc] = count
            else:
                self.subscriber_events[worker.inc] = count
        elif head == "G":
            self.take(worker, rest)
        else:
            self.writer_line(worker, int(head), *rest.split(" ", 1))

    def take(self, worker: Worker, item_text: str) -> None:
        producer, n = map(int, item_text.split(":"))
        item = (producer, n)
        if item in self.taken:
            self.violate(f"queue item {item} taken twice (again by {worker.role} {worker.inc})")
        self.taken.add(item)
        self.ops_checked += 1

    def writer_line(self, worker: Worker, n: int, kind: str, result: str) -> None:
        assert worker.plan is not None
        if n != worker.acked:
            self.violate(f"writer {worker.inc}: log line {n} where {worker.acked} was due")
            return
        op = worker.plan.next()
        worker.acked += 1
        self.ops_checked += 1
        if op[0] != kind:
            self.violate(f"writer {worker.inc}: op {n} logged as {kind}, planned as {op[0]}")
            return
        complaint = worker.model.apply(op, n, result)
        if complaint:
            self.violate(f"writer {worker.inc}: {complaint}")
        if kind == "sinc":
            value = int(result)
            if value <= worker.last_sinc:
                self.violate(f"writer {worker.inc}: shared/c went {worker.last_sinc} -> {value}")
            worker.last_sinc = value
            if value in self.sinc_results:
                self.violate(f"shared/c: incr returned {value} twice (a lost update)")
            self.sinc_results.add(value)
        elif kind == "lock":
            if result == "timeout":
                self.lock_timeouts += 1
            else:
                value = int(result)
                if value in self.lock_results[op[1]]:
                    self.violate(f"lock/{op[1]}: two critical sections both wrote {value}")
                self.lock_results[op[1]].add(value)
        elif kind == "qput" and result == "1":
            self.put_acked.add((worker.inc, n))
        elif kind == "qget" and result != "empty":
            self.take(worker, result)
        elif kind == "pub":
            self.published.add((worker.inc, n))
            if int(result) < 1:
                self.violate(f"writer {worker.inc}: publish {n} reached {result} subscriptions")

    # -- checks --------------------------------------------------------------------------------
    def observed(self, inc: int) -> dict[str, tuple[Any, bool]]:
        assert self.store is not None
        out: dict[str, tuple[Any, bool]] = {}
        for key in self.store.keys(f"w/{inc}/*"):
            entry = self.store.get_entry(key)
            if entry is not None:
                out[key] = (entry.value, entry.expires_at is not None)
        return out

    def after_death(self, worker: Worker) -> None:
        """Everything that must hold once ``worker`` is dead."""
        assert self.store is not None
        self.absorb(worker)
        if worker.role == "consumer":
            self.take_inflight_dead += 1  # it may have died holding an item it had taken
        if worker.role != "writer":
            return
        assert worker.plan is not None
        op = worker.plan.next()
        worker.inflight = op
        worker.plan = None
        worker.after = worker.model.copy()
        worker.after.apply(op, worker.acked, None)
        kind, arg, _ = op
        if kind == "sinc":
            self.sinc_inflight_dead += 1
        elif kind == "lock":
            self.lock_inflight_dead[arg] += 1
        elif kind == "qput":
            self.put_inflight.add((worker.inc, worker.acked))
        elif kind == "qget":
            self.take_inflight_dead += 1
        elif kind == "pub":
            self.publish_inflight.add((worker.inc, worker.acked))
        self.verify_writer(worker)
        if self.store.keys(f"who/{worker.inc}") or self.store.get(f"who/{worker.inc}"):
            self.violate(f"writer {worker.inc}: its ephemeral registration outlived it")
        self.check_lock_free(f"lk/{worker.inc}")
        self.dead_writers.append(worker)

    def verify_writer(self, worker: Worker) -> None:
        assert worker.after is not None
        seen = self.observed(worker.inc)
        ephemeral = [k for k in seen if k.startswith(f"w/{worker.inc}/e/")]
        if ephemeral:
            self.violate(f"writer {worker.inc}: ephemeral keys of a dead process: {ephemeral}")
        seen = {k: v for k, v in seen.items() if k not in ephemeral}
        before = worker.model.expected(worker.inc)
        after = worker.after.expected(worker.inc)
        matched = 0 if seen == before else 1 if seen == after else -1
        if matched == -1:
            self.violate(
                f"writer {worker.inc} (dead after {worker.acked} acknowledged ops, in flight "
                f"{worker.inflight}): store differs from the model: {_diff(seen, before)}"
            )
        elif worker.matched not in (-1, matched):
            self.violate(f"writer {worker.inc}: its keys changed after its death")
        else:
            worker.matched = matched
        self.ops_checked += len(before)

    def check_lock_free(self, name: str) -> None:
        assert self.store is not None
        lock = self.store.lock(name)
        t0 = time.monotonic()
        ok = lock.acquire(timeout=1.0)
        elapsed = time.monotonic() - t0
        if ok:
            lock.release()
            self.lock_takeover_worst = max(self.lock_takeover_worst, elapsed)
        else:
            self.violate(f"lock {name} not acquired within 1 s: {lock.owners()}")
        lock.close()

    def probe(self) -> None:
        assert self.store is not None
        t0 = time.monotonic()
        self.store.set("probe", self.kills)
        if self.store.get("probe") != self.kills:
            self.violate("the store did not return what was just written to it")
        elapsed = time.monotonic() - t0
        if elapsed > 2.0:
            self.violate(f"a set/get probe after a kill took {elapsed:.2f} s")

    def counters(self, final: bool) -> None:
        """Shared counters against the logs: bounds while writers run, exact at the end."""
        assert self.store is not None
        lower = [max(self.sinc_results, default=0)] + [max(r, default=0) for r in self.lock_results]
        values = [self.store.get("shared/c", 0)] + [
            self.store.get(f"lockctr/{k}", 0) for k in range(N_LOCKS)
        ]
        for w in self.live:
            self.absorb(w)
        writers = 0 if final else sum(w.role == "writer" for w in self.live)
        results = [self.sinc_results, *self.lock_results]
        inflight = [self.sinc_inflight_dead, *self.lock_inflight_dead]
        names = ["shared/c"] + [f"lockctr/{k}" for k in range(N_LOCKS)]
        for name, value, low, res, extra in zip(
            names, values, lower, results, inflight, strict=True
        ):
            if value < low:
                self.violate(f"{name} = {value}, but an increment already returned {low}")
            if value > len(res) + extra + writers:
                self.violate(
                    f"{name} = {value}: more than the {len(res)} acknowledged increments plus "
                    f"{extra + writers} in flight"
                )
            if final and res and max(res) > value:
                self.violate(f"{name} = {value} after an increment returned {max(res)}")

    def fresh(self) -> None:
        out_path = os.path.join(self.logdir, f"fresh-{self.fresh_checks}.json")
        proc = self.ctx.Process(target=fresh_main, args=(self.cfg, out_path), daemon=True)
        proc.start()
        proc.join(60)
        self.fresh_checks += 1
        if proc.exitcode != 0:
            self.violate(f"the fresh checking process exited with {proc.exitcode}")
            return
        with open(out_path) as f:
            report = json.load(f)
        for problem in report["problems"]:
            if problem in self.fresh_seen:
                continue  # a leftover found again by a later check
            self.fresh_seen.add(problem)
            self.violate(f"fresh process: {problem}")

    def broad_check(self, final: bool = False) -> None:
        for w in self.live:
            self.absorb(w)
        self.counters(final)
        sample = self.rng.sample(self.dead_writers, min(10, len(self.dead_writers)))
        for worker in self.dead_writers if final else sample:
            self.verify_writer(worker)
        self.fresh()

    # -- the end ----------------------------------------------------------------------------------
    def drain_queue(self) -> None:
        assert self.store is not None
        queue = self.store.queue(QUEUE, maxsize=QUEUE_MAX)
        drained = 0
        while True:
            try:
                item = queue.get_nowait()
            except sharedkv.QueueEmpty:
                break
            self.take_item(tuple(item))
            drained += 1
        possible = self.put_acked | self.put_inflight
        phantoms = self.taken - possible
        if phantoms:
            self.violate(f"queue items taken that were never put: {sorted(phantoms)[:10]}")
        lost = self.put_acked - self.taken
        if len(lost) > self.take_inflight_dead:
            self.violate(
                f"{len(lost)} acknowledged queue items lost, more than the "
                f"{self.take_inflight_dead} consumers killed while taking: {sorted(lost)[:10]}"
            )
        self.queue_lost = len(lost)

    def take_item(self, item: tuple[Any, ...]) -> None:
        key = (int(item[0]), int(item[1]))
        if key in self.taken:
            self.violate(f"queue item {key} still queued after it was taken")
        self.taken.add(key)
        self.ops_checked += 1

    def drain_subscription(self, sub: Any, thread: threading.Thread) -> None:
        # Quiet for a while: every message written has been hinted and read by now.
        deadline = time.monotonic() + 10
        last = -1
        while time.monotonic() < deadline:
            with self.sub_lock:
                count = len(self.sub_check.received)
            if count == last:
                break
            last = count
            time.sleep(0.5)
        sub.close()
        thread.join(10)
        received = Counter(self.sub_check.received)
        dups = [m for m, c in received.items() if c > 1]
        if dups:
            self.violate(f"conductor subscription: duplicated messages {dups[:10]}")
        phantoms = set(received) - self.published - self.publish_inflight
        if phantoms:
            self.violate(f"conductor subscription: unpublished messages {sorted(phantoms)[:10]}")
        missing = self.published - set(received)
        if len(missing) > self.sub_check.dropped:
            self.violate(
                f"conductor subscription: {len(missing)} acknowledged messages missing, "
                f"{self.sub_check.dropped} reported dropped: {sorted(missing)[:10]}"
            )
        self.ops_checked += len(received)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        args = self.args
        self.store = store = sharedkv.Store(self.cfg.url, **self.cfg.options)
        path = store.path
        sub = store.subscribe("ch.*")

        def listen() -> None:
            for event in sub:
                with self.sub_lock:
                    self.sub_check.event(event)

        thread = threading.Thread(target=listen, name="torture-subscription", daemon=True)
        thread.start()
        t_start = time.monotonic()
        try:
            for role, count in (
                ("writer", args.writers),
                ("reader", args.readers),
                ("subscriber", args.subscribers),
                ("consumer", args.consumers),
            ):
                for _ in range(count):
                    self.spawn(role)
            deadline = t_start + args.duration
            next_report = t_start + 10
            while time.monotonic() < deadline:
                time.sleep(self.rng.expovariate(1.0 / args.kill_interval))
                self.round()
                if not args.quiet and time.monotonic() >= next_report:
                    next_report += 10
                    print(self.progress(t_start), file=sys.stderr, flush=True)
            for worker in list(self.live):
                self.kill(worker)
                self.after_death(worker)
            self.probe()
            self.broad_check(final=True)
            self.drain_queue()
            self.drain_subscription(sub, thread)
            for k in range(N_LOCKS):
                self.check_lock_free(f"lock/{k}")
        finally:
            for worker in list(self.live):
                with contextlib.suppress(Exception):
                    worker.proc.kill()
                    worker.proc.join(10)
            store.close()
        if path is not None and self.cfg.url.startswith("shm://") and os.path.exists(path):
            self.violate(f"the store directory {path} outlived its last user")
        summary = self.summary(time.monotonic() - t_start)
        if self.violations or args.keep_logs:
            summary["logs"] = self.logdir
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)
        return summary

    def round(self) -> None:
        """One kill: pick a victim, kill it, check, replace it (sometimes kill that at once)."""
        for w in list(self.live):
            if w.proc.exitcode is not None:  # died on its own: that is a failure
                self.absorb(w)
                self.violate(f"{w.role} {w.inc} exited by itself with {w.proc.exitcode}")
                self.live.remove(w)
                self.after_death(w)
                self.spawn(w.role)
        weights = {"writer": 6.0, "reader": 1.0, "subscriber": 1.0, "consumer": 1.0}
        victim = self.rng.choices(self.live, [weights[w.role] for w in self.live])[0]
        self.kill(victim)
        self.after_death(victim)
        self.probe()
        newborn = self.spawn(victim.role)
        if self.rng.random() < 0.1:  # kill it while it attaches
            time.sleep(self.rng.uniform(0.0, 0.03))
            self.kill(newborn)
            self.after_death(newborn)
            self.spawn(victim.role)
        if self.kills % self.args.check_every < 2:
            self.broad_check()

    def progress(self, t_start: float) -> str:
        return (
            f"[{time.monotonic() - t_start:6.1f} s] kills {self.kills}, started {self.started}, "
            f"ops checked {self.ops_checked}, violations {len(self.violations)}"
        )

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "seconds": round(seconds, 1),
            "seed": self.args.seed,
            "kills": self.kills,
            "processes_started": self.started,
            "writer_incarnations": len(self.dead_writers),
            "ops_acknowledged": sum(w.acked for w in self.dead_writers),
            "ops_checked": self.ops_checked
            + sum(self.reader_checks.values())
            + sum(self.subscriber_events.values()),
            "reader_checks": sum(self.reader_checks.values()),
            "subscriber_events": sum(self.subscriber_events.values()),
            "shared_increments": len(self.sinc_results),
            "critical_sections": sum(len(r) for r in self.lock_results),
            "lock_timeouts": self.lock_timeouts,
            "worst_lock_takeover_s": round(self.lock_takeover_worst, 3),
            "writes_landed_unlogged": sum(w.matched == 1 for w in self.dead_writers),
            "queue_items_taken": len(self.taken),
            "queue_items_lost_with_killed_consumers": self.queue_lost,
            "messages_received": len(self.sub_check.received),
            "messages_reported_dropped": self.sub_check.dropped,
            "fresh_process_checks": self.fresh_checks,
            "known_issues": dict(self.known),
            "known_issue_samples": self.known_samples,
            "violations": len(self.violations),
            "violation_samples": self.violations[:20],
        }


def _diff(seen: dict[str, Any], want: dict[str, Any]) -> str:
    parts = []
    for key in sorted(set(seen) | set(want)):
        if seen.get(key) != want.get(key):
            parts.append(f"{key}: {_short(seen.get(key))} != {_short(want.get(key))}")
    return "; ".join(parts[:8])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of killing")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--url", help="the store (default: a new shm:// store)")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=1)
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--kill-interval", type=float, default=0.15, help="mean seconds")
    parser.add_argument("--check-every", type=int, default=10, help="kills between broad checks")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument(
        "--strict", action="store_true", help="count failures of KNOWN_ISSUES as violations"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.url is None:
        args.url = f"shm://torture-{uuid.uuid4().hex[:10]}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    summary = Conductor(args).run()
    if not args.quiet:
        for key, value in summary.items():
            if key != "violation_samples":
                print(f"{key:>40}: {value}", file=sys.stderr)
    print("TORTURE-SUMMARY " + json.dumps(summary), flush=True)
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
