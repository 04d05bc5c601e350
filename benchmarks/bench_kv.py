"""Key-value benchmark: sharedkv against the usual ways of sharing data between processes.

Run from the repository root (full run: about 2 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_kv.py
    .venv/bin/python benchmarks/bench_kv.py --quick                # smoke test, < 60 s
    .venv/bin/python benchmarks/bench_kv.py --json kv.json --markdown kv.md

What is measured, all in one run on one machine:

* Peers, each holding data written by the parent and read/written FROM SPAWNED CHILD
  PROCESSES: ``sharedkv.Store()`` (shared memory), ``multiprocessing.Manager().dict()``, Redis via
  redis-py (a private ``redis-server`` on 127.0.0.1, skipped if the binary is missing),
  ``diskcache.Cache`` in a temp dir, and raw py-lmdb on /dev/shm (``sync=False,
  metasync=False``) as the floor. Every peer pickles values (Manager does so in its transport,
  the others explicitly with the highest protocol, as sharedkv does).
* Values: a small str, a 10-field dict, 100 KiB of bytes.
* Operations: ``get``, ``set`` (overwrite of an existing key) from one child, and a 90/10 get/set
  mix from two concurrent children (aggregate ops/s).
* In-process ``get``: sharedkv vs a plain ``dict`` guarded by ``threading.Lock``.
* Memory: the shared memory taken by many small keys, and a child's private memory (RssAnon)
  before/after reading every key, against copying a Manager dict.

Timing: ``time.perf_counter_ns`` around batches of B operations (B is the same for every peer
of a value kind and printed with the results); each batch stands for B samples of its mean.
Median and ops/s are therefore exact to within the timer cost (< 1 %); p90/p99 are percentiles
of B-op batch means, which smooth single-op outliers when B > 1. Garbage collection stays on,
as in real programs. Each measurement runs in rounds interleaved across peers (every peer's
round 1, then every peer's round 2, ...): ops/s is the median round, percentiles pool all
rounds, so a burst of other work on the machine does not land on one peer only. Ratios are
sharedkv ops/s divided by the peer's ops/s (> 1: sharedkv faster).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import random
import shlex
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

PROTOCOL = pickle.HIGHEST_PROTOCOL
SHM = Path("/dev/shm")
LMDB_MAP_SIZE = 4 << 30

KINDS = ("str", "dict", "bytes100k")
KIND_LABELS = {"str": "small str", "dict": "10-field dict", "bytes100k": "100 KiB bytes"}
MIXED = "mixed 90/10"
OPS = ("get", "set", MIXED)
SHAREDKV = "sharedkv"
SHAREDKV_UNCACHED = "sharedkv read_cache=0"
MIXED_PROCS = 2
MIXED_WRITE_EVERY = 10  # one set per 10 ops


def make_value(kind: str) -> object:
    """The value stored for a value kind (deterministic)."""
    if kind == "str":
        return "hello world"
    if kind == "dict":
        return {
            "id": 123456,
            "name": "Ada Lovelace",
            "email": "ada@example.org",
            "active": True,
            "score": 98.25,
            "tags": ["math", "engines"],
            "created": "2024-05-01T12:00:00Z",
            "visits": 42,
            "ratio": 0.125,
            "parent": None,
        }
    if kind == "bytes100k":
        return random.Random(0).randbytes(100 * 1024)
    raise ValueError(kind)


def keys_for(kind: str, count: int, seed: int) -> list[str]:
    """The preloaded keys of a value kind, in a seeded random order."""
    keys = [f"bench:{kind}:{i}" for i in range(count)]
    random.Random(seed).shuffle(keys)
    return keys


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and durations; picklable so children get the same plan."""

    duration_s: float  # per round
    rounds: int
    keys: dict[str, int]
    batch: dict[str, int]
    inproc_batch: int
    memory_keys: int
    min_batches: int

    @classmethod
    def full(cls) -> Plan:
        return cls(
            duration_s=0.6,
            rounds=3,
            keys={"str": 10_000, "dict": 10_000, "bytes100k": 1_000},
            batch={"str": 20, "dict": 20, "bytes100k": 4},
            inproc_batch=100,
            memory_keys=1_000_000,
            min_batches=50,
        )

    def time(self, run_batch: Callable[[int], int]) -> h.Samples:
        """Time ``run_batch`` for one round (see ``_harness.time_batches``)."""
        return h.time_batches(run_batch, duration_s=self.duration_s, min_batches=self.min_batches)

    @classmethod
    def quick(cls) -> Plan:
        return replace(
            cls.full(),
            duration_s=0.15,
            rounds=1,
            keys={"str": 1_000, "dict": 1_000, "bytes100k": 100},
            memory_keys=50_000,
            min_batches=20,
        )


