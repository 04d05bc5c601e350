"""Publish/subscribe benchmark: sharedkv against Redis (redis-py), process to process.

Run from the repository root (full run: about 2 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_pubsub.py
    .venv/bin/python benchmarks/bench_pubsub.py --quick              # smoke test, < 60 s
    .venv/bin/python benchmarks/bench_pubsub.py --json pubsub.json --markdown pubsub.md

Peers, all measured in one run, always with the publisher in one spawned process and the
subscriber in another (never the parent):

* ``sharedkv``: a named shared-memory store (``shm://bench-pubsub-<pid>``), ``Store.publish``;
  the subscriber uses ``@store.on_message`` (callback on the ``sharedkv-callbacks`` thread) or
  ``store.subscribe(...).get(timeout=...)`` (blocking get in the main thread);
* ``redis-py``: Redis PUBLISH/SUBSCRIBE through redis-py (hiredis parser) on a private
  ``redis-server`` started for this run (127.0.0.1, free port, ``--save ''``, no AOF) and stopped
  by pid at the end, also on Ctrl-C. Callback mode is ``pubsub.run_in_thread`` with a handler,
  get mode is ``pubsub.get_message(timeout=...)``. Values are pickled and unpickled by the script
  (highest protocol), exactly as sharedkv pickles them;
* ``unix datagram``: the floor. A pickled value sent with ``sendto`` on an ``AF_UNIX`` datagram
  socket and read with a blocking ``recv``: what one kernel wake-up and two pickle calls cost on
  this machine, with no store at all.

What is measured:

1. Latency, publish to delivery, for 32 B, 1 KiB and 64 KiB payloads (``bytes``). Method:
   one-way, with the send time in the message. The publisher reads ``time.perf_counter_ns()``
   and publishes ``(t_sent, index, payload)``; the subscriber reads the clock again once the
   value is unpickled (at the start of the callback, or when ``get`` returns) and records the
   difference. On Linux ``perf_counter_ns`` is ``CLOCK_MONOTONIC``, one clock for the whole
   machine, so the two readings compare across processes without any offset. One-way timing
   was chosen over a ping-pong round trip / 2 because it measures exactly the path a user sees
   (publish call, pickling, delivery, unpickling, callback dispatch) and does not assume both
   directions cost the same. Messages are paced (``time.sleep(1 ms)`` between publishes), so
   every message finds the subscriber asleep: this is the latency of a sporadic message, never
   a queueing delay. The first 20 messages of each run are warm-up and not counted. The full
   run takes 2000 samples per row in two rounds of 1000, every peer once per round.
2. Throughput to one subscriber in another process: the publisher publishes N messages
   (32 B and 1 KiB) as fast as it can, the subscriber counts what it receives. sharedkv's
   bounded per-channel buffer may drop the oldest messages of a slow subscriber; the
   subscriber then receives a ``Gap`` and the script counts its messages as dropped (for Redis,
   dropped = published - delivered). Delivered msgs/s = delivered / (time of the last delivery -
   time of the first publish), both read on the same monotonic clock. A ``redis-py pipeline``
   row (100 PUBLISH per round trip) is shown for context only; the bar uses plain ``publish``.
   The full run measures every row twice, interleaved, and keeps the better run of each (the
   one least disturbed by other work on the machine; both runs are in the JSON output).
3. ``publish`` with no subscriber (in the parent; batches of 200 calls, so each sample is a
   batch mean): with no subscriber anywhere, with a subscriber on another channel, and the
   backend call alone (no pickling), plus redis-py's ``publish`` for reference.
4. CPU time of an idle subscriber process over 2 s (one process per row, all idle at the same
   time): the parent reads ``utime + stime`` from ``/proc/<pid>/stat`` (clock ticks) and the
   run time of every thread from ``/proc/<pid>/task/*/schedstat`` (nanoseconds) before and
   after the window.

Every number depends on the machine and on what else runs on it: the script prints the 1-minute
load average before and after each section. Peers are interleaved (for each payload size:
sharedkv, then Redis, then the floor) so that a change of load touches them alike.

Bars (printed as PASS/FAIL, checked by ``--check``): sharedkv publish-to-callback p50 <= 100 us
and >= 3x lower than Redis via redis-py (each payload size), and delivered msgs/s >= 5x Redis via
redis-py (32 B). The ``get`` rows are held to the same latency numbers as targets of our own,
printed as met/missed apart from the bars.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

PROTOCOL = pickle.HIGHEST_PROTOCOL
CHANNEL = "bench.pubsub"
SHAREDKV, REDIS, FLOOR = "sharedkv", "redis-py", "unix datagram"
REDIS_PIPELINE = "redis-py pipeline"
CALLBACK, GET = "callback", "get"
WARMUP_MSGS = 20
P50_LIMIT_US = 100.0
LATENCY_RATIO = 3.0
THROUGHPUT_RATIO = 5.0
REDIS_SLEEP_S = 1.0  # run_in_thread's get_message timeout: how long its thread blocks at a time
SIZE_LABELS = {32: "32 B", 1024: "1 KiB", 65536: "64 KiB"}


def size_label(size: int) -> str:
    return SIZE_LABELS.get(size, f"{size} B")


def now_ns() -> int:
    return time.perf_counter_ns()


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    latency_msgs: int  # timed messages per latency row, over all rounds
    rounds: int  # latency runs per row, interleaved with the other peers'
    pace_s: float  # sleep between two latency messages
    latency_sizes: tuple[int, ...]
    throughput_msgs: int
    throughput_sizes: tuple[int, ...]
    publish_s: float  # duration of each no-subscriber publish measurement
    publish_batch: int
    idle_s: float
    child_timeout_s: float

    @classmethod
    def full(cls) -> Plan:
        return cls(
            latency_msgs=2000,
            rounds=2,
            pace_s=0.001,
            latency_sizes=(32, 1024, 65536),
            throughput_msgs=40_000,
            throughput_sizes=(32, 1024),
            publish_s=1.0,
            publish_batch=200,
            idle_s=2.0,
            child_timeout_s=120.0,
        )

    @classmethod
    def quick(cls) -> Plan:
        return replace(cls.full(), latency_msgs=300, rounds=1, throughput_msgs=5_000, publish_s=0.3)


@dataclass(frozen=True)
class Result:
    """One machine-readable number: the ``rows`` of ``--json`` output."""

    peer: str
    benchmark: str
    metric: str
    value: float
    unit: str


@dataclass(frozen=True)
class Verdict:
    name: str
    passed: bool | None  # None: not measured
    detail: str

    def line(self, words: tuple[str, str] = ("PASS", "FAIL")) -> str:
        tag = {True: words[0], False: words[1], None: "N/A "}[self.passed]
        return f"[{tag}] {self.name}: {self.detail}"


TARGET_WORDS = ("met ", "miss")  # a target of our own is not a bar: it is met or missed


@dataclass
class Report:
    machine: dict[str, str]
    versions: dict[str, str]
    command: str
    plan: Plan
    notes: list[str] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    throughput: list[ThroughputRow] = field(default_factory=list)  # best run per row
    throughput_runs: list[ThroughputRow] = field(default_factory=list)  # every run
    publish: list[PublishRow] = field(default_factory=list)
    idle: list[IdleRow] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)  # the bars
    targets: list[Verdict] = field(default_factory=list)  # our own, for get()


@dataclass(frozen=True)
class LatencyRow:
    peer: str
    mode: str
    size: int
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    received: int
    lost: int


@dataclass(frozen=True)
class ThroughputRow:
    peer: str
    size: int
    published: int
    published_per_s: float
    delivered: int
    dropped: int
    delivered_per_s: float


@dataclass(frozen=True)
class PublishRow:
    peer: str
    case: str
    p50_us: float
    p99_us: float
    ops_per_s: float


@dataclass(frozen=True)
class IdleRow:
    peer: str
    setup: str
    cpu_ms_stat: float  # utime + stime, clock-tick resolution
    cpu_ms_sched: float  # sum of per-thread run time, ns resolution
    threads: int
    window_s: float


# --------------------------------------------------------------------------------------------
# Peers: a picklable spec that opens a publisher or a subscriber wherever it runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """Where a peer lives: ``address`` is a store URL, ``host:port``, or a socket address."""

    peer: str
    address: str


Publish = Callable[[Any], object]


@contextlib.contextmanager
def open_publisher(spec: Spec) -> Iterator[Publish]:
    """A function publishing one value to CHANNEL (pickling included)."""
    if spec.peer == SHAREDKV:
        import sharedkv

        store = sharedkv.Store(spec.address)
        try:
            publish = store.publish
            yield lambda data: publish(CHANNEL, data)
        finally:
            store.close()
    elif spec.peer in (REDIS, REDIS_PIPELINE):
        import redis

        host, port = spec.address.rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port))
        try:
            rpublish, dumps = client.publish, pickle.dumps
            yield lambda data: rpublish(CHANNEL, dumps(data, PROTOCOL))
        finally:
            client.close()
    elif spec.peer == FLOOR:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sendto, dumps, addr = sock.sendto, pickle.dumps, spec.address.encode()
            yield lambda data: sendto(dumps(data, PROTOCOL), addr)
        finally:
            sock.close()
    else:
        raise ValueError(spec.peer)


# A subscriber hands each delivery to ``on_event(kind, value)``: ("data", unpickled value) or
# ("gap", number of messages lost). ``wait(timeout)`` blocks for the next event in get mode.
OnEvent = Callable[[str, Any], None]


class Subscriber:
    """One subscription of a peer, in callback mode (events pushed) or get mode (``next``)."""

    def __init__(self, spec: Spec, on_event: OnEvent | None) -> None:
        self.spec = spec
        self._closers: list[Callable[[], None]] = []
        self.next: Callable[[float], tuple[str, Any]] = self._no_get
        try:
            if spec.peer == SHAREDKV:
                self._open_sharedkv(on_event)
            elif spec.peer == REDIS:
                self._open_redis(on_event)
            elif spec.peer == FLOOR:
                if on_event is not None:
                    raise ValueError("the datagram floor has no callback mode")
                self._open_floor()
            else:
                raise ValueError(spec.peer)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _no_get(timeout: float) -> tuple[str, Any]:
        raise RuntimeError("this subscriber delivers through its callback")

    def _open_sharedkv(self, on_event: OnEvent | None) -> None:
        import sharedkv

        store = sharedkv.Store(self.spec.address)
        self._closers.append(store.close)
        if on_event is not None:
            emit = on_event

            def callback(message: sharedkv.Message) -> None:
                emit("data", message.data)

            store.on_message(CHANNEL)(callback)
            return
        sub = store.subscribe(CHANNEL)
        self._closers.insert(0, sub.close)
        get, gap_type, timeout_error = sub.get, sharedkv.Gap, sharedkv.TimeoutError

        def next_event(timeout: float) -> tuple[str, Any]:
            try:
                event = get(timeout=timeout)
            except timeout_error:
                return ("timeout", None)
            if isinstance(event, gap_type):
                return ("gap", event.count)
            return ("data", event.data)

        self.next = next_event

    def _open_redis(self, on_event: OnEvent | None) -> None:
        import redis

        host, port = self.spec.address.rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port))
        self._closers.append(client.close)
        pubsub: Any = client.pubsub()  # type: ignore[no-untyped-call]
        loads = pickle.loads
        if on_event is not None:
            emit = on_event

            def handler(message: dict[str, Any]) -> None:
                emit("data", loads(message["data"]))

            pubsub.subscribe(**{CHANNEL: handler})
            _wait_subscribed(pubsub)
            thread = pubsub.run_in_thread(
                sleep_time=REDIS_SLEEP_S, daemon=True, exception_handler=_ignore_worker_error
            )

            def stop_thread() -> None:
                thread.stop()
                thread.join(timeout=REDIS_SLEEP_S + 2)  # the thread closes the pubsub itself

            self._closers.insert(0, stop_thread)
            return
        pubsub.subscribe(CHANNEL)
        _wait_subscribed(pubsub)
        self._closers.insert(0, pubsub.close)
        get_message = pubsub.get_message

        def next_event(timeout: float) -> tuple[str, Any]:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    message = get_message(timeout=max(0.0, deadline - time.monotonic()))
                except redis.ConnectionError:
                    return ("closed", None)  # e.g. the server cut a subscriber that fell behind
                if message is not None and message.get("type") == "message":
                    return ("data", loads(message["data"]))
                if time.monotonic() >= deadline:
                    return ("timeout", None)

        self.next = next_event

    def _open_floor(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._closers.append(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(self.spec.address.encode())
        recv, loads = sock.recv, pickle.loads

        def next_event(timeout: float) -> tuple[str, Any]:
            sock.settimeout(timeout)
            try:
                return ("data", loads(recv(1 << 18)))
            except TimeoutError:
                return ("timeout", None)

        self.next = next_event

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for close in closers:
            with contextlib.suppress(Exception):
                close()


def _wait_subscribed(pubsub: Any, timeout_s: float = 10.0) -> None:
    """Read redis-py's subscribe confirmation, so no message published after this is missed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message.get("type") == "subscribe":
            return
    raise TimeoutError("Redis did not confirm the subscription")


