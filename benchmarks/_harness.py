"""Shared helpers for the sharedkv benchmark scripts (KV, pub/sub, queues, locks, ...).

Not a benchmark itself. What lives here:

* timing: :func:`time_batches` times batches of operations with ``time.perf_counter_ns`` and
  turns them into per-operation samples; :class:`Samples` / :class:`Stats` summarise them
  (median, p90, p99 in microseconds, ops/s);
* :class:`Row` -- one machine-readable result (what ``--json`` files contain);
* :func:`format_table` -- a plain-text table, no dependencies;
* :func:`machine_info` -- CPU model, cores, Python, kernel, date;
* :class:`RedisServer` -- a private, non-persistent ``redis-server`` on a free loopback port,
  stopped by pid;
* :func:`run_in_children` -- run a function in N spawned processes that start together, collect
  their return values, and never leave a child behind;
* small /proc and filesystem helpers for memory measurements.

Timing method (used by every script that calls :func:`time_batches`): one timer read pair per
batch of ``B`` operations, and each batch contributes ``B`` copies of its mean to the samples.
With ``perf_counter_ns`` costing ~60 ns, a batch of >= 10 us keeps timer overhead under 1 %.
Median and ops/s are then exact up to that overhead; p90/p99 are percentiles of *batch means*,
so they smooth the tail of single operations whenever ``B > 1`` (with ``B = 1`` they are true
per-operation percentiles). Scripts must use the same ``B`` for every peer they compare.

On a shared or virtual machine, other work comes and goes; :func:`summarize_rounds` supports
repeating each measurement in rounds interleaved across peers (round 1 of every peer, then
round 2, ...) and reporting the median round, so a disturbance hits all peers alike.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SPAWN = mp.get_context("spawn")


# --------------------------------------------------------------------------------------------
# Timing and statistics
# --------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-batch mean latency (ns per op) with batch sizes, plus totals for throughput.

    A batch of ``n`` ops stands for ``n`` samples of its mean (weighted percentiles).
    """

    mean_ns: list[float] = field(default_factory=list)
    batch_ops: list[int] = field(default_factory=list)
    ops: int = 0
    busy_ns: int = 0  # sum of the timed batches only
    wall_ns: int = 0  # first batch start to last batch end, loop overhead included

    def extend(self, other: Samples) -> None:
        """Merge samples taken concurrently (wall time is the longest of the two)."""
        self.mean_ns.extend(other.mean_ns)
        self.batch_ops.extend(other.batch_ops)
        self.ops += other.ops
        self.busy_ns += other.busy_ns
        self.wall_ns = max(self.wall_ns, other.wall_ns)


@dataclass(frozen=True)
class Stats:
    """Summary of one measurement; latencies in microseconds."""

    p50_us: float
    p90_us: float
    p99_us: float
    ops_per_s: float
    ops: int


def weighted_percentiles(
    values: Sequence[float], weights: Sequence[int], qs: Sequence[float]
) -> list[float]:
    """Nearest-rank percentiles (``qs`` in 0..100) of ``values`` each repeated ``weight`` times."""
    if not values:
        return [math.nan] * len(qs)
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(weights)
    out: list[float] = []
    for q in qs:
        rank = max(1, math.ceil(q / 100.0 * total))
        seen = 0
        for value, weight in pairs:
            seen += weight
            if seen >= rank:
                out.append(value)
                break
    return out


def summarize(samples: Samples, *, concurrent: bool = False) -> Stats:
    """Median/p90/p99 of the per-op samples; ops/s from busy time (or wall time if concurrent).

    For one process, ops/s is ``ops / busy time``. For several processes running at the same
    time (``concurrent=True``) it is the aggregate ``total ops / longest wall time``.
    """
    p50, p90, p99 = weighted_percentiles(samples.mean_ns, samples.batch_ops, (50, 90, 99))
    elapsed_ns = samples.wall_ns if concurrent else samples.busy_ns
    return Stats(
        p50_us=p50 / 1e3,
        p90_us=p90 / 1e3,
        p99_us=p99 / 1e3,
        ops_per_s=samples.ops / (elapsed_ns / 1e9) if elapsed_ns else math.nan,
        ops=samples.ops,
    )