# --------------------------------------------------------------------------------------------
# Peers: a picklable spec (sent to children) that opens a get/set client wherever it runs
# --------------------------------------------------------------------------------------------


@dataclass
class Client:
    """A connected peer: ``get(key)`` and ``set(key, value)``, pickling included."""

    get: Callable[[str], Any]
    set: Callable[[str, Any], Any]
    close: Callable[[], None] = lambda: None


class PeerSpec(Protocol):
    name: str

    def connect(self) -> Client: ...


@dataclass
class SharedkvPeer:
    store: Any  # sharedkv.Store; pickling it passes its address to the child
    name: str = SHAREDKV

    def connect(self) -> Client:
        return Client(self.store.get, self.store.set)


@dataclass
class ManagerPeer:
    proxy: Any  # DictProxy; the manager pickles values in its transport
    name: str = "manager.dict"

    def connect(self) -> Client:
        return Client(self.proxy.get, self.proxy.__setitem__)


@dataclass
class RedisPeer:
    host: str
    port: int
    name: str = "redis-py"

    def connect(self) -> Client:
        import redis

        client = redis.Redis(host=self.host, port=self.port)
        loads, dumps, rget, rset = pickle.loads, pickle.dumps, client.get, client.set

        def get(key: str) -> Any:
            return loads(cast(bytes, rget(key)))

        def set_(key: str, value: Any) -> None:
            rset(key, dumps(value, PROTOCOL))

        return Client(get, set_, client.close)


@dataclass
class DiskcachePeer:
    directory: str
    name: str = "diskcache"

    def connect(self) -> Client:
        import diskcache  # type: ignore[import-untyped]

        cache = diskcache.Cache(self.directory)
        loads, dumps, cget, cset = pickle.loads, pickle.dumps, cache.get, cache.set

        # Values go in as pickled bytes, so diskcache stores them raw (no second pickle).
        def get(key: str) -> Any:
            return loads(cget(key))

        def set_(key: str, value: Any) -> None:
            cset(key, dumps(value, PROTOCOL))

        return Client(get, set_, cache.close)


@dataclass
class LmdbPeer:
    path: str
    name: str = "lmdb (raw)"

    def connect(self) -> Client:
        env = open_lmdb(self.path)
        loads, dumps, begin = pickle.loads, pickle.dumps, env.begin

        # The cheapest read: a read-only transaction that py-lmdb aborts when it is dropped.
        def get(key: str) -> Any:
            return loads(begin().get(key.encode()))

        def set_(key: str, value: Any) -> None:
            data = dumps(value, PROTOCOL)
            with begin(write=True) as txn:
                txn.put(key.encode(), data)

        return Client(get, set_, env.close)


def open_lmdb(path: str) -> Any:
    import lmdb

    return lmdb.open(
        path, map_size=LMDB_MAP_SIZE, sync=False, metasync=False, max_readers=256, max_dbs=0
    )


# --------------------------------------------------------------------------------------------
# Setting peers up (parent side); every resource is registered with the ExitStack
# --------------------------------------------------------------------------------------------


def new_sharedkv_store(url: str | None = None) -> Any:
    """``Store()`` is the default shared-memory store, exactly as a user gets it."""
    import sharedkv

    return sharedkv.Store(url)


def store_directory(store: Any) -> Path | None:
    """Where a sharedkv store keeps its files (``Store.path``; None for memory stores)."""
    path = getattr(store, "path", None)
    return Path(path) if path else None