def _ignore_worker_error(exc: BaseException, pubsub: Any, thread: Any) -> None:
    thread.stop()


# --------------------------------------------------------------------------------------------
# Child processes (spawned; each gets the barrier from _harness.run_in_children first)
# --------------------------------------------------------------------------------------------


def latency_subscriber(
    barrier: Any, spec: Spec, mode: str, expected: int, timeout_s: float
) -> tuple[list[int], int]:
    """Receive until the end marker; returns (one-way latencies in ns, gap count)."""
    latencies: list[int] = []
    lost = [0]
    done = threading.Event()
    clock = now_ns

    def on_event(kind: str, value: Any) -> None:
        t = clock()
        if kind == "gap":
            lost[0] += int(value)
        elif value is None:
            done.set()
        elif value[1] >= WARMUP_MSGS:
            latencies.append(t - value[0])

    if mode == CALLBACK:
        sub = Subscriber(spec, on_event)
        try:
            barrier.wait()
            done.wait(timeout_s)
        finally:
            sub.close()
    else:
        sub = Subscriber(spec, None)
        try:
            barrier.wait()
            deadline = time.monotonic() + timeout_s
            while not done.is_set() and time.monotonic() < deadline:
                kind, value = sub.next(min(5.0, timeout_s))
                if kind in ("timeout", "closed"):
                    break
                on_event(kind, value)
        finally:
            sub.close()
    return latencies, lost[0]