def summarize_rounds(rounds: Sequence[Samples], *, concurrent: bool = False) -> Stats:
    """Summary of one measurement repeated in several rounds.

    Percentiles are over the samples of every round; ops/s is the median of the rounds' ops/s,
    so one round disturbed by other work on the machine does not move it.
    """
    pooled = Samples()
    for samples in rounds:
        pooled.mean_ns.extend(samples.mean_ns)
        pooled.batch_ops.extend(samples.batch_ops)
        pooled.ops += samples.ops
    stats = summarize(pooled)
    rates = sorted(summarize(s, concurrent=concurrent).ops_per_s for s in rounds)
    middle = len(rates) // 2
    rate = rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2
    return replace(stats, ops_per_s=rate)


def time_batches(
    run_batch: Callable[[int], int],
    *,
    duration_s: float,
    min_batches: int = 50,
    max_batches: int | None = None,
    warmup_batches: int = 5,
) -> Samples:
    """Time ``run_batch(i)`` (which runs batch ``i`` and returns how many ops it did).

    Runs ``warmup_batches`` untimed, then timed batches until ``duration_s`` has passed and at
    least ``min_batches`` were timed (or ``max_batches`` is reached).
    """
    for i in range(warmup_batches):
        run_batch(i)
    clock = time.perf_counter_ns
    samples = Samples()
    means, sizes = samples.mean_ns, samples.batch_ops
    deadline = clock() + int(duration_s * 1e9)
    start = clock()
    i = warmup_batches
    timed = 0
    while True:
        t0 = clock()
        n = run_batch(i)
        t1 = clock()
        means.append((t1 - t0) / n)
        sizes.append(n)
        samples.ops += n
        samples.busy_ns += t1 - t0
        i += 1
        timed += 1
        if max_batches is not None and timed >= max_batches:
            break
        if t1 >= deadline and timed >= min_batches:
            break
    samples.wall_ns = clock() - start
    return samples


def timer_overhead_ns(reps: int = 200_000) -> float:
    """Cost of one ``perf_counter_ns()`` call in this interpreter, loop included."""
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(reps):
        clock()
    return (clock() - t0) / reps


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One result line; the schema of ``--json`` output (``rows`` list)."""

    peer: str
    op: str
    kind: str
    p50_us: float
    p90_us: float
    p99_us: float
    ops_per_s: float
    procs: int = 1
    batch: int = 1

    @classmethod
    def from_stats(
        cls, peer: str, op: str, kind: str, stats: Stats, *, procs: int = 1, batch: int = 1
    ) -> Row:
        return cls(
            peer=peer,
            op=op,
            kind=kind,
            p50_us=round(stats.p50_us, 4),
            p90_us=round(stats.p90_us, 4),
            p99_us=round(stats.p99_us, 4),
            ops_per_s=round(stats.ops_per_s, 1),
            procs=procs,
            batch=batch,
        )


@dataclass(frozen=True)
class Bar:
    """A pass/fail target: ``measured >= required``."""

    name: str
    measured: float
    required: float

    @property
    def passed(self) -> bool:
        return not math.isnan(self.measured) and self.measured >= self.required

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        got = "not measured" if math.isnan(self.measured) else f"{self.measured:.2f}x"
        return f"[{verdict}] {self.name}: {got} (need >= {self.required:g}x)"


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (dataclasses converted)."""

    def convert(obj: Any) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)
        raise TypeError(f"not JSON serialisable: {obj!r}")

    Path(path).write_text(json.dumps(payload, indent=2, default=convert) + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[fmt_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) if rows else False
        for i in range(len(headers))
    ]

    def render(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    lines = [render(headers), render(["-" * w for w in widths])]
    lines += [render(row) for row in cells]
    return "\n".join(lines)


def format_markdown(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table as GitHub-flavoured Markdown."""
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) if rows else False
        for i in range(len(headers))
    ]
    align = ["---:" if num else "---" for num in numeric]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(fmt_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_cell(value: object) -> str:
    """Numbers with sensible precision: 3 significant digits below 100, thousands separated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.2g}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, str]:
    """What a results table must be read against."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    mem_kib = proc_status_kib("MemTotal", "/proc/meminfo")
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical ({affinity} usable)",
        "memory": fmt_bytes(mem_kib * 1024) if mem_kib else "unknown",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def print_machine(info: dict[str, str]) -> None:
    for key, value in info.items():
        print(f"  {key:<8} {value}")


# --------------------------------------------------------------------------------------------
# /proc and filesystem helpers
# --------------------------------------------------------------------------------------------


def proc_status_kib(field_name: str, path: str = "/proc/self/status") -> int:
    """A ``kB`` field from /proc/self/status (RssAnon, RssShmem, VmRSS, ...) or /proc/meminfo."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def rss_breakdown() -> dict[str, int]:
    """This process's resident memory split into private (anon), shmem and file, in bytes."""
    return {
        name: proc_status_kib(name) * 1024 for name in ("RssAnon", "RssShmem", "RssFile", "VmRSS")
    }