def setup_peers(
    stack: contextlib.ExitStack, wanted: Sequence[str], notes: list[str]
) -> list[PeerSpec]:
    peers: list[PeerSpec] = []
    if SHAREDKV in wanted:
        store = new_sharedkv_store()
        stack.callback(store.close)
        peers.append(SharedkvPeer(store))
    if SHAREDKV_UNCACHED in wanted:
        # The same engine with each process's read cache off: what every read costs when
        # something commits between reads (a store under steady writes).
        import sharedkv

        store = sharedkv.Store(f"shm://bench-kv-uncached-{os.getpid()}", read_cache=0)
        stack.callback(store.close)
        peers.append(SharedkvPeer(store, SHAREDKV_UNCACHED))
    if "manager.dict" in wanted:
        manager = h.SPAWN.Manager()
        stack.callback(manager.shutdown)
        peers.append(ManagerPeer(manager.dict()))
    if "redis-py" in wanted:
        if h.RedisServer.available():
            server = stack.enter_context(h.RedisServer())
            notes.append(
                f"redis-server {server.version} on 127.0.0.1:{server.port}, no persistence"
            )
            peers.append(RedisPeer(server.host, server.port))
        else:
            notes.append("redis-server not found: Redis peer skipped")
    if "diskcache" in wanted:
        directory = make_temp_dir(stack, None, "bench_kv_diskcache_")
        notes.append(f"diskcache in {directory} ({h.filesystem_type(directory)})")
        peers.append(DiskcachePeer(directory))
    if "lmdb (raw)" in wanted:
        peers.append(LmdbPeer(make_temp_dir(stack, SHM, "bench_kv_lmdb_")))
    return peers


def make_temp_dir(stack: contextlib.ExitStack, parent: Path | None, prefix: str) -> str:
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix, dir=parent))
    return str(tmp)


def preload(peer: PeerSpec, plan: Plan) -> None:
    """The parent writes every key; children must then see the parent's data."""
    client = peer.connect()
    try:
        for kind in KINDS:
            value = make_value(kind)
            for key in keys_for(kind, plan.keys[kind], seed=0):
                client.set(key, value)
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# Measurement loops (run in children)
# --------------------------------------------------------------------------------------------