def latency_publisher(barrier: Any, spec: Spec, count: int, size: int, pace_s: float) -> int:
    payload = b"\x01" * size
    clock, sleep = now_ns, time.sleep
    with open_publisher(spec) as publish:
        barrier.wait()
        sleep(0.05)  # let the subscriber reach its wait
        for i in range(count + WARMUP_MSGS):
            publish((clock(), i, payload))
            sleep(pace_s)
        publish(None)
    return count


def throughput_subscriber(barrier: Any, spec: Spec, timeout_s: float) -> dict[str, Any]:
    sub = Subscriber(spec, None)
    delivered = dropped = 0
    last = 0
    status = "ok"
    clock = now_ns
    try:
        nxt = sub.next
        barrier.wait()
        while True:
            kind, value = nxt(timeout_s)
            if kind == "data":
                if value is None:
                    break
                delivered += 1
                last = clock()
            elif kind == "gap":
                dropped += int(value)
            else:
                status = kind
                break
    finally:
        sub.close()
    return {"delivered": delivered, "dropped": dropped, "last_ns": last, "status": status}


def throughput_publisher(barrier: Any, spec: Spec, count: int, size: int) -> dict[str, int]:
    payload = b"\x01" * size
    clock = now_ns
    if spec.peer == REDIS_PIPELINE:
        import redis

        host, port = spec.address.rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port))
        try:
            pipe = client.pipeline(transaction=False)
            dumps = pickle.dumps
            barrier.wait()
            time.sleep(0.05)
            start = clock()
            for i in range(count):
                pipe.publish(CHANNEL, dumps((i, payload), PROTOCOL))
                if i % 100 == 99:
                    pipe.execute()
            pipe.execute()
            end = clock()
            client.publish(CHANNEL, dumps(None, PROTOCOL))
        finally:
            client.close()
        return {"start_ns": start, "end_ns": end}
    with open_publisher(spec) as publish:
        barrier.wait()
        time.sleep(0.05)
        start = clock()
        for i in range(count):
            publish((i, payload))
        end = clock()
        publish(None)
    return {"start_ns": start, "end_ns": end}


