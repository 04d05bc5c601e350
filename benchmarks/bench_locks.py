"""Lock benchmark: sharedkv's process-owned locks against the usual cross-process locks.

Run from the repository root (full run: under a minute on 2 cores)::

    .venv/bin/python benchmarks/bench_locks.py
    .venv/bin/python benchmarks/bench_locks.py --quick               # smoke test, < 60 s
    .venv/bin/python benchmarks/bench_locks.py --json locks.json --markdown locks.md

Peers, all measured in one run:

* ``sharedkv``: ``store.lock(name)`` on a named shared-memory store (``shm://bench-locks-<pid>``);
* ``redis-py Lock``: ``redis.lock.Lock`` (``client.lock(name)``: SET NX PX to acquire, a Lua
  script to release) on a private ``redis-server`` started for this run (127.0.0.1, free port,
  ``--save ''``, no AOF), stopped by pid at the end, also on Ctrl-C. A blocked ``acquire`` polls
  every ``sleep`` seconds: 0.1 s by default, also measured with 1 ms;
* ``Manager().Lock()``: a ``threading.Lock`` in a ``multiprocessing`` manager process, reached
  through its proxy (one round trip per call; a blocked ``acquire`` waits in the manager);
* ``filelock``: ``filelock.FileLock`` on a file in a temporary directory (``flock``; a blocked
  ``acquire`` polls every ``poll_interval``: 0.05 s by default, also measured with 1 ms);
* ``threading.Lock`` (uncontended only): the in-process floor, for scale; it is no cross-process
  lock.

What is measured:

1. Uncontended ``acquire()`` + ``release()`` in one process (the parent), in a loop. Timing:
   ``time.perf_counter_ns`` around batches of 20 pairs, the same batch for every peer; each batch
   stands for 20 samples of its mean (see ``_harness.time_batches``), so the median and pairs/s
   are exact to within the timer cost and p99 is a percentile of batch means.
2. Contended handoff between two spawned processes that alternate one lock. The holder releases
   as soon as the other process has announced (a byte over a ``multiprocessing.Pipe``) that it is
   calling ``acquire()``; after a handoff the new holder tells the old one (another byte), which
   then announces itself and calls ``acquire()`` again, so the lock strictly alternates and every
   ``acquire`` competes with a holder that is about to release. Handoff latency: from just before
   the holder calls ``release()`` (a ``perf_counter_ns`` stamp in shared memory) to the return of
   the waiter's ``acquire()``, both read on the machine-wide monotonic clock. Handoffs/s: handoffs
   over the wall time of the run; each handoff also carries two pipe messages, whose cost alone is
   the ``no lock`` row (the same protocol with a lock that does nothing).

Every number depends on the machine and on what else runs on it: the script prints the 1-minute
load average before and after the run.

Bar (printed as PASS/FAIL): sharedkv uncontended acquire+release pairs/s >= 10x redis-py's Lock.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

LOCK_NAME = "bench.lock"
SHAREDKV = "sharedkv"
REDIS = "redis-py Lock"
MANAGER = "Manager().Lock()"
FILELOCK = "filelock"
THREADING = "threading.Lock"
NONE = "no lock (pipe signalling only)"
UNCONTENDED_RATIO = 10.0
BATCH = 20
ENTER, ACQUIRED, STOP = b"e", b"a", b"s"


def now_ns() -> int:
    return time.perf_counter_ns()


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    uncontended_s: float  # per peer
    handoff_s: float  # per peer
    acquire_timeout_s: float

    @classmethod
    def full(cls) -> Plan:
        return cls(uncontended_s=2.0, handoff_s=4.0, acquire_timeout_s=30.0)

    @classmethod
    def quick(cls) -> Plan:
        return replace(cls.full(), uncontended_s=0.4, handoff_s=1.0)


@dataclass(frozen=True)
class Result:
    """One machine-readable number: the ``rows`` of ``--json`` output."""

    peer: str
    benchmark: str
    metric: str
    value: float
    unit: str


@dataclass(frozen=True)
class UncontendedRow:
    peer: str
    p50_us: float
    p99_us: float
    pairs_per_s: float
    pairs: int


@dataclass(frozen=True)
class HandoffRow:
    peer: str
    handoffs: int
    handoffs_per_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float


@dataclass(frozen=True)
class Verdict:
    name: str
    passed: bool | None  # None: not measured
    detail: str

    def line(self) -> str:
        tag = {True: "PASS", False: "FAIL", None: "N/A "}[self.passed]
        return f"[{tag}] {self.name}: {self.detail}"


@dataclass
class Report:
    machine: dict[str, str]
    versions: dict[str, str]
    command: str
    plan: Plan
    notes: list[str] = field(default_factory=list)
    uncontended: list[UncontendedRow] = field(default_factory=list)
    handoff: list[HandoffRow] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Peers: a picklable spec that opens the same lock wherever it runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockSpec:
    """``address``: a store URL, ``host:port`` or a file path; ``proxy``: a manager's lock."""

    label: str
    kind: str
    address: str = ""
    poll_s: float | None = None  # the peer's polling interval while blocked, if it polls
    proxy: Any = None


