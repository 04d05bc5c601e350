"""Redis backend benchmark: sharedkv on Redis against plain redis-py, and against shared memory.

Run from the repository root (full run: about 2 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_redis.py
    .venv/bin/python benchmarks/bench_redis.py --quick          # smoke test, < 30 s
    .venv/bin/python benchmarks/bench_redis.py --json redis.json --markdown redis.md

What is measured, all in one run on one machine, against one private ``redis-server`` on
127.0.0.1 (no persistence):

* ``sharedkv redis``: ``sharedkv.Store("redis://...")``, i.e. what the Redis backend costs;
* ``redis-py``: the same operations as plain redis-py calls, pickling values with the highest
  protocol as sharedkv does: ``GET`` + ``pickle.loads``, ``SET`` of ``pickle.dumps``,
  ``PUBLISH`` of ``pickle.dumps``; this is the floor a Redis-backed store can reach;
* ``sharedkv shm``: ``sharedkv.Store("shm://...")``, what a program keeps by staying on shared
  memory when all its processes are on one machine.

Operations, from the benchmark process itself: ``get`` of an existing key, ``set`` overwriting
an existing key, ``publish`` to a channel nobody subscribes to, and ``publish`` while one
subscriber (a spawned process of the same peer) receives and decodes every message.

Every peer does what its API promises: sharedkv's ``set`` is a Lua script that also assigns a
revision, appends to the change history (for ``watch(since=)``) and wakes watchers; its
``publish`` keeps the message in a bounded per-channel buffer when someone subscribes. Plain
redis-py does none of that. The bar: ``get``, ``set`` and ``publish`` cost at most 1.3 times the
plain call. Publishing to a live subscriber is reported without a bar: there a sharedkv
subscriber reads each stored message back (order, seqs and gap reports survive reconnects),
which plain pub/sub does not do, and on a small machine that work competes with the publisher
for the same cores.

Timing: ``time.perf_counter_ns`` around batches of B operations (same B for every peer), and the
peers take turns in short rounds so that background load on a shared machine hits them alike.
Latency is the median of the per-op batch means; p90 likewise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

PROTOCOL = pickle.HIGHEST_PROTOCOL
OURS, PLAIN, SHM = "sharedkv redis", "redis-py", "sharedkv shm"
PEERS = (OURS, PLAIN, SHM)
BAR = 1.3  # sharedkv on Redis may take at most this many times a plain redis-py call
KINDS = {"str": "small str", "dict": "10-field dict"}
OPS = ("get", "set", "publish", "publish, 1 subscriber")
BAR_OPS = OPS[:3]
CHANNEL = "bench"


def make_value(kind: str) -> object:
    if kind == "str":
        return "hello world"
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


@dataclass(frozen=True)
class Plan:
    round_s: float  # one peer's turn
    rounds: int
    batch: int
    keys: int

    @classmethod
    def full(cls) -> Plan:
        return cls(round_s=0.25, rounds=8, batch=20, keys=1000)

    @classmethod
    def quick(cls) -> Plan:
        return cls(round_s=0.05, rounds=3, batch=20, keys=100)


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


@dataclass
class Peer:
    name: str
    get: Callable[[str], Any]
    set: Callable[[str, Any], Any]
    publish: Callable[[str, Any], Any]


def sharedkv_peer(name: str, url: str) -> tuple[Peer, Callable[[], None]]:
    import sharedkv

    store = sharedkv.Store(url)
    return Peer(name, store.get, store.set, store.publish), store.close


def redis_py_peer(port: int) -> tuple[Peer, Callable[[], None]]:
    import redis

    client = redis.Redis(port=port)
    dumps, loads = pickle.dumps, pickle.loads

    def get(key: str) -> Any:
        raw = client.get(key)
        return None if raw is None else loads(raw)

    def set_(key: str, value: Any) -> Any:
        return client.set(key, dumps(value, PROTOCOL))

    def publish(channel: str, value: Any) -> Any:
        return client.publish(channel, dumps(value, PROTOCOL))

    return Peer(PLAIN, get, set_, publish), client.close


def subscriber(peer: str, address: str, ready: Any, done: Any) -> None:
    """A spawned process that receives and decodes every message until told to stop."""
    if peer == PLAIN:
        import redis

        pubsub = redis.Redis(port=int(address)).pubsub()
        pubsub.subscribe(CHANNEL)
        ready.set()
        while not done.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "message":
                pickle.loads(message["data"])
        pubsub.close()
        return
    import sharedkv

    with sharedkv.Store(address) as store, store.subscribe(CHANNEL) as sub:
        ready.set()
        while not done.is_set():
            with contextlib.suppress(sharedkv.TimeoutError):
                sub.get(timeout=0.2)


@contextlib.contextmanager
def subscribed(peer: str, address: str) -> Iterator[None]:
    ready, done = h.SPAWN.Event(), h.SPAWN.Event()
    proc = h.SPAWN.Process(target=subscriber, args=(peer, address, ready, done), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError(f"the {peer} subscriber did not start")
        yield
    finally:
        done.set()
        proc.join(10)
        h.stop_processes([proc])


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def batch_runner(peer: Peer, op: str, keys: list[str], value: Any, batch: int) -> Any:
    n = len(keys)
    if op == "get":
        get = peer.get

        def run(i: int) -> int:
            base = i * batch
            for j in range(batch):
                get(keys[(base + j) % n])
            return batch

    elif op == "set":
        set_ = peer.set

        def run(i: int) -> int:
            base = i * batch
            for j in range(batch):
                set_(keys[(base + j) % n], value)
            return batch

    else:
        publish = peer.publish

        def run(i: int) -> int:
            for _ in range(batch):
                publish(CHANNEL, value)
            return batch

    return run


def measure(peers: list[Peer], op: str, kind: str, plan: Plan) -> list[h.Row]:
    """The peers take turns, ``plan.rounds`` times each, on the same operation."""
    value = make_value(kind)
    keys = [f"bench:{kind}:{i}" for i in range(plan.keys)]
    samples = {peer.name: h.Samples() for peer in peers}
    for _ in range(plan.rounds):
        for peer in peers:
            run = batch_runner(peer, op, keys, value, plan.batch)
            samples[peer.name].extend(
                h.time_batches(run, duration_s=plan.round_s, min_batches=10, warmup_batches=2)
            )
    return [
        h.Row.from_stats(name, op, kind, h.summarize(s), batch=plan.batch)
        for name, s in samples.items()
    ]


def preload(peers: list[Peer], plan: Plan) -> None:
    for peer in peers:
        for kind in KINDS:
            value = make_value(kind)
            for i in range(plan.keys):
                peer.set(f"bench:{kind}:{i}", value)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def find(rows: Sequence[h.Row], peer: str, op: str, kind: str) -> h.Row | None:
    return next((r for r in rows if (r.peer, r.op, r.kind) == (peer, op, kind)), None)


def slowdown(rows: Sequence[h.Row], op: str, kind: str) -> float:
    """sharedkv-on-Redis latency / plain redis-py latency (median)."""
    ours, plain = find(rows, OURS, op, kind), find(rows, PLAIN, op, kind)
    if ours is None or plain is None:
        return float("nan")
    return ours.p50_us / plain.p50_us


def results_table(rows: Sequence[h.Row]) -> tuple[list[str], list[list[object]]]:
    headers = ["op", "value", "peer", "p50 µs", "p90 µs", "ops/s", "÷ redis-py", "÷ shm"]
    out: list[list[object]] = []
    for op in OPS:
        for kind, label in KINDS.items():
            plain, shm = find(rows, PLAIN, op, kind), find(rows, SHM, op, kind)
            for peer in PEERS:
                row = find(rows, peer, op, kind)
                if row is None:
                    continue
                out.append([
                    op, label, peer, row.p50_us, row.p90_us, row.ops_per_s,
                    row.p50_us / plain.p50_us if plain else float("nan"),
                    row.p50_us / shm.p50_us if shm else float("nan"),
                ])  # fmt: skip
    return headers, out


@dataclass
class Check:
    name: str
    measured: float
    bar: bool = True  # False: reported for information, not part of the bar

    @property
    def passed(self) -> bool:
        return not self.bar or (self.measured == self.measured and self.measured <= BAR)

    def line(self) -> str:
        if not self.bar:
            return f"[INFO] {self.name}: {self.measured:.2f}x redis-py (no bar: see the docstring)"
        verdict = "PASS" if self.passed else "FAIL"
        return f"[{verdict}] {self.name}: {self.measured:.2f}x redis-py (need <= {BAR:g}x)"


def checks(rows: Sequence[h.Row]) -> list[Check]:
    """The bar covers get, set and publish; publishing to a live subscriber is information."""
    return [
        Check(f"{op} {KINDS[kind]}", slowdown(rows, op, kind), bar=op in BAR_OPS)
        for op in OPS
        for kind in KINDS
        if find(rows, OURS, op, kind) is not None
    ]


def library_versions(server_version: str) -> dict[str, str]:
    from importlib import metadata

    out = {"redis-server": server_version}
    for dist in ("sharedkv", "redis", "hiredis", "lmdb"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@dataclass
class Report:
    machine: dict[str, str]
    versions: dict[str, str]
    command: str
    plan: Plan
    notes: list[str]
    rows: list[h.Row]

    def print_text(self) -> None:
        print("\nLatency per operation (median and p90 of batch means) and throughput;")
        print("÷ columns: this peer's median latency over redis-py's / shm's")
        print(h.format_table(*results_table(self.rows)))
        print("\nBars (sharedkv on Redis against plain redis-py)")
        for check in checks(self.rows):
            print("  " + check.line())

    def markdown(self) -> str:
        m = self.machine
        parts = [
            f"Run on {m['date']}: {m['cpu']}, {m['cores']}, {m['memory']} RAM, "
            f"{m['python']}, {m['kernel']}.",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()) + ".",
            f"Command: `{self.command}`",
            "",
            *(f"- {note}" for note in self.notes),
            "",
            h.format_markdown(*results_table(self.rows)),
            "",
            *(f"- {check.line()}" for check in checks(self.rows)),
        ]
        return "\n".join(parts) + "\n"

    def json_payload(self) -> dict[str, Any]:
        return {
            "benchmark": "redis",
            "machine": self.machine,
            "versions": self.versions,
            "command": self.command,
            "plan": self.plan,
            "notes": self.notes,
            "rows": self.rows,
            "bars": [{"name": c.name, "slowdown": c.measured, "limit": BAR if c.bar else None,
                      "passed": c.passed} for c in checks(self.rows)],
        }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short rounds; a smoke test")
    parser.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown here")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if a bar fails")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Report:
    if not h.RedisServer.available():
        raise SystemExit("redis-server is not installed: nothing to compare against")
    plan = Plan.quick() if args.quick else Plan.full()
    machine = h.machine_info()
    print("Machine")
    h.print_machine(machine)
    load_before = os.getloadavg()[0]
    notes = [
        f"batches of {plan.batch} operations; {plan.rounds} rounds of {plan.round_s} s per peer "
        f"and operation, peers taking turns; {plan.keys:,} keys per value kind",
        f"perf_counter_ns costs {h.timer_overhead_ns():.0f} ns",
    ]
    rows: list[h.Row] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(h.RedisServer())
        ours_url = f"redis://127.0.0.1:{server.port}/0?namespace=bench"
        shm_url = f"shm://bench-redis-{os.getpid()}"
        peers = []
        for peer, close in (
            sharedkv_peer(OURS, ours_url),
            redis_py_peer(server.port),
            sharedkv_peer(SHM, shm_url),
        ):
            stack.callback(close)
            peers.append(peer)
        print("\npreloading ...", flush=True)
        preload(peers, plan)
        for op in OPS[:3]:
            for kind, label in KINDS.items():
                print(f"{op} {label} ...", flush=True)
                rows += measure(peers, op, kind, plan)
        addresses = {OURS: ours_url, PLAIN: str(server.port), SHM: shm_url}
        for kind, label in KINDS.items():
            print(f"{OPS[3]} {label} ...", flush=True)
            rows += measure_subscribed(peers, addresses, kind, plan)
        versions = library_versions(server.version)
    notes.append(
        f"1-min load average: {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after"
    )
    command = shlex.join(["python", *sys.argv])
    return Report(machine, versions, command, plan, notes, rows)


def measure_subscribed(
    peers: list[Peer], addresses: dict[str, str], kind: str, plan: Plan
) -> list[h.Row]:
    """Publishing while a subscriber process of the same peer receives every message.

    One subscriber at a time (they would compete for the two cores otherwise), so each peer
    is measured in its own block of rounds.
    """
    rows = []
    for peer in peers:
        with subscribed(peer.name, addresses[peer.name]):
            time.sleep(0.2)
            rows += measure([peer], OPS[3], kind, plan)
    return rows


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
    failed = not all(check.passed for check in checks(report.rows))
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