def pubsub_child(barrier: Any, role: str, *args: Any) -> Any:
    """Entry point of every benchmark child: dispatch on ``role``."""
    roles: dict[str, Callable[..., Any]] = {
        "latency-sub": latency_subscriber,
        "latency-pub": latency_publisher,
        "throughput-sub": throughput_subscriber,
        "throughput-pub": throughput_publisher,
    }
    return roles[role](barrier, *args)


def idle_child(spec: Spec, mode: str, ready: Any, stop: Any) -> None:
    """Subscribe (callback or get mode) and sit idle until told to stop."""

    def on_event(kind: str, value: Any) -> None:
        pass

    if mode == CALLBACK:
        sub = Subscriber(spec, on_event)
        try:
            ready.set()
            stop.wait(120)
        finally:
            sub.close()
        return
    sub = Subscriber(spec, None)
    try:
        ready.set()
        while not stop.is_set():
            sub.next(0.5 if spec.peer == FLOOR else 3600.0)
    finally:
        sub.close()


# --------------------------------------------------------------------------------------------
# Measurements (parent side)
# --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    return h.weighted_percentiles(values, [1] * len(values), (q,))[0]


def run_latency(spec: Spec, mode: str, size: int, plan: Plan) -> tuple[list[int], int]:
    """One latency run: (one-way latencies in ns, messages lost)."""
    per_round = plan.latency_msgs // plan.rounds
    sub_args = ("latency-sub", spec, mode, per_round, plan.child_timeout_s)
    pub_args = ("latency-pub", spec, per_round, size, plan.pace_s)
    (latencies, gaps), _ = h.run_in_children(
        pubsub_child, [sub_args, pub_args], timeout_s=plan.child_timeout_s + 30
    )
    return latencies, max(gaps, per_round - len(latencies))


def latency_row(peer: str, mode: str, size: int, latencies: Sequence[int], lost: int) -> LatencyRow:
    us = [v / 1e3 for v in latencies]
    return LatencyRow(
        peer=peer,
        mode=mode,
        size=size,
        p50_us=percentile(us, 50),
        p90_us=percentile(us, 90),
        p99_us=percentile(us, 99),
        max_us=max(us) if us else math.nan,
        received=len(us),
        lost=lost,
    )


def measure_latencies(specs: Sequence[Spec], floor: Spec, plan: Plan) -> list[LatencyRow]:
    """Every (peer, mode, size), interleaved, in ``plan.rounds`` rounds whose samples merge."""
    runs = [(spec, mode) for mode in (CALLBACK, GET) for spec in specs] + [(floor, GET)]
    samples: dict[tuple[str, str, int], tuple[list[int], list[int]]] = {}
    for r in range(plan.rounds):
        for size in plan.latency_sizes:
            print(f"latency, {size_label(size)}, round {r + 1} of {plan.rounds} ...", flush=True)
            for spec, mode in runs:
                latencies, lost = run_latency(spec, mode, size, plan)
                got, lost_list = samples.setdefault((spec.peer, mode, size), ([], []))
                got.extend(latencies)
                lost_list.append(lost)
    return [
        latency_row(peer, mode, size, got, sum(lost))
        for size in plan.latency_sizes
        for (peer, mode, size_), (got, lost) in samples.items()
        if size_ == size
    ]