@dataclass
class Handle:
    acquire: Callable[[], object]  # blocking, with the plan's timeout; truthy when acquired
    release: Callable[[], object]


@contextlib.contextmanager
def open_lock(spec: LockSpec, timeout_s: float) -> Iterator[Handle]:
    if spec.kind == SHAREDKV:
        import sharedkv

        store = sharedkv.Store(spec.address)
        try:
            lock = store.lock(LOCK_NAME, timeout=timeout_s)
            yield Handle(lock.acquire, lock.release)
        finally:
            store.close()
    elif spec.kind == REDIS:
        import redis

        host, port = spec.address.rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port))
        try:
            kwargs: dict[str, Any] = {"blocking_timeout": timeout_s}
            if spec.poll_s is not None:
                kwargs["sleep"] = spec.poll_s
            rlock = client.lock(LOCK_NAME, **kwargs)
            yield Handle(rlock.acquire, rlock.release)
        finally:
            client.close()
    elif spec.kind == MANAGER:
        proxy = spec.proxy
        yield Handle(lambda: proxy.acquire(timeout=timeout_s), proxy.release)
    elif spec.kind == FILELOCK:
        import filelock

        kwargs = {"timeout": timeout_s}
        if spec.poll_s is not None:
            kwargs["poll_interval"] = spec.poll_s
        flock = filelock.FileLock(spec.address, **kwargs)
        yield Handle(flock.acquire, flock.release)
    elif spec.kind == THREADING:
        tlock = threading.Lock()
        yield Handle(tlock.acquire, tlock.release)
    elif spec.kind == NONE:
        yield Handle(lambda: True, lambda: None)
    else:
        raise ValueError(spec.kind)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def measure_uncontended(spec: LockSpec, plan: Plan) -> UncontendedRow:
    with open_lock(spec, plan.acquire_timeout_s) as lock:
        acquire, release = lock.acquire, lock.release

        def run(i: int) -> int:
            for _ in range(BATCH):
                acquire()
                release()
            return BATCH

        samples = h.time_batches(run, duration_s=plan.uncontended_s, min_batches=30)
    stats = h.summarize(samples)
    return UncontendedRow(spec.label, stats.p50_us, stats.p99_us, stats.ops_per_s, stats.ops)


