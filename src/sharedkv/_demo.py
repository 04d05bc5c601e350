"""The main job: worker processes sharing state and messages through the default store."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from typing import TextIO

from ._backends.base import Message
from ._store import Store


def _worker(store: Store, index: int, increments: int) -> None:
    # Ephemeral: the registration vanishes when this worker exits or dies.
    store.set(f"worker:{index}", {"pid": os.getpid(), "state": "running"}, ephemeral=True)
    step = max(1, increments // 20)
    for done in range(1, increments + 1):
        store.incr("demo:counter")
        if done % step == 0:
            store.publish("demo.progress", (index, done))
    store.update("demo:finished", lambda names: [*names, index], default=[])
    store.publish("demo.done", index)


def run_demo(workers: int = 4, increments: int = 10_000, out: TextIO = sys.stdout) -> bool:
    """Run the demo; returns True when the shared counter is exactly workers x increments."""
    ctx = multiprocessing.get_context("spawn")
    with Store() as store:
        store.set("demo:counter", 0)
        store.set("demo:finished", [])
        progress = store.subscribe("demo.*")
        print(
            f"sharedkv demo: {workers} processes x {increments:,} atomic increments on one "
            f"shared counter\nstore: {store.url}  ({store.path})",
            file=out,
        )
        started = time.perf_counter()
        procs = [ctx.Process(target=_worker, args=(store, i, increments)) for i in range(workers)]
        for proc in procs:
            proc.start()
        done: dict[int, int] = {}
        finished: set[int] = set()
        deadline = time.monotonic() + 120
        while len(finished) < workers and time.monotonic() < deadline:
            try:
                event = progress.get(timeout=1.0)
            except TimeoutError:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if not isinstance(event, Message):
                continue
            if event.channel == "demo.done":
                finished.add(event.data)
            else:
                index, count = event.data
                done[index] = count
            bar = "  ".join(
                f"w{i}:{done.get(i, 0) * 100 // increments:3d}%" for i in range(workers)
            )
            print(f"\r{bar}  counter={store.get('demo:counter'):>9,}", end="", file=out, flush=True)
        for proc in procs:
            proc.join(timeout=30)
        elapsed = time.perf_counter() - started
        progress.close()
        total = store.get("demo:counter")
        expected = workers * increments
        alive = store.keys("worker:*")
        print(file=out)
        print(
            f"counter = {total:,} (expected {workers} x {increments:,} = {expected:,}) in "
            f"{elapsed:.2f} s, {expected / elapsed:,.0f} increments/s across processes",
            file=out,
        )
        print(f"workers finished: {sorted(store.get('demo:finished'))}", file=out)
        print(f"worker registrations left after exit (ephemeral keys): {alive}", file=out)
        ok = total == expected and not alive and all(p.exitcode == 0 for p in procs)
        print("OK: nothing lost" if ok else "FAILED: updates were lost", file=out)
        return ok