def dir_usage_bytes(path: str | Path) -> int:
    """Allocated bytes (``st_blocks * 512``) of every file under ``path``: sparse-file aware."""
    root = Path(path)
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def filesystem_type(path: str | Path) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts), e.g. ``tmpfs``."""
    target = Path(path).resolve()
    best, best_type = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount, fstype = parts[1], parts[2]
            inside = target == Path(mount) or Path(mount) in target.parents
            if inside and len(mount) > len(best):
                best, best_type = mount, fstype
    return best_type


# --------------------------------------------------------------------------------------------
# Process management
# --------------------------------------------------------------------------------------------


def raise_keyboard_interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C so ``finally``/ExitStack cleanup always runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _child_entry(
    target: Callable[..., Any], index: int, barrier: Any, results: Any, args: tuple[Any, ...]
) -> None:
    try:
        value = target(barrier, *args)
    except BaseException:
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, False, traceback.format_exc()))
    else:
        results.put((index, True, value))


def run_in_children(
    target: Callable[..., Any], args_per_child: Sequence[tuple[Any, ...]], *, timeout_s: float = 600
) -> list[Any]:
    """Run ``target(barrier, *args)`` in one spawned process per ``args`` and return the results.

    ``barrier`` is a ``multiprocessing.Barrier`` for all children: call ``barrier.wait()`` after
    setup so timed sections start together. Child exceptions are re-raised here with their
    traceback. Children still alive on the way out (error, Ctrl-C) are terminated, then killed.
    """
    n = len(args_per_child)
    barrier = SPAWN.Barrier(n)
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_child_entry, args=(target, i, barrier, results, args), daemon=True)
        for i, args in enumerate(args_per_child)
    ]
    out: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            index, ok, value = _next_result(results, procs, deadline)
            if not ok:
                raise RuntimeError(f"benchmark child {index} failed:\n{value}")
            out[index] = value
        for p in procs:
            p.join(timeout=10)
    finally:
        stop_processes(procs)
        results.close()
    return [out[i] for i in range(n)]


def _next_result(results: Any, procs: Sequence[Any], deadline: float) -> Any:
    import queue

    while True:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError("benchmark children did not finish in time") from None
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                code = dead[0].exitcode
                raise RuntimeError(f"benchmark child died with exit code {code}") from None


def stop_processes(procs: Sequence[Any], grace_s: float = 3.0) -> None:
    """Terminate then kill the given ``multiprocessing`` processes that are still alive."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join(timeout=grace_s)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` (no RDB, no AOF) on 127.0.0.1 and a free port.

    Use as a context manager; :meth:`stop` signals the server by pid and is idempotent.
    ``RedisServer.available()`` tells whether the binary exists.
    """

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available(binary: str | None = None) -> bool:
        path = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        return Path(path).is_file() and os.access(path, os.X_OK)

    @property
    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        ).stdout
        for token in out.split():
            if token.startswith("v="):
                return token[2:]
        return out.strip()

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.port = free_tcp_port()
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip
        # New session: Ctrl-C in the terminal reaches us, and we stop the server ourselves.
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("redis-server did not answer PING in time")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def quiet_stderr_on_interrupt() -> Iterator[None]:
    """Turn Ctrl-C into a one-line message and exit status 130 (cleanup already ran)."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        raise SystemExit(130) from None