def handoff_child(
    barrier: Any,
    spec: LockSpec,
    me: int,
    conn: Any,
    released_at: Any,
    duration_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    """One of the two alternating processes (see the module docstring for the protocol)."""
    clock = now_ns
    latencies: list[int] = []
    with open_lock(spec, timeout_s) as lock:
        acquire, release = lock.acquire, lock.release

        def take() -> None:
            if not acquire():
                raise RuntimeError(f"{spec.label}: acquire timed out after {timeout_s} s")
            latencies.append(clock() - released_at[0])

        if me == 0 and not acquire():
            raise RuntimeError(f"{spec.label}: the first acquire failed")
        barrier.wait()
        start = clock()
        deadline = start + int(duration_s * 1e9)
        if me == 1:
            conn.send_bytes(ENTER)
            take()
            conn.send_bytes(ACQUIRED)
        while True:  # holding the lock here
            if conn.recv_bytes() == STOP:
                release()
                break
            released_at[0] = clock()
            release()
            if conn.recv_bytes() != ACQUIRED:
                raise RuntimeError("handoff protocol out of step")
            if clock() >= deadline:
                conn.send_bytes(STOP)
                break
            conn.send_bytes(ENTER)
            take()
            conn.send_bytes(ACQUIRED)
        end = clock()
    return {"latencies": latencies, "start_ns": start, "end_ns": end}


def measure_handoff(spec: LockSpec, plan: Plan) -> HandoffRow:
    end_a, end_b = h.SPAWN.Pipe()
    released_at = h.SPAWN.RawArray("q", 1)
    args = [
        (spec, i, conn, released_at, plan.handoff_s, plan.acquire_timeout_s)
        for i, conn in enumerate((end_a, end_b))
    ]
    try:
        results = h.run_in_children(
            handoff_child, args, timeout_s=plan.handoff_s + 3 * plan.acquire_timeout_s
        )
    finally:
        end_a.close()
        end_b.close()
    latencies = [v / 1e3 for r in results for v in r["latencies"]]
    wall_s = (max(r["end_ns"] for r in results) - min(r["start_ns"] for r in results)) / 1e9
    count = len(latencies)
    if spec.kind == NONE:  # nothing is released: only the rate means something
        p50 = p90 = p99 = top = math.nan
    else:
        p50, p90, p99 = h.weighted_percentiles(latencies, [1] * count, (50, 90, 99))
        top = max(latencies) if latencies else math.nan
    return HandoffRow(spec.label, count, count / wall_s if wall_s else math.nan, p50, p90, p99, top)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def load_note(label: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {label}: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"


def find(rows: Sequence[Any], peer: str) -> Any:
    return next((r for r in rows if r.peer == peer), None)


def uncontended_table(report: Report) -> tuple[list[str], list[list[object]]]:
    headers = ["peer", "p50 us (pair)", "p99 us (batch means)", "pairs/s", "sharedkv is x faster"]
    ours = find(report.uncontended, SHAREDKV)
    rows: list[list[object]] = []
    for r in report.uncontended:
        ratio = ours.pairs_per_s / r.pairs_per_s if ours and r.pairs_per_s else math.nan
        rows.append([r.peer, r.p50_us, r.p99_us, r.pairs_per_s, round(ratio, 2)])
    return headers, rows


def handoff_table(report: Report) -> tuple[list[str], list[list[object]]]:
    headers = ["peer", "handoffs", "handoffs/s", "latency p50 us", "p90 us", "p99 us", "max us"]
    rows: list[list[object]] = [
        [r.peer, r.handoffs, r.handoffs_per_s, r.p50_us, r.p90_us, r.p99_us, r.max_us]
        for r in report.handoff
    ]
    return headers, rows


SECTIONS = (
    ("Uncontended acquire() + release(), one process", uncontended_table),
    ("Contended handoff, two processes alternating one lock", handoff_table),
)


def evaluate(report: Report) -> list[Verdict]:
    ours, theirs = find(report.uncontended, SHAREDKV), find(report.uncontended, REDIS)
    name = f"uncontended acquire+release >= {UNCONTENDED_RATIO:g}x redis-py Lock"
    if ours is None or theirs is None:
        return [Verdict(name, None, "not measured")]
    ratio = ours.pairs_per_s / theirs.pairs_per_s
    detail = (
        f"{ratio:.1f}x ({ours.pairs_per_s:,.0f} vs {theirs.pairs_per_s:,.0f} pairs/s; "
        f"p50 {ours.p50_us:.1f} us vs {theirs.p50_us:.1f} us)"
    )
    return [Verdict(name, ratio >= UNCONTENDED_RATIO, detail)]


def print_report(report: Report) -> None:
    for title, table in SECTIONS:
        print(f"\n{title}")
        print(h.format_table(*table(report)))
    print("\nBars")
    for verdict in report.verdicts:
        print("  " + verdict.line())


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
    return "\n".join(parts) + "\n"


def collect_results(report: Report) -> list[Result]:
    out: list[Result] = []
    for u in report.uncontended:
        bench = "uncontended acquire+release"
        out.append(Result(u.peer, bench, "p50", round(u.p50_us, 3), "us"))
        out.append(Result(u.peer, bench, "p99_batch_mean", round(u.p99_us, 3), "us"))
        out.append(Result(u.peer, bench, "rate", round(u.pairs_per_s, 1), "pairs/s"))
    for c in report.handoff:
        bench = "2-process handoff"
        out.append(Result(c.peer, bench, "rate", round(c.handoffs_per_s, 1), "handoffs/s"))
        out.append(Result(c.peer, bench, "handoffs", c.handoffs, "handoffs"))
        for metric, value in (("p50", c.p50_us), ("p90", c.p90_us), ("p99", c.p99_us),
                              ("max", c.max_us)):  # fmt: skip
            out.append(Result(c.peer, bench, f"latency_{metric}", round(value, 2), "us"))
    return out


def json_payload(report: Report) -> dict[str, Any]:
    return {
        "benchmark": "locks",
        "machine": report.machine,
        "versions": report.versions,
        "command": report.command,
        "plan": asdict(report.plan),
        "notes": report.notes,
        "rows": report.results,
        "bars": [asdict(v) for v in report.verdicts],
    }


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sharedkv", "lmdb", "redis", "hiredis", "filelock"):
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


def setup_specs(stack: contextlib.ExitStack, report: Report) -> tuple[list[LockSpec], str]:
    """Start what the peers need (store, redis-server, manager, temp dir); all undone by stack."""
    import sharedkv

    store = sharedkv.Store(f"shm://bench-locks-{os.getpid()}")
    store_path = store.path or ""
    stack.callback(store.close)  # the parent stays attached for the whole run
    specs = [LockSpec(SHAREDKV, SHAREDKV, store.url)]
    if h.RedisServer.available():
        server = stack.enter_context(h.RedisServer())
        report.versions["redis-server"] = server.version
        address = f"{server.host}:{server.port}"
        specs.append(LockSpec(REDIS, REDIS, address))
        specs.append(LockSpec(f"{REDIS} (sleep=1 ms)", REDIS, address, poll_s=0.001))
    else:
        report.notes.append("redis-server not found: the Redis rows and the bar are not measured")
    manager = h.SPAWN.Manager()
    stack.callback(manager.shutdown)
    specs.append(LockSpec(MANAGER, MANAGER, proxy=manager.Lock()))
    tmp = tempfile.mkdtemp(prefix="bench-locks-")
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    path = os.path.join(tmp, "bench.lock")
    specs.append(LockSpec(FILELOCK, FILELOCK, path))
    specs.append(LockSpec(f"{FILELOCK} (poll 1 ms)", FILELOCK, path, poll_s=0.001))
    return specs, store_path


def run(args: argparse.Namespace) -> Report:
    plan = Plan.quick() if args.quick else Plan.full()
    machine = h.machine_info()
    print("Machine")
    h.print_machine(machine)
    report = Report(machine, library_versions(), shlex.join(["python", *sys.argv]), plan)
    report.notes.append(load_note("at start"))
    print("  " + report.notes[-1], flush=True)
    with contextlib.ExitStack() as stack:
        specs, store_path = setup_specs(stack, report)
        print("\nuncontended ...", flush=True)
        for spec in specs:
            if spec.poll_s is None:  # polling only matters when blocked
                report.uncontended.append(measure_uncontended(spec, plan))
        report.uncontended.append(measure_uncontended(LockSpec(THREADING, THREADING), plan))
        report.notes.append(load_note("after the uncontended runs"))
        print("  " + report.notes[-1], flush=True)
        for spec in [*specs, LockSpec(NONE, NONE)]:
            print(f"handoff, {spec.label} ...", flush=True)
            report.handoff.append(measure_handoff(spec, plan))
    note = remove_leftover_store(store_path)
    if note:
        report.notes.append(note)
    report.notes.append(load_note("at the end"))
    report.notes.append(
        f"uncontended: {plan.uncontended_s:g} s per peer, batches of {BATCH} pairs; "
        f"handoff: {plan.handoff_s:g} s per peer"
    )
    report.verdicts = evaluate(report)
    report.results = collect_results(report)
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs; a < 60 s smoke test")
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