def measure_throughput(spec: Spec, sub_spec: Spec, size: int, plan: Plan) -> ThroughputRow:
    n = plan.throughput_msgs
    sub, pub = h.run_in_children(
        pubsub_child,
        [("throughput-sub", sub_spec, 10.0), ("throughput-pub", spec, n, size)],
        timeout_s=plan.child_timeout_s + 30,
    )
    delivered = int(sub["delivered"])
    dropped = int(sub["dropped"]) if spec.peer == SHAREDKV else n - delivered
    elapsed = (sub["last_ns"] - pub["start_ns"]) / 1e9
    return ThroughputRow(
        peer=spec.peer,
        size=size,
        published=n,
        published_per_s=n / ((pub["end_ns"] - pub["start_ns"]) / 1e9),
        delivered=delivered,
        dropped=dropped,
        delivered_per_s=delivered / elapsed if delivered and elapsed > 0 else 0.0,
    )


def measure_throughputs(pairs: Sequence[tuple[Spec, Spec]], plan: Plan) -> list[ThroughputRow]:
    """Every (publisher, subscriber) pair and size, ``plan.rounds`` times, interleaved."""
    rows: list[ThroughputRow] = []
    for r in range(plan.rounds):
        for size in plan.throughput_sizes:
            print(f"throughput, {size_label(size)}, round {r + 1} of {plan.rounds} ...", flush=True)
            rows += [measure_throughput(pub, sub, size, plan) for pub, sub in pairs]
    return rows


def best_throughputs(runs: Sequence[ThroughputRow]) -> list[ThroughputRow]:
    """Per (peer, size), the run with the highest delivered rate: the least disturbed one."""
    best: dict[tuple[str, int], ThroughputRow] = {}
    for row in runs:
        key = (row.peer, row.size)
        if key not in best or row.delivered_per_s > best[key].delivered_per_s:
            best[key] = row
    return sorted(best.values(), key=lambda row: (row.size, [r.peer for r in runs].index(row.peer)))


def measure_publish_no_subscriber(
    store: Any, redis_address: str | None, plan: Plan
) -> list[PublishRow]:
    """``publish`` to a channel nobody follows, in this process."""
    payload = b"\x01" * 32
    batch = plan.publish_batch
    rows: list[PublishRow] = []

    def time_calls(peer: str, case: str, call: Callable[[], object], n: int) -> None:
        def run(i: int) -> int:
            for _ in range(n):
                call()
            return n

        stats = h.summarize(h.time_batches(run, duration_s=plan.publish_s, min_batches=20))
        rows.append(PublishRow(peer, case, stats.p50_us, stats.p99_us, stats.ops_per_s))

    publish = store.publish
    time_calls(
        SHAREDKV, "Store.publish, no subscriber at all", lambda: publish("nobody", payload), batch
    )
    backend_publish = getattr(store.backend, "publish", None)
    if backend_publish is not None:
        encoded = pickle.dumps(payload, PROTOCOL)
        time_calls(
            SHAREDKV,
            "backend.publish (bytes, no pickling), no subscriber",
            lambda: backend_publish("nobody", encoded),
            batch,
        )
    other = store.subscribe("bench.someone-else")
    try:
        time_calls(
            SHAREDKV,
            "Store.publish, a subscriber on another channel",
            lambda: publish("nobody", payload),
            batch,
        )
    finally:
        other.close()
    if redis_address is not None:
        with open_publisher(Spec(REDIS, redis_address)) as redis_publish:
            time_calls(
                REDIS, "publish, no subscriber (one round trip)", lambda: redis_publish(payload), 20
            )
    return rows


