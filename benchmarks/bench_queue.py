"""Queue and origin-API benchmark: sharedkv against multiprocessing.Queue and Redis lists.

Run from the repository root (full run: about two minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_queue.py
    .venv/bin/python benchmarks/bench_queue.py --quick          # smoke test, < 30 s
    .venv/bin/python benchmarks/bench_queue.py --json queue.json --check

What is measured, all in one run on one machine, from SPAWNED CHILD PROCESSES:

* The origin API's cost: ``sharedkv.liteyuki.shared_memory.get/set`` against ``Store.get/set``
  on the same default store, small str values, from one child. Batches of the two alternate,
  so both see the same machine state; the bar compares median batch times.
* Queue throughput between two processes: one producer child puts N items, one consumer child
  gets them; items/s = N / (consumer's last get - producer's first put), both read from the
  system-wide monotonic clock. Each peer runs in several rounds, interleaved with the other
  peers' rounds so that other work on the machine hits them alike; the median round is shown.
  Every peer pickles every item (the small item is a tuple: sharedkv stores a bare int as
  decimal text, which would skip pickling).

  - One item per call: ``Store.queue`` ``put``/``get`` on shared memory, the same on buffered
    handles (``store.queue(name, buffer=BUFFER)``: ``put`` returns before the item is written,
    as with ``multiprocessing.Queue``, and ``get`` takes up to ``BUFFER`` items at once; the
    time runs until the consumer has the last item, so the producer's last flush is in it), the
    same through
    ``sharedkv.liteyuki.Channel``, ``multiprocessing.Queue`` and Redis ``LPUSH``/``BRPOP`` via
    redis-py (a private ``redis-server`` on 127.0.0.1 with ``--save ''``, stopped by pid;
    skipped when the binary is missing).
  - Batches of ``BATCH`` items per call: ``put_many``/``get_many``, Redis ``LPUSH`` with many
    values / ``BLMPOP ... COUNT`` (the blocking form of ``RPOP key count``), and, for reference,
    ``multiprocessing.Queue`` carrying one list per ``put`` (it has no batch API; the batch is
    then one pickle, and a consumer takes the whole list or nothing).

* Queue latency between two processes: ping-pong over two queues, one item per call; one-way
  latency is half a round trip. p50/p99 are of single round trips.

Ratios are sharedkv ops/s divided by the peer's (> 1: sharedkv faster), for each sharedkv row
of each group of rows with the same operation and item.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

SHAREDKV = "sharedkv queue"
SHAREDKV_BATCH = "sharedkv put_many/get_many"
CHANNEL = "sharedkv Channel"
MPQUEUE = "multiprocessing.Queue"
MPQUEUE_LISTS = "multiprocessing.Queue, a list per put"
REDIS = "redis LPUSH/BRPOP"
REDIS_BATCH = "redis LPUSH many/BLMPOP COUNT"
STOP = ("stop", -1)  # the ping-pong end marker
SIZES: dict[str, Any] = {"small": ("job", 7), "1 KiB": b"x" * 1024}
BATCH = 100  # items per put_many/get_many (and per list, per LPUSH, per BLMPOP)
BUFFER = 100  # the buffer of the buffered handles: items held back on each side
SHAREDKV_BUFFERED = f"sharedkv queue, buffer={BUFFER}"
PER_ITEM = "put->get throughput"
BATCHED = f"put->get throughput, batches of {BATCH}"


@dataclass(frozen=True)
class Plan:
    kv_duration_s: float
    kv_rounds: int
    kv_batch: int
    items: int  # per throughput run (a multiple of BATCH)
    rounds: int  # throughput runs per peer and size, interleaved across peers
    round_trips: int
    sizes: tuple[str, ...]

    @classmethod
    def full(cls) -> Plan:
        return cls(
            kv_duration_s=0.5,
            kv_rounds=3,
            kv_batch=100,
            items=50_000,
            rounds=3,
            round_trips=3_000,
            sizes=("small", "1 KiB"),
        )

    @classmethod
    def quick(cls) -> Plan:
        return replace(
            cls.full(), kv_duration_s=0.1, kv_rounds=2, items=5_000, rounds=1, round_trips=300,
            sizes=("small",),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# shared_memory vs Store, from a child
# --------------------------------------------------------------------------------------------


def _timed(op: Callable[[], Any], batch: int, samples: h.Samples) -> None:
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(batch):
        op()
    elapsed = clock() - t0
    samples.mean_ns.append(elapsed / batch)
    samples.batch_ops.append(batch)
    samples.ops += batch
    samples.busy_ns += elapsed


def _kv_child(barrier: Any, plan: Plan) -> dict[str, h.Stats]:
    import sharedkv
    from sharedkv.liteyuki import shared_memory

    store = sharedkv.Store()  # the default store, found through the environment
    key, value = "bench:kv", "hello world"
    store.set(key, value)
    pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "get": (lambda: shared_memory.get(key), lambda: store.get(key)),
        "set": (lambda: shared_memory.set(key, value), lambda: store.set(key, value)),
    }
    out: dict[str, h.Stats] = {}
    barrier.wait()
    for op, (facade, direct) in pairs.items():
        # Batches of the two alternate (in both orders), so both see the same machine state.
        for _ in range(20):  # warm-up
            facade()
            direct()
        ours, theirs = h.Samples(), h.Samples()
        deadline = time.monotonic() + plan.kv_duration_s * plan.kv_rounds
        i = 0
        while time.monotonic() < deadline or i < 40:
            if i % 2:
                _timed(facade, plan.kv_batch, ours)
                _timed(direct, plan.kv_batch, theirs)
            else:
                _timed(direct, plan.kv_batch, theirs)
                _timed(facade, plan.kv_batch, ours)
            i += 1
        out[f"shared_memory.{op}"] = h.summarize(ours)
        out[f"Store.{op}"] = h.summarize(theirs)
    store.close()
    return out


def measure_kv(plan: Plan) -> list[h.Row]:
    (results,) = h.run_in_children(_kv_child, [(plan,)])
    rows = []
    for label, stats in results.items():
        peer, op = label.split(".")
        rows.append(h.Row.from_stats(peer, op, "small str", stats, batch=plan.kv_batch))
    return rows


# --------------------------------------------------------------------------------------------
# Queue peers: picklable specs that open an endpoint (put, get) wherever they run
# --------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    put: Callable[[Any], Any]
    get: Callable[[], Any]
    close: Callable[[], None] = lambda: None
    # The peer's batch form, for the batched rows: put a list of items, get up to n of them.
    put_many: Callable[[list[Any]], Any] | None = None
    get_many: Callable[[int], list[Any]] | None = None


@dataclass
class SharedkvSpec:
    url: str
    prefix: str
    name: str = SHAREDKV
    batch: int = 1
    buffer: int = 0

    def connect(self, which: str) -> Endpoint:
        import sharedkv

        store = sharedkv.Store(self.url)
        q = store.queue(f"{self.prefix}-{which}", buffer=self.buffer)
        return Endpoint(
            q.put,
            lambda: q.get(timeout=60),
            store.close,
            q.put_many,
            lambda n: q.get_many(n, timeout=60),
        )


@dataclass
class ChannelSpec:
    url: str
    prefix: str
    name: str = CHANNEL
    batch: int = 1

    def connect(self, which: str) -> Endpoint:
        from sharedkv.liteyuki import Channel, get_channel

        name = f"{self.prefix}-{which}"
        try:
            chan: Channel[Any] = Channel(name, store=self.url)
        except ValueError:  # already made in this process
            chan = get_channel(name)
        return Endpoint(chan.send, lambda: chan.receive(timeout=60))


@dataclass
class MpQueueSpec:
    queues: dict[str, Any]  # multiprocessing.Queue, inherited by the children
    name: str = MPQUEUE
    batch: int = 1

    def connect(self, which: str) -> Endpoint:
        q = self.queues[which]
        get = partial(q.get, timeout=60)
        # No batch API: the batched form sends each batch as one list, taken whole.
        return Endpoint(q.put, get, put_many=q.put, get_many=lambda n: get())


@dataclass
class RedisSpec:
    host: str
    port: int
    prefix: str
    name: str = REDIS
    batch: int = 1

    def connect(self, which: str) -> Endpoint:
        import redis

        client = redis.Redis(host=self.host, port=self.port)
        key = f"{self.prefix}-{which}"
        dumps, loads, protocol = pickle.dumps, pickle.loads, pickle.HIGHEST_PROTOCOL

        def get() -> Any:
            popped: Any = client.brpop([key], timeout=60)
            if popped is None:
                raise TimeoutError("nothing arrived in 60 s")
            return loads(popped[1])

        def put_many(items: list[Any]) -> None:
            client.lpush(key, *[dumps(item, protocol) for item in items])

        def get_many(n: int) -> list[Any]:
            # LPUSH adds at the head, so the oldest items are at the tail (RIGHT).
            popped: Any = client.blmpop(60, 1, key, direction="RIGHT", count=n)
            if popped is None:
                raise TimeoutError("nothing arrived in 60 s")
            return [loads(raw) for raw in popped[1]]

        return Endpoint(
            lambda item: client.lpush(key, dumps(item, protocol)),
            get,
            client.close,
            put_many,
            get_many,
        )


# --------------------------------------------------------------------------------------------
# Throughput and latency between two processes
# --------------------------------------------------------------------------------------------


def _produce(barrier: Any, spec: Any, count: int, item: Any) -> float:
    end = spec.connect("a")
    put, put_many = end.put, end.put_many
    # Distinct objects, as real items would be: a list of one object repeated would let
    # pickle send references to its first copy.
    batch = [pickle.loads(pickle.dumps(item)) for _ in range(spec.batch)]
    barrier.wait()
    start = time.perf_counter()
    if spec.batch == 1:
        for _ in range(count):
            put(item)
    else:
        assert put_many is not None
        for _ in range(count // spec.batch):
            put_many(batch)
    end.close()
    return start


def _consume(barrier: Any, spec: Any, count: int) -> float:
    end = spec.connect("a")
    get, get_many = end.get, end.get_many
    barrier.wait()
    if spec.batch == 1:
        for _ in range(count):
            get()
    else:
        assert get_many is not None
        got = 0
        while got < count:
            got += len(get_many(spec.batch))
    done = time.perf_counter()
    end.close()
    return done


def throughput_round(spec: Any, plan: Plan, size: str) -> float:
    """Items per second through the queue of ``spec``, in one run of two children."""
    start, done = h.run_in_children(
        _pair_child,
        [("producer", spec, plan.items, SIZES[size]), ("consumer", spec, plan.items, None)],
        timeout_s=600,
    )
    return float(plan.items / (done - start))


def measure_throughput(specs: Sequence[Any], plan: Plan, size: str) -> list[h.Row]:
    """The median of ``plan.rounds`` rounds per spec; round r of every spec runs before round
    r + 1 of any, so a disturbance of the machine falls on all of them alike."""
    rates: dict[str, list[float]] = {spec.name: [] for spec in specs}
    for round_no in range(1, plan.rounds + 1):
        for spec in specs:
            print(f"{spec.name}: throughput, {size} items, round {round_no}: ", end="", flush=True)
            rates[spec.name].append(throughput_round(spec, plan, size))
            print(f"{rates[spec.name][-1]:,.0f} items/s", flush=True)
    nan = math.nan
    return [
        h.Row(
            spec.name,
            PER_ITEM if spec.batch == 1 else BATCHED,
            size,
            nan,
            nan,
            nan,
            round(statistics.median(rates[spec.name]), 1),
            procs=2,
            batch=spec.batch,
        )
        for spec in specs
    ]


def _pair_child(barrier: Any, role: str, spec: Any, count: int, item: Any) -> float:
    if role == "producer":
        return _produce(barrier, spec, count, item)
    return _consume(barrier, spec, count)


def _ping(barrier: Any, spec: Any, rounds: int) -> list[int]:
    a, b = spec.connect("a"), spec.connect("b")
    barrier.wait()
    for i in range(min(200, rounds)):  # warm-up: connections, caches, wake-up registration
        a.put(("job", i))
        b.get()
    clock = time.perf_counter_ns
    samples = []
    for i in range(rounds):
        t0 = clock()
        a.put(("job", i))
        b.get()
        samples.append(clock() - t0)
    a.put(STOP)
    a.close()
    b.close()
    return samples


def _pong(barrier: Any, spec: Any) -> list[int]:
    a, b = spec.connect("a"), spec.connect("b")
    barrier.wait()
    while (item := a.get()) != STOP:
        b.put(item)
    a.close()
    b.close()
    return []


def _latency_child(barrier: Any, role: str, spec: Any, rounds: int) -> list[int]:
    return _ping(barrier, spec, rounds) if role == "ping" else _pong(barrier, spec)


def measure_latency(spec: Any, plan: Plan) -> h.Row:
    samples, _ = h.run_in_children(
        _latency_child, [("ping", spec, plan.round_trips), ("pong", spec, 0)], timeout_s=600
    )
    one_way = [s / 2 for s in samples]
    p50, p90, p99 = h.weighted_percentiles(one_way, [1] * len(one_way), (50, 90, 99))
    stats = h.Stats(p50 / 1e3, p90 / 1e3, p99 / 1e3, 1e9 / (sum(one_way) / len(one_way)), 0)
    return h.Row.from_stats(spec.name, "one-way latency", "small", stats, procs=2)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def find(rows: Sequence[h.Row], peer: str, op: str, kind: str) -> float:
    for row in rows:
        if (row.peer, row.op, row.kind) == (peer, op, kind):
            return row.ops_per_s
    return math.nan


def p50(rows: Sequence[h.Row], peer: str, op: str, kind: str) -> float:
    for row in rows:
        if (row.peer, row.op, row.kind) == (peer, op, kind):
            return row.p50_us
    return math.nan


def evaluate_bars(rows: Sequence[h.Row]) -> list[h.Bar]:
    # The facade's bars compare median batch times (robust to a busy machine's spikes):
    # Store p50 / shared_memory p50, so >= 1/1.2 means "at most 1.2x slower".
    mp_queue = find(rows, MPQUEUE, PER_ITEM, "small")
    return [
        h.Bar(
            "shared_memory.get vs Store.get, from a child (within 1.2x, by p50)",
            p50(rows, "Store", "get", "small str") / p50(rows, "shared_memory", "get", "small str"),
            round(1 / 1.2, 3),
        ),
        h.Bar(
            "shared_memory.set vs Store.set, from a child (within 1.2x, by p50)",
            p50(rows, "Store", "set", "small str") / p50(rows, "shared_memory", "set", "small str"),
            round(1 / 1.2, 3),
        ),
        h.Bar(
            "queue throughput, small items, put/get vs multiprocessing.Queue",
            find(rows, SHAREDKV, PER_ITEM, "small") / mp_queue,
            2.0,
        ),
        h.Bar(
            f"queue throughput, small items, put/get on buffered handles (buffer={BUFFER}) "
            "vs multiprocessing.Queue",
            find(rows, SHAREDKV_BUFFERED, PER_ITEM, "small") / mp_queue,
            2.0,
        ),
        h.Bar(
            f"queue throughput, small items, put_many/get_many ({BATCH} per call) "
            "vs multiprocessing.Queue put/get",
            find(rows, SHAREDKV_BATCH, BATCHED, "small") / mp_queue,
            2.0,
        ),
    ]


def ratio_lines(rows: Sequence[h.Row]) -> list[str]:
    """sharedkv against each other peer of the same operation and item."""
    lines = []
    for row in rows:
        if row.peer.startswith("sharedkv") or row.peer in ("Store", "shared_memory"):
            continue
        group = (row.op, row.kind)
        for mine in rows:
            if not mine.peer.startswith("sharedkv") or (mine.op, mine.kind) != group:
                continue
            if row.op == "one-way latency":
                lines.append(
                    f"  one-way latency p50: {row.peer} {row.p50_us:.1f} us / {mine.peer} "
                    f"{mine.p50_us:.1f} us = {row.p50_us / mine.p50_us:.2f}x (> 1: sharedkv faster)"
                )
            else:
                lines.append(
                    f"  {row.op}, {row.kind}: {mine.peer} / {row.peer} = "
                    f"{mine.ops_per_s / row.ops_per_s:.2f}x"
                )
    return lines


def print_report(rows: Sequence[h.Row], bars: Sequence[h.Bar], notes: Sequence[str]) -> None:
    headers = ["peer", "op", "item", "p50 us", "p99 us", "ops/s", "procs"]
    table = [[r.peer, r.op, r.kind, r.p50_us, r.p99_us, r.ops_per_s, r.procs] for r in rows]
    print("\nResults")
    print(h.format_table(headers, table))
    print("\nRatios")
    print("\n".join(ratio_lines(rows)))
    print("\nBars")
    for bar in bars:
        print("  " + bar.line())
    for note in notes:
        print("  note: " + note)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; a < 30 s smoke test")
    parser.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis peer")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if a bar fails")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[list[h.Row], list[h.Bar], list[str]]:
    import sharedkv

    plan = Plan.quick() if args.quick else Plan.full()
    machine = h.machine_info()
    print("Machine")
    h.print_machine(machine)
    load_before = os.getloadavg()[0]
    notes = [
        f"{plan.items:,} items per throughput run, median of {plan.rounds} interleaved "
        f"round(s); {plan.round_trips:,} round trips per latency run; shared_memory/Store: "
        f"alternating batches of {plan.kv_batch} for {plan.kv_rounds * plan.kv_duration_s:g} s "
        "per op"
    ]
    rows: list[h.Row] = []
    run_id = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        default = sharedkv.Store()  # the tree's default store: children find it in the env
        stack.callback(default.close)
        qstore = sharedkv.Store(f"shm://bench-q-{run_id}")
        stack.callback(qstore.close)

        print("\nshared_memory vs Store, from a child ...", flush=True)
        rows += measure_kv(plan)

        mp_queues = {"a": h.SPAWN.Queue(), "b": h.SPAWN.Queue()}
        specs: list[Any] = [
            SharedkvSpec(qstore.url, f"q-{run_id}"),
            SharedkvSpec(qstore.url, f"qbuf-{run_id}", SHAREDKV_BUFFERED, buffer=BUFFER),
            ChannelSpec(qstore.url, f"c-{run_id}"),
            MpQueueSpec(mp_queues),
            SharedkvSpec(qstore.url, f"qb-{run_id}", SHAREDKV_BATCH, BATCH),
            MpQueueSpec(mp_queues, MPQUEUE_LISTS, BATCH),
        ]
        if args.no_redis:
            notes.append("Redis skipped (--no-redis)")
        elif not h.RedisServer.available():
            notes.append("Redis skipped: no redis-server binary")
        else:
            server = stack.enter_context(h.RedisServer())
            specs.insert(4, RedisSpec(server.host, server.port, f"r-{run_id}"))
            specs.append(RedisSpec(server.host, server.port, f"rb-{run_id}", REDIS_BATCH, BATCH))
            notes.append(f"redis-server {server.version} on 127.0.0.1:{server.port}, --save ''")
        for size in plan.sizes:
            rows += measure_throughput(specs, plan, size)
        for spec in specs:
            if spec.batch == 1:
                print(f"{spec.name}: latency ...", flush=True)
                rows.append(measure_latency(spec, plan))
    notes.append(
        f"1-min load average: {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after"
    )
    return rows, evaluate_bars(rows), notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    h.raise_keyboard_interrupt_on_sigterm()
    with h.quiet_stderr_on_interrupt():
        rows, bars, notes = run(args)
    print_report(rows, bars, notes)
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "queue",
                "machine": h.machine_info(),
                "command": shlex.join(["python", *sys.argv]),
                "rows": rows,
                "bars": [dict(asdict(b), passed=b.passed) for b in bars],
                "notes": notes,
            },
        )
        print(f"\nwrote {args.json}")
    failed = not all(bar.passed for bar in bars)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