def chunk(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def get_runner(client: Client, batches: list[list[str]]) -> Callable[[int], int]:
    get = client.get
    count = len(batches)

    def run(i: int) -> int:
        batch = batches[i % count]
        for key in batch:
            get(key)
        return len(batch)

    return run


def set_runner(client: Client, batches: list[list[str]], value: object) -> Callable[[int], int]:
    set_ = client.set
    count = len(batches)

    def run(i: int) -> int:
        batch = batches[i % count]
        for key in batch:
            set_(key, value)
        return len(batch)

    return run


def mixed_runner(
    client: Client, batches: list[list[tuple[str, bool]]], value: object
) -> Callable[[int], int]:
    get, set_ = client.get, client.set
    count = len(batches)

    def run(i: int) -> int:
        batch = batches[i % count]
        for key, write in batch:
            if write:
                set_(key, value)
            else:
                get(key)
        return len(batch)

    return run


def check_visible(client: Client, key: str, expected: object, peer: str) -> None:
    got = client.get(key)
    if got != expected:
        raise AssertionError(f"{peer}: child read {got!r:.60} for {key}, expected the parent's")


def child_single(barrier: Any, peer: PeerSpec, plan: Plan) -> list[tuple[str, str, h.Samples]]:
    """get and set of every value kind, one after the other, in this (spawned) child."""
    client = peer.connect()
    out: list[tuple[str, str, h.Samples]] = []
    try:
        barrier.wait()
        for kind in KINDS:
            value = make_value(kind)
            batches = chunk(keys_for(kind, plan.keys[kind], seed=1), plan.batch[kind])
            check_visible(client, batches[0][0], value, peer.name)
            out.append(("get", kind, plan.time(get_runner(client, batches))))
            out.append(("set", kind, plan.time(set_runner(client, batches, value))))
    finally:
        client.close()
    return out


def child_mixed(barrier: Any, peer: PeerSpec, plan: Plan, seed: int) -> list[tuple[str, h.Samples]]:
    """The 90/10 mix for every value kind; all children start each kind together."""
    client = peer.connect()
    out: list[tuple[str, h.Samples]] = []
    try:
        for kind in KINDS:
            value = make_value(kind)
            keys = keys_for(kind, plan.keys[kind], seed=seed)
            ops = [(key, i % MIXED_WRITE_EVERY == 0) for i, key in enumerate(keys)]
            runner = mixed_runner(client, chunk(ops, plan.batch[kind]), value)
            barrier.wait()
            out.append((kind, plan.time(runner)))
    finally:
        client.close()
    return out


# --------------------------------------------------------------------------------------------
# Orchestration (parent)
# --------------------------------------------------------------------------------------------


Key = tuple[str, str, str]  # (peer, op, kind)


def measure_round(peer: PeerSpec, plan: Plan) -> dict[Key, h.Samples]:
    """One round for one peer: get/set from one child, then the mix from two at once."""
    (single,) = h.run_in_children(child_single, [(peer, plan)])
    out = {(peer.name, op, kind): samples for op, kind, samples in single}
    results = h.run_in_children(child_mixed, [(peer, plan, seed) for seed in range(MIXED_PROCS)])
    for index, kind in enumerate(KINDS):
        merged = h.Samples()
        for child in results:
            merged.extend(child[index][1])
        out[(peer.name, MIXED, kind)] = merged
    return out


def measure_peers(peers: Sequence[PeerSpec], plan: Plan) -> list[h.Row]:
    """Every peer, in rounds interleaved across peers; rows summarise all rounds."""
    collected: dict[Key, list[h.Samples]] = {}
    for round_no in range(1, plan.rounds + 1):
        for peer in peers:
            print(f"  round {round_no}/{plan.rounds}: {peer.name}", flush=True)
            for key, samples in measure_round(peer, plan).items():
                collected.setdefault(key, []).append(samples)
    rows = []
    for (name, op, kind), rounds in collected.items():
        procs = MIXED_PROCS if op == MIXED else 1
        stats = h.summarize_rounds(rounds, concurrent=op == MIXED)
        rows.append(h.Row.from_stats(name, op, kind, stats, procs=procs, batch=plan.batch[kind]))
    return rows


def measure_in_process(store: Any, plan: Plan) -> list[h.Row]:
    """get of a small str in the parent: sharedkv (shm and memory://) vs dict + Lock."""
    import sharedkv

    kind = "str"
    value = make_value(kind)
    keys = keys_for(kind, plan.keys[kind], seed=2)
    batches = chunk(keys, plan.inproc_batch)
    plain: dict[str, object] = dict.fromkeys(keys, value)
    lock = threading.Lock()

    def locked_get(key: str) -> object:
        with lock:
            return plain.get(key)

    memory_store = sharedkv.Store("memory://")
    uncached = sharedkv.Store(f"shm://bench-kv-inproc-{os.getpid()}", read_cache=0)
    try:
        for key in keys:
            memory_store.set(key, value)
            uncached.set(key, value)
        candidates = {
            "sharedkv": Client(store.get, store.set),
            SHAREDKV_UNCACHED: Client(uncached.get, uncached.set),
            "sharedkv memory://": Client(memory_store.get, memory_store.set),
            "dict+Lock": Client(locked_get, plain.__setitem__),
        }
        collected: dict[str, list[h.Samples]] = {name: [] for name in candidates}
        for _ in range(plan.rounds):
            for name, client in candidates.items():
                check_visible(client, keys[0], value, name)
                collected[name].append(plan.time(get_runner(client, batches)))
        rows = [
            h.Row.from_stats(
                name, "get in-process", kind, h.summarize_rounds(rounds), batch=plan.inproc_batch
            )
            for name, rounds in collected.items()
        ]
    finally:
        memory_store.close()
        uncached.close()
    return rows


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def memory_keys(count: int) -> Iterable[list[tuple[str, str]]]:
    """1 M small keys in chunks of 10 000 (never all in the parent's memory at once)."""
    for start in range(0, count, 10_000):
        yield [(f"mem:{i}", "hello world") for i in range(start, min(start + 10_000, count))]


def child_read_all_sharedkv(barrier: Any, store: Any, count: int) -> dict[str, int]:
    """Read every key; private memory must not grow (values live in the shared map)."""
    barrier.wait()
    get = store.get
    get("mem:0")
    before = h.rss_breakdown()
    hits = sum(1 for i in range(count) if get(f"mem:{i}") is not None)
    after = h.rss_breakdown()
    return {"hits": hits, **diff_rss(before, after)}


def child_copy_manager(barrier: Any, proxy: Any) -> dict[str, int]:
    """What a Manager user does to read everything cheaply: one copy() into this process."""
    barrier.wait()
    proxy.get("mem:0")
    before = h.rss_breakdown()
    local = proxy.copy()
    after = h.rss_breakdown()
    return {"hits": len(local), **diff_rss(before, after)}


def diff_rss(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {f"{k}_before": v for k, v in before.items()}
    out.update({f"{k}_growth": after[k] - before[k] for k in before})
    return out


@dataclass(frozen=True)
class MemoryReport:
    keys: int
    sharedkv_dir: str | None
    sharedkv_bytes: int | None
    lmdb_bytes: int
    sharedkv_child: dict[str, int]
    manager_child: dict[str, int]


def measure_memory(stack: contextlib.ExitStack, plan: Plan) -> MemoryReport:
    count = plan.memory_keys
    # A fresh named store, so its files hold these keys only; removed on the last close.
    store = new_sharedkv_store(f"shm://bench-kv-memory-{os.getpid()}")
    stack.callback(store.close)
    directory = store_directory(store)
    base = h.dir_usage_bytes(directory) if directory else 0
    for items in memory_keys(count):
        store.set_many(dict(items))
    used = h.dir_usage_bytes(directory) - base if directory else None
    (skv_child,) = h.run_in_children(child_read_all_sharedkv, [(store, count)])

    lmdb_dir = make_temp_dir(stack, SHM, "bench_kv_lmdbmem_")
    env = open_lmdb(lmdb_dir)
    stack.callback(env.close)
    for items in memory_keys(count):
        with env.begin(write=True) as txn:
            for key, value in items:
                txn.put(key.encode(), pickle.dumps(value, PROTOCOL))
    lmdb_used = h.dir_usage_bytes(lmdb_dir)

    manager = h.SPAWN.Manager()
    stack.callback(manager.shutdown)
    proxy = manager.dict()
    for items in memory_keys(count):
        proxy.update(items)
    (mgr_child,) = h.run_in_children(child_copy_manager, [(proxy,)])
    return MemoryReport(
        count, str(directory) if directory else None, used, lmdb_used, skv_child, mgr_child
    )


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def find(rows: Sequence[h.Row], peer: str, op: str, kind: str) -> h.Row | None:
    return next((r for r in rows if (r.peer, r.op, r.kind) == (peer, op, kind)), None)


def ratio(rows: Sequence[h.Row], peer: str, op: str, kind: str, base: str = SHAREDKV) -> float:
    mine, theirs = find(rows, base, op, kind), find(rows, peer, op, kind)
    if mine is None or theirs is None or not theirs.ops_per_s:
        return float("nan")
    return mine.ops_per_s / theirs.ops_per_s


def results_table(rows: Sequence[h.Row]) -> tuple[list[str], list[list[object]]]:
    headers = ["op", "value", "peer", "procs", "p50 us", "p90 us", "p99 us", "ops/s"]
    body: list[list[object]] = [
        [r.op, KIND_LABELS[r.kind], r.peer, r.procs, r.p50_us, r.p90_us, r.p99_us, r.ops_per_s]
        for r in rows
    ]
    return headers, body


def ratio_table(
    rows: Sequence[h.Row], peers: Sequence[str]
) -> tuple[list[str], list[list[object]]]:
    others = [p for p in peers if p != SHAREDKV]
    headers = ["op", "value", *(f"vs {p}" for p in others)]
    body: list[list[object]] = [
        [op, KIND_LABELS[kind], *(round(ratio(rows, p, op, kind), 2) for p in others)]
        for op in OPS
        for kind in KINDS
    ]
    return headers, body


def throughput_table(
    rows: Sequence[h.Row], peers: Sequence[str]
) -> tuple[list[str], list[list[object]]]:
    """ops/s pivoted: one line per (op, value), one column per peer."""
    headers = ["op", "value", *peers]
    body: list[list[object]] = []
    for op in OPS:
        for kind in KINDS:
            found = [find(rows, peer, op, kind) for peer in peers]
            body.append(
                [op, KIND_LABELS[kind], *(r.ops_per_s if r else float("nan") for r in found)]
            )
    return headers, body


def in_process_table(rows: Sequence[h.Row]) -> tuple[list[str], list[list[object]]]:
    headers, body = results_table([r for r in rows if r.op == "get in-process"])
    return headers[2:], [line[2:] for line in body]


def memory_table(mem: MemoryReport) -> tuple[list[str], list[list[object]]]:
    skv, mgr = mem.sharedkv_child, mem.manager_child
    per_key = (mem.sharedkv_bytes or 0) / mem.keys
    headers = ["what", "value"]
    body: list[list[object]] = [
        [f"keys ({'hello world'!r} each)", mem.keys],
        ["keys the child found (sharedkv / Manager copy)", f"{skv['hits']:,} / {mgr['hits']:,}"],
        ["sharedkv shared memory (files on /dev/shm)",
         h.fmt_bytes(mem.sharedkv_bytes) if mem.sharedkv_bytes is not None else "unknown"],
        ["sharedkv bytes per key", round(per_key, 1) if mem.sharedkv_bytes else "unknown"],
        ["raw lmdb, same data (floor)", h.fmt_bytes(mem.lmdb_bytes)],
        ["child reads every sharedkv key: private (RssAnon) growth",
         h.fmt_bytes(skv["RssAnon_growth"])],
        ["child reads every sharedkv key: shared (RssShmem) growth",
         h.fmt_bytes(skv["RssShmem_growth"])],
        ["child copies the Manager dict: private (RssAnon) growth",
         h.fmt_bytes(mgr["RssAnon_growth"])],
    ]  # fmt: skip
    return headers, body


def evaluate_bars(rows: Sequence[h.Row]) -> list[h.Bar]:
    return [
        h.Bar("get small str vs Redis (redis-py)", ratio(rows, "redis-py", "get", "str"), 25),
        h.Bar("get small str vs raw LMDB", ratio(rows, "lmdb (raw)", "get", "str"), 0.7),
        h.Bar("set small str vs Redis (redis-py)", ratio(rows, "redis-py", "set", "str"), 10),
        h.Bar(
            "in-process get vs dict+Lock",
            ratio(rows, "dict+Lock", "get in-process", "str", base="sharedkv"),
            0.2,
        ),
    ]


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("sharedkv", "lmdb", "redis", "hiredis", "diskcache"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def markdown_us(table: str) -> str:
    return table.replace(" us |", " µs |")


def result_command(argv: Sequence[str]) -> str:
    """The command line that reproduces these numbers (output options left out)."""
    keep: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--json", "--markdown"):
            skip_next = True
        elif not arg.startswith(("--json=", "--markdown=", "--check")):
            keep.append(arg)
    return shlex.join([".venv/bin/python", "benchmarks/bench_kv.py", *keep])


@dataclass
class Report:
    machine: dict[str, str]
    versions: dict[str, str]
    command: str
    plan: Plan
    notes: list[str]
    rows: list[h.Row]
    peers: list[str]
    bars: list[h.Bar]
    memory: MemoryReport | None

    def print_text(self) -> None:
        print("\nResults (latency per op; mixed rows: 2 concurrent children, aggregate ops/s)")
        print(h.format_table(*results_table(self.rows)))
        print("\nsharedkv ops/s / peer ops/s  (> 1: sharedkv faster)")
        print(h.format_table(*ratio_table(self.rows, self.peers)))
        if self.memory:
            print("\nMemory")
            print(h.format_table(*memory_table(self.memory)))
        print("\nBars")
        for bar in self.bars:
            print("  " + bar.line())

    def markdown(self) -> str:
        parts = [
            f"Run on {self.machine['date']}: {self.machine['cpu']}, {self.machine['cores']}, "
            f"{self.machine['memory']} RAM, {self.machine['python']}, {self.machine['kernel']}.",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()) + ".",
            f"Command: `{self.command}`",
            "",
            *(f"- {note}" for note in self.notes),
            "",
            "Bars:",
            "",
            *(f"- {bar.line()}" for bar in self.bars),
            "",
            "sharedkv ops/s ÷ peer ops/s (> 1 means sharedkv is faster):",
            "",
            h.format_markdown(*ratio_table(self.rows, self.peers)),
            "",
            "Throughput, ops/s (`mixed 90/10`: two concurrent child processes, aggregate):",
            "",
            h.format_markdown(*throughput_table(self.rows, self.peers)),
            "",
            "In-process `get` of a small str (one thread):",
            "",
            markdown_us(h.format_markdown(*in_process_table(self.rows))),
        ]
        if self.memory:
            parts += ["", "Memory:", "", h.format_markdown(*memory_table(self.memory))]
        parts += [
            "",
            "<details><summary>Latency per operation (p50, p90, p99 in µs) for every row</summary>",
            "",
            markdown_us(h.format_markdown(*results_table(self.rows))),
            "",
            "</details>",
        ]
        return "\n".join(parts) + "\n"

    def json_payload(self) -> dict[str, Any]:
        return {
            "benchmark": "kv",
            "machine": self.machine,
            "versions": self.versions,
            "command": self.command,
            "plan": asdict(self.plan),
            "notes": self.notes,
            "rows": self.rows,
            "bars": [{"name": b.name, "measured": b.measured, "required": b.required,
                      "passed": b.passed} for b in self.bars],
            "memory": self.memory,
        }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

ALL_PEERS = (SHAREDKV, SHAREDKV_UNCACHED, "manager.dict", "redis-py", "diskcache", "lmdb (raw)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; a < 60 s smoke test")
    parser.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown here")
    parser.add_argument(
        "--peers",
        default=",".join(ALL_PEERS),
        help=f"comma-separated subset of: {', '.join(ALL_PEERS)}",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory section")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if a bar fails")
    args = parser.parse_args(argv)
    args.peer_list = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peer_list) - set(ALL_PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    return args


def run(args: argparse.Namespace) -> Report:
    plan = Plan.quick() if args.quick else Plan.full()
    machine = h.machine_info()
    print("Machine")
    h.print_machine(machine)
    load_before = os.getloadavg()[0]  # other work on the machine skews every number
    overhead = h.timer_overhead_ns()
    notes = [
        f"perf_counter_ns costs {overhead:.0f} ns; batches of "
        + ", ".join(f"{plan.batch[k]} ({KIND_LABELS[k]})" for k in KINDS)
        + f", {plan.inproc_batch} in-process",
        f"{plan.rounds} rounds of {plan.duration_s} s per measurement, interleaved across peers"
        " (ops/s: median round; percentiles: all rounds); keys per kind: "
        + ", ".join(f"{plan.keys[k]:,}" for k in KINDS),
    ]
    rows: list[h.Row] = []
    memory = None
    with contextlib.ExitStack() as stack:
        peers = setup_peers(stack, args.peer_list, notes)
        for peer in peers:
            print(f"preloading {peer.name} ...", flush=True)
            preload(peer, plan)
        print("measuring from child processes ...", flush=True)
        rows += measure_peers(peers, plan)
        sharedkv_peer = next((p for p in peers if isinstance(p, SharedkvPeer)), None)
        if sharedkv_peer is not None:
            print("in-process get ...", flush=True)
            rows += measure_in_process(sharedkv_peer.store, plan)
            if not args.no_memory:
                print(f"memory with {plan.memory_keys:,} keys ...", flush=True)
                memory = measure_memory(stack, plan)
    notes.append(
        f"1-min load average: {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after"
    )
    for note in notes:
        print("  note: " + note)
    command = result_command(sys.argv[1:])
    return Report(
        machine, library_versions(), command, plan, notes, rows,
        [p.name for p in peers], evaluate_bars(rows), memory,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    h.raise_keyboard_interrupt_on_sigterm()
    with h.quiet_stderr_on_interrupt():
        report = run(args)
    report.print_text()
    if args.json:
        h.write_json(args.json, report.json_payload())
        print(f"\nwrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(report.markdown())
        print(f"wrote {args.markdown}")
    failed = not all(bar.passed for bar in report.bars)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