def cpu_of(pid: int) -> tuple[float, float, int]:
    """(utime + stime in ms from /proc/<pid>/stat, run time of all threads in ms, threads)."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    stat_ms = ticks * 1000.0 / os.sysconf("SC_CLK_TCK")
    sched_ns = 0
    threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            sched_ns += int((task / "schedstat").read_text().split()[0])
            threads += 1
    return stat_ms, sched_ns / 1e6, threads


def measure_idle(setups: Sequence[tuple[Spec, str, str]], window_s: float) -> list[IdleRow]:
    """Start one idle subscriber process per (spec, mode, label), all measured in one window."""
    procs = []
    try:
        for spec, mode, _ in setups:
            ready, stop = h.SPAWN.Event(), h.SPAWN.Event()
            proc = h.SPAWN.Process(target=idle_child, args=(spec, mode, ready, stop), daemon=True)
            proc.start()
            procs.append((proc, ready, stop))
        for (_, ready, _), (spec, _, _) in zip(procs, setups, strict=True):
            if not ready.wait(30):
                raise RuntimeError(f"idle {spec.peer} subscriber did not start")
        time.sleep(0.5)  # let start-up work settle
        pids = [proc.pid for proc, _, _ in procs]
        before = [cpu_of(pid) for pid in pids if pid is not None]
        time.sleep(window_s)
        after = [cpu_of(pid) for pid in pids if pid is not None]
        for _, _, stop in procs:
            stop.set()
        for proc, _, _ in procs:
            proc.join(timeout=10)
    finally:
        h.stop_processes([proc for proc, _, _ in procs])
    return [
        IdleRow(spec.peer, label, a[0] - b[0], a[1] - b[1], a[2], window_s)
        for (spec, _, label), b, a in zip(setups, before, after, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def load_note(label: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {label}: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"


def find_latency(report: Report, peer: str, mode: str, size: int) -> LatencyRow | None:
    for row in report.latency:
        if (row.peer, row.mode, row.size) == (peer, mode, size):
            return row
    return None


def find_throughput(report: Report, peer: str, size: int) -> ThroughputRow | None:
    for row in report.throughput:
        if (row.peer, row.size) == (peer, size):
            return row
    return None


def latency_table(report: Report) -> tuple[list[str], list[list[object]]]:
    headers = ["payload", "peer", "mode", "p50 us", "p90 us", "p99 us", "max us", "samples", "lost"]
    rows: list[list[object]] = [
        [size_label(r.size), r.peer, r.mode, r.p50_us, r.p90_us, r.p99_us, r.max_us,
         r.received, r.lost]
        for r in report.latency
    ]  # fmt: skip
    return headers, rows


def ratio_table(report: Report) -> tuple[list[str], list[list[object]]]:
    headers = ["payload", "mode", "sharedkv p50 us", "redis-py p50 us", "redis / sharedkv",
               "floor p50 us"]  # fmt: skip
    rows: list[list[object]] = []
    for size in report.plan.latency_sizes:
        for mode in (CALLBACK, GET):
            ours = find_latency(report, SHAREDKV, mode, size)
            theirs = find_latency(report, REDIS, mode, size)
            floor = find_latency(report, FLOOR, GET, size)
            if ours is None:
                continue
            ratio = theirs.p50_us / ours.p50_us if theirs else math.nan
            rows.append([
                size_label(size), mode, ours.p50_us, theirs.p50_us if theirs else math.nan,
                round(ratio, 2), floor.p50_us if floor else math.nan,
            ])  # fmt: skip
    return headers, rows


def throughput_table(report: Report) -> tuple[list[str], list[list[object]]]:
    headers = ["payload", "peer", "published", "published/s", "delivered", "dropped",
               "delivered/s"]  # fmt: skip
    rows: list[list[object]] = [
        [size_label(r.size), r.peer, r.published, r.published_per_s, r.delivered, r.dropped,
         r.delivered_per_s]
        for r in report.throughput
    ]  # fmt: skip
    return headers, rows


def throughput_ratio_table(report: Report) -> tuple[list[str], list[list[object]]]:
    headers = ["payload", "sharedkv delivered/s", "redis-py delivered/s", "sharedkv / redis-py",
               "redis-py pipeline delivered/s"]  # fmt: skip
    rows: list[list[object]] = []
    for size in report.plan.throughput_sizes:
        ours, theirs = find_throughput(report, SHAREDKV, size), find_throughput(report, REDIS, size)
        pipe = find_throughput(report, REDIS_PIPELINE, size)
        if ours is None:
            continue
        rate = theirs.delivered_per_s if theirs else math.nan
        ratio = ours.delivered_per_s / rate if rate else math.nan
        rows.append([size_label(size), ours.delivered_per_s, rate, round(ratio, 2),
                     pipe.delivered_per_s if pipe else math.nan])  # fmt: skip
    return headers, rows


def publish_table(report: Report) -> tuple[list[str], list[list[object]]]:
    headers = ["peer", "case (32 B payload)", "p50 us", "p99 us (batch means)", "calls/s"]
    rows: list[list[object]] = [
        [r.peer, r.case, r.p50_us, r.p99_us, r.ops_per_s] for r in report.publish
    ]
    return headers, rows


def idle_table(report: Report) -> tuple[list[str], list[list[object]]]:
    headers = ["peer", "idle subscriber", "window s", "CPU ms (stat)", "CPU ms (schedstat)",
               "% of a core", "threads"]  # fmt: skip
    rows: list[list[object]] = [
        [r.peer, r.setup, r.window_s, r.cpu_ms_stat, round(r.cpu_ms_sched, 3),
         round(100 * r.cpu_ms_sched / 1000 / r.window_s, 3), r.threads]
        for r in report.idle
    ]  # fmt: skip
    return headers, rows


def evaluate(report: Report) -> tuple[list[Verdict], list[Verdict]]:
    """The bars (callback latency, throughput), and the same latency numbers for get()."""
    bars: list[Verdict] = []
    targets: list[Verdict] = []
    for mode in (CALLBACK, GET):
        verdicts = bars if mode == CALLBACK else targets
        for size in report.plan.latency_sizes:
            ours = find_latency(report, SHAREDKV, mode, size)
            theirs = find_latency(report, REDIS, mode, size)
            what = f"{mode} {size_label(size)}"
            if ours is None:
                continue
            verdicts.append(Verdict(
                f"sharedkv p50 <= {P50_LIMIT_US:g} us ({what})",
                ours.p50_us <= P50_LIMIT_US,
                f"{ours.p50_us:.1f} us",
            ))  # fmt: skip
            if theirs is None:
                verdicts.append(Verdict(f"p50 >= {LATENCY_RATIO:g}x lower than redis-py ({what})",
                                        None, "Redis not measured"))  # fmt: skip
                continue
            ratio = theirs.p50_us / ours.p50_us
            verdicts.append(Verdict(
                f"p50 >= {LATENCY_RATIO:g}x lower than redis-py ({what})",
                ratio >= LATENCY_RATIO,
                f"{ratio:.2f}x ({ours.p50_us:.1f} us vs {theirs.p50_us:.1f} us)",
            ))  # fmt: skip
    size = report.plan.throughput_sizes[0]
    mine, peer = find_throughput(report, SHAREDKV, size), find_throughput(report, REDIS, size)
    name = f"delivered msgs/s >= {THROUGHPUT_RATIO:g}x redis-py ({size_label(size)})"
    if mine is None or peer is None or not peer.delivered_per_s:
        bars.append(Verdict(name, None, "not measured"))
    else:
        ratio = mine.delivered_per_s / peer.delivered_per_s
        bars.append(Verdict(
            name,
            ratio >= THROUGHPUT_RATIO,
            f"{ratio:.2f}x ({mine.delivered_per_s:,.0f} vs {peer.delivered_per_s:,.0f} msgs/s,"
            f" sharedkv dropped {mine.dropped:,} of {mine.published:,})",
        ))  # fmt: skip
    return bars, targets


SECTIONS = (
    ("Latency, publish to delivery, child to child (one-way, paced 1 ms)", latency_table),
    ("p50 side by side (> 1: sharedkv lower)", ratio_table),
    ("Throughput to one subscriber in another process", throughput_table),
    ("Throughput side by side (> 1: sharedkv faster)", throughput_ratio_table),
    ("publish with no subscriber, in one process", publish_table),
    ("CPU used by an idle subscriber process", idle_table),
)


def print_report(report: Report) -> None:
    for title, table in SECTIONS:
        print(f"\n{title}")
        print(h.format_table(*table(report)))
    print("\nBars")
    for verdict in report.verdicts:
        print("  " + verdict.line())
    print("\nTargets of our own (get(), the same numbers; not bars)")
    for verdict in report.targets:
        print("  " + verdict.line(TARGET_WORDS))


def markdown(report: Report) -> str:
    m = report.machine
    parts = [
        f"Run on {m['date']}: {m['cpu']}, {m['cores']}, {m['memory']} RAM, {m['python']}, "
        f"{m['kernel']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()) + ".",
        f"Command: `{report.command}`",
        "",
        *(f"- {note}" for note in report.notes),
    ]
    for title, table in SECTIONS:
        parts += ["", f"{title}:", "", h.format_markdown(*table(report))]
    parts += ["", "Bars:", "", *(f"- {v.line()}" for v in report.verdicts)]
    parts += ["", "Targets of our own (get(), the same numbers; not bars):", ""]
    parts += [f"- {v.line(TARGET_WORDS)}" for v in report.targets]
    return "\n".join(parts) + "\n"


def json_payload(report: Report) -> dict[str, Any]:
    return {
        "benchmark": "pubsub",
        "machine": report.machine,
        "versions": report.versions,
        "command": report.command,
        "plan": asdict(report.plan),
        "notes": report.notes,
        "rows": report.results,
        "bars": [asdict(v) for v in report.verdicts],
        "targets": [asdict(v) for v in report.targets],
        "throughput_runs": [asdict(row) for row in report.throughput_runs],
    }


def collect_results(report: Report) -> list[Result]:
    out: list[Result] = []
    for lr in report.latency:
        bench = f"latency {lr.mode} {size_label(lr.size)}"
        for metric, value in (("p50", lr.p50_us), ("p90", lr.p90_us), ("p99", lr.p99_us),
                              ("max", lr.max_us)):  # fmt: skip
            out.append(Result(lr.peer, bench, metric, round(value, 2), "us"))
        out.append(Result(lr.peer, bench, "samples", lr.received, "messages"))
        out.append(Result(lr.peer, bench, "lost", lr.lost, "messages"))
    for tr in report.throughput:
        bench = f"throughput {size_label(tr.size)}"
        out.append(Result(tr.peer, bench, "delivered_rate", round(tr.delivered_per_s, 1), "msgs/s"))
        out.append(Result(tr.peer, bench, "published_rate", round(tr.published_per_s, 1), "msgs/s"))
        out.append(Result(tr.peer, bench, "delivered", tr.delivered, "messages"))
        out.append(Result(tr.peer, bench, "dropped", tr.dropped, "messages"))
    for pr in report.publish:
        bench = f"publish no subscriber: {pr.case}"
        out.append(Result(pr.peer, bench, "p50", round(pr.p50_us, 4), "us"))
        out.append(Result(pr.peer, bench, "rate", round(pr.ops_per_s, 1), "calls/s"))
    for ir in report.idle:
        bench = f"idle subscriber {ir.setup}"
        out.append(Result(ir.peer, bench, "cpu_stat", round(ir.cpu_ms_stat, 3), "ms"))
        out.append(Result(ir.peer, bench, "cpu_schedstat", round(ir.cpu_ms_sched, 3), "ms"))
        out.append(Result(ir.peer, bench, "window", ir.window_s, "s"))
    return out


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sharedkv", "lmdb", "redis", "hiredis"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def remove_leftover_store(path: str | None) -> str | None:
    """Make sure the run's shared-memory store is gone; returns a note if it had to act."""
    if not path or not os.path.isdir(path):
        return None
    from sharedkv._backends import shm

    with contextlib.suppress(Exception):
        if shm.destroy(os.path.basename(path)):
            return f"removed leftover store directory {path}"
    shutil.rmtree(path, ignore_errors=True)
    return f"removed leftover store directory {path} (forcibly)"


def run(args: argparse.Namespace) -> Report:
    import sharedkv

    plan = Plan.quick() if args.quick else Plan.full()
    machine = h.machine_info()
    print("Machine")
    h.print_machine(machine)
    report = Report(machine, library_versions(), shlex.join(["python", *sys.argv]), plan)
    report.notes.append(load_note("at start"))
    print("  " + report.notes[-1], flush=True)
    store_path: str | None = None
    with contextlib.ExitStack() as stack:
        redis_address: str | None = None
        if h.RedisServer.available():
            server = stack.enter_context(h.RedisServer())
            redis_address = f"{server.host}:{server.port}"
            report.versions["redis-server"] = server.version
        else:
            report.notes.append("redis-server not found: Redis rows and bars are not measured")
        # The parent keeps the store open for the whole run; every child attaches to it.
        store = sharedkv.Store(f"shm://bench-pubsub-{os.getpid()}")
        store_path = store.path
        stack.callback(store.close)
        floor_address = f"\0bench-pubsub-floor-{os.getpid()}"

        print("\npublish with no subscriber ...", flush=True)
        report.publish = measure_publish_no_subscriber(store, redis_address, plan)

        specs = [Spec(SHAREDKV, store.url)]
        if redis_address:
            specs.append(Spec(REDIS, redis_address))
        report.latency = measure_latencies(specs, Spec(FLOOR, floor_address), plan)
        report.notes.append(load_note("after the latency runs"))
        print("  " + report.notes[-1], flush=True)

        pairs = [(spec, spec) for spec in specs]
        if redis_address:
            pairs.append((Spec(REDIS_PIPELINE, redis_address), Spec(REDIS, redis_address)))
        report.throughput_runs = measure_throughputs(pairs, plan)
        report.throughput = best_throughputs(report.throughput_runs)
        report.notes.append(load_note("after the throughput runs"))
        print("  " + report.notes[-1], flush=True)

        print("idle subscribers ...", flush=True)
        setups = [
            (specs[0], CALLBACK, "on_message callback"),
            (specs[0], GET, "blocked in sub.get()"),
        ]
        if redis_address:
            setups += [
                (specs[1], CALLBACK, f"run_in_thread(sleep_time={REDIS_SLEEP_S:g})"),
                (specs[1], GET, "blocked in get_message(timeout=3600)"),
            ]
        report.idle = measure_idle(setups, plan.idle_s)
    note = remove_leftover_store(store_path)
    if note:
        report.notes.append(note)
    report.notes.append(load_note("at the end"))
    report.notes.append(
        f"latency: {plan.latency_msgs} timed messages per row in {plan.rounds} interleaved"
        f" round(s), each after {WARMUP_MSGS} warm-up ones, {plan.pace_s * 1e3:g} ms apart;"
        f" throughput: {plan.throughput_msgs:,} messages per run, each row the best of"
        f" {plan.rounds} interleaved run(s) (all runs are in the JSON output)"
    )
    report.verdicts, report.targets = evaluate(report)
    report.results = collect_results(report)
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages; a < 60 s smoke test")
    parser.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown here")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if a bar fails")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    h.raise_keyboard_interrupt_on_sigterm()
    started = time.monotonic()
    with h.quiet_stderr_on_interrupt():
        report = run(args)
    print_report(report)
    print("\nNotes")
    for note in report.notes:
        print("  " + note)
    print(f"  finished in {time.monotonic() - started:.0f} s")
    if args.json:
        h.write_json(args.json, json_payload(report))
        print(f"\nwrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
        print(f"wrote {args.markdown}")
    failed = any(v.passed is False for v in report.verdicts)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
