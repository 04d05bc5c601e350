"""The ``sharedkv`` command, run for real (``python -m sharedkv``) in subprocesses, against stores
that other processes created and hold open."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import sharedkv
from sharedkv._backends import shm

TIMEOUT = 30

# A process that creates the stores named on its command line, writes to them, holds a lock and
# stays attached until its stdin closes. With a second argument, stores live under that root.
HOLDER = """
import sys
if len(sys.argv) > 2:
    import sharedkv._backends.shm as shm
    shm.root_dir = lambda: sys.argv[2]
import sharedkv

class Opaque:
    pass

stores = [sharedkv.Store(url) for url in sys.argv[1].split(",")]
for store in stores:
    store.set("greeting", "hello")
    store.set("config", {"lang": "en", "sizes": [1, 2], "pair": (3, 4)})
    store.set("hits", 41)
    store.set("session", "abc", ttl=300)
    store.set("opaque", Opaque())  # only processes that can import Opaque can read it
lock = stores[0].lock("jobs")
lock.acquire()
print("ready", flush=True)
sys.stdin.read()
lock.release()
for store in stores:
    store.close()
"""

# The command, with this user's stores looked for under another root (argv[1]).
ISOLATED_CLI = """
import sys
from pathlib import Path
import sharedkv._backends.shm as shm
shm.root_dir = lambda: sys.argv[1]
from sharedkv import _cli
_cli._SOURCE_ROOT = Path(sys.argv[1])
sys.exit(_cli.main(sys.argv[2:]))
"""

FAKE_BENCH = """
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
parser.add_argument("--json")
args = parser.parse_args()
print("measuring sharedkv and redis-py ...", flush=True)
rows = [
    {"peer": "sharedkv", "op": "get", "kind": "str", "ops_per_s": 1000000.0},
    {"peer": "redis-py", "op": "get", "kind": "str", "ops_per_s": 40000.0},
    {"peer": "sharedkv", "op": "set", "kind": "str", "ops_per_s": 100000.0},
    {"peer": "redis-py", "op": "set", "kind": "str", "ops_per_s": 200000.0},
    {"peer": "sharedkv", "benchmark": "handoff", "metric": "p50", "value": 2.0, "unit": "us"},
    {"peer": "filelock", "benchmark": "handoff", "metric": "p50", "value": 10.0, "unit": "us"},
    {"peer": "sharedkv", "benchmark": "handoff", "metric": "count", "value": 9, "unit": "handoffs"},
]
bars = [{"name": "get vs redis", "measured": 25.0, "required": 10, "passed": True}]
with open(args.json, "w") as f:
    json.dump({"benchmark": "fake", "quick": args.quick, "rows": rows, "bars": bars}, f)
"""

BROKEN_BENCH = """
import sys
print("boom: the peer would not start", flush=True)
sys.exit(3)
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SHAREDKV_STORE", "COLUMNS")}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sharedkv", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env if env is not None else clean_env(),
    )


def run_isolated(
    root: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ISOLATED_CLI, str(root), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env if env is not None else clean_env(),
        cwd=cwd,
    )


def assert_clean_error(
    result: subprocess.CompletedProcess[str], code: int, text: str, usage: bool = False
) -> None:
    """Failed with ``code`` and one line on stderr (a usage message, from the parser)."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert text in result.stderr
    if usage:
        assert result.stderr.startswith("Usage: sharedkv"), result.stderr
    else:
        assert result.stderr.count("\n") == 1, result.stderr


@contextlib.contextmanager
def sigint_default() -> Iterator[None]:
    # Children inherit an ignored SIGINT (pytest started in the background by a shell); the
    # interrupt tests need the ordinary disposition.
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous == signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def streaming(*args: str) -> Iterator[subprocess.Popen[str]]:
    """A streaming command, started and ready (it has announced itself on stderr)."""
    with sigint_default():
        proc = subprocess.Popen(
            [sys.executable, "-m", "sharedkv", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
    with proc:
        try:
            assert proc.stderr is not None
            ready = proc.stderr.readline()
            assert "Ctrl-C to stop" in ready, ready + proc.stderr.read()
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=TIMEOUT)


@dataclass
class Holder:
    name: str
    pid: int

    @property
    def url(self) -> str:
        return f"shm://{self.name}"


@contextlib.contextmanager
def holding(urls: list[str], root: Path | None = None) -> Iterator[int]:
    """Another process holding ``urls`` open (with data and a lock); yields its pid."""
    argv = [sys.executable, "-c", HOLDER, ",".join(urls), *([str(root)] if root else [])]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env()
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            yield proc.pid
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def held() -> Iterator[Holder]:
    name = f"cli-{uuid.uuid4().hex[:12]}"
    try:
        with holding([f"shm://{name}?keep=1"]) as pid:
            yield Holder(name, pid)
    finally:
        deadline = time.monotonic() + 10
        while True:  # kept on purpose: remove it once every command has let go
            try:
                shm.destroy(name)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def as_json(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- listing ------------------------------------------------------------------------------------
def test_ls_lists_the_store_with_its_creator_and_holder(held: Holder) -> None:
    entries = as_json(run("ls", "--json"))
    assert isinstance(entries, list)
    mine = next(e for e in entries if e["name"] == held.name)
    assert mine["url"] == held.url
    assert mine["status"] == "live"
    assert mine["keep"] is True
    assert mine["creator"] == held.pid
    assert held.pid in mine["processes"]
    assert mine["keys"] >= 4
    assert mine["size"] > 0
    assert isinstance(mine["created"], float)

    table = run("ls")
    assert table.returncode == 0
    line = next(row for row in table.stdout.splitlines() if row.startswith(held.name + " "))
    assert "live" in line
    assert str(held.pid) in line


def test_ls_marks_stale_and_kept_stores(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    ghost = root / "ghost"  # what a crashed process leaves: files, and nobody attached
    ghost.mkdir()
    (ghost / "attach.lock").touch()
    (ghost / "info.json").write_text(
        json.dumps({"id": "0", "name": "ghost", "url": "shm://ghost", "creator": 1, "keep": False})
    )
    with holding(["shm://alive"], root):
        entries = json.loads(run_isolated(root, "ls", "--json").stdout)
        table = run_isolated(root, "ls").stdout
    assert {e["name"]: e["status"] for e in entries} == {"alive": "live", "ghost": "stale"}
    assert next(e for e in entries if e["name"] == "ghost")["keys"] is None
    assert any(line.startswith("ghost") and "stale" in line for line in table.splitlines())
    empty = run_isolated(root, "ls")  # the holder has gone; the ghost is still there
    assert "alive" not in empty.stdout


def test_ls_without_stores_exits_1(tmp_path: Path) -> None:
    assert_clean_error(run_isolated(tmp_path, "ls"), 1, "no stores")


# -- keys and values ----------------------------------------------------------------------------
def test_get_shows_values_readably_and_as_json(held: Holder) -> None:
    pretty = run("get", "config", "--store", held.name)
    assert pretty.returncode == 0, pretty.stderr
    assert pretty.stdout == "{'lang': 'en', 'sizes': [1, 2], 'pair': (3, 4)}\n"
    assert as_json(run("get", "config", "--json", "-s", held.name)) == {
        "lang": "en",
        "sizes": [1, 2],
        "pair": [3, 4],
    }
    assert run("-s", held.url, "get", "greeting").stdout == "'hello'\n"
    assert run("-s", held.url, "get", "greeting", "--raw").stdout == "hello\n"
    assert run("--store", held.name, "get", "hits").stdout == "41\n"


def test_set_parses_json_then_python_literals(held: Holder) -> None:
    cases: dict[str, object] = {
        '{"a": [1, null, true]}': {"a": [1, None, True]},
        "(1, 'two', b'3')": (1, "two", b"3"),
        "{1, 2}": {1, 2},
        '"quoted"': "quoted",
        "2.5": 2.5,
    }
    for index, text in enumerate(cases):
        assert run("set", f"v:{index}", text, "-s", held.name).stdout == "OK\n"
    assert run("set", "v:raw", "plain words", "--string", "-s", held.name).returncode == 0
    with sharedkv.Store(f"{held.url}?create=0") as reader:  # what other programs see
        assert [reader.get(f"v:{i}") for i in range(len(cases))] == list(cases.values())
        assert reader.get("v:raw") == "plain words"


def test_malformed_value_is_a_usage_error(held: Holder) -> None:
    result = run("set", "v:bad", "hello", "-s", held.name)
    assert_clean_error(result, 2, "--string")
    assert run("get", "v:bad", "-s", held.name).returncode == 1
    assert_clean_error(run("publish", "chan", "{oops", "-s", held.name), 2, "JSON")


def test_ttl_expire_and_persist(held: Holder) -> None:
    assert run("set", "t:key", "1", "--ttl", "100", "-s", held.name).returncode == 0
    remaining = float(run("ttl", "t:key", "-s", held.name).stdout)
    assert 90 < remaining <= 100
    assert run("persist", "t:key", "-s", held.name).stdout == "OK\n"
    assert run("ttl", "t:key", "-s", held.name).stdout == "none\n"
    assert as_json(run("ttl", "t:key", "--json", "-s", held.name)) is None
    assert run("expire", "t:key", "50", "-s", held.name).stdout == "OK\n"
    later = as_json(run("ttl", "t:key", "--json", "-s", held.name))
    assert isinstance(later, float) and 40 < later <= 50
    assert run("expire", "t:key", "0.2", "-s", held.name).stdout == "OK\n"
    time.sleep(0.3)
    assert_clean_error(run("ttl", "t:key", "-s", held.name), 1, "no key 't:key'")
    assert_clean_error(run("expire", "t:key", "5", "-s", held.name), 1, "no key")
    assert_clean_error(run("expire", "greeting", "-1", "-s", held.name), 2, "ttl")


def test_del_and_keys(held: Holder) -> None:
    for key in ("k:a", "k:b", "k:c"):
        assert run("set", key, "1", "-s", held.name).returncode == 0
    assert run("keys", "k:*", "-s", held.name).stdout == "k:a\nk:b\nk:c\n"
    assert as_json(run("keys", "k:[ab]", "--json", "-s", held.name)) == ["k:a", "k:b"]
    assert "greeting" in run("keys", "-s", held.name).stdout.split()
    deleted = run("del", "k:a", "k:b", "k:missing", "-s", held.name)
    assert (deleted.returncode, deleted.stdout) == (0, "2\n")
    nothing = run("del", "k:a", "-s", held.name)
    assert (nothing.returncode, nothing.stdout) == (1, "0\n")
    assert run("keys", "k:*", "-s", held.name).stdout == "k:c\n"
    assert run("keys", "nothing:*", "-s", held.name).returncode == 1
    assert_clean_error(run("keys", "k:[a", "-s", held.name), 2, "bracket")


def test_incr(held: Holder) -> None:
    assert run("incr", "hits", "-s", held.name).stdout == "42\n"
    assert run("incr", "hits", "10", "-s", held.name).stdout == "52\n"
    assert run("incr", "hits", "-52", "-s", held.name).stdout == "0\n"
    assert run("incr", "i:new", "-s", held.name).stdout == "1\n"
    assert_clean_error(run("incr", "greeting", "-s", held.name), 2, "not an integer")
    bad_amount = run("incr", "hits", "lots", "-s", held.name)
    assert_clean_error(bad_amount, 2, "'lots' is not a valid integer", usage=True)


def test_missing_key_exits_1(held: Holder) -> None:
    assert_clean_error(run("get", "no-such-key", "-s", held.name), 1, "no key 'no-such-key'")
    assert run("get", "no-such-key", "--json", "-s", held.name).stdout == ""


def test_value_this_process_cannot_decode_exits_1(held: Holder) -> None:
    assert_clean_error(run("get", "opaque", "-s", held.name), 1, "Opaque")
    assert "opaque" in run("keys", "-s", held.name).stdout.split()


def test_default_store_from_the_environment(held: Holder) -> None:
    result = run("get", "greeting", env=clean_env(SHAREDKV_STORE=held.url))
    assert (result.returncode, result.stdout) == (0, "'hello'\n")


# -- messages and changes -----------------------------------------------------------------------
def test_publish_reaches_a_subscriber_in_another_process(held: Holder) -> None:
    with streaming("subscribe", "orders.*", "--json", "--count", "2", "-s", held.name) as sub:
        assert sub.stdout is not None
        first = run("publish", "orders.new", '{"id": 1}', "-s", held.name)
        assert (first.returncode, first.stdout) == (0, "1\n")
        assert json.loads(sub.stdout.readline()) == {
            "type": "message",
            "channel": "orders.new",
            "seq": 1,
            "pattern": "orders.*",
            "data": {"id": 1},
        }
        assert run("publish", "elsewhere", "1", "-s", held.name).stdout == "0\n"
        assert run("publish", "orders.raw", "x y", "--string", "-s", held.name).stdout == "1\n"
        assert json.loads(sub.stdout.readline())["data"] == "x y"
        assert sub.wait(timeout=TIMEOUT) == 0  # --count 2 reached


def test_subscribe_prints_lines_and_exits_130_on_ctrl_c(held: Holder) -> None:
    with streaming("subscribe", "news", "-s", held.name) as sub:
        assert sub.stdout is not None
        assert run("publish", "news", "(1, 'a')", "-s", held.name).stdout == "1\n"
        assert sub.stdout.readline() == "news #1 (1, 'a')\n"
        sub.send_signal(signal.SIGINT)
        assert sub.wait(timeout=TIMEOUT) == 130
        assert sub.stderr is not None
        assert "Traceback" not in sub.stderr.read()


def test_watch_streams_changes_and_replays_from_a_revision(held: Holder) -> None:
    start = as_json(run("stats", "--json", "-s", held.name))["revision"]  # type: ignore[index]
    with streaming("watch", "w:*", "--json", "-s", held.name) as watch:
        assert watch.stdout is not None
        assert run("set", "w:1", "[1, 2]", "-s", held.name).returncode == 0
        assert run("del", "w:1", "-s", held.name).returncode == 0
        changes = [json.loads(watch.stdout.readline()) for _ in range(2)]
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=TIMEOUT) == 143
    assert [(c["type"], c["key"], c["value"]) for c in changes] == [
        ("set", "w:1", [1, 2]),
        ("delete", "w:1", None),
    ]
    assert changes[1]["revision"] == changes[0]["revision"] + 1
    replay = run("watch", "w:*", "--since", str(start), "--count", "2", "-s", held.name)
    assert replay.returncode == 0, replay.stderr
    lines = replay.stdout.splitlines()
    assert lines == [
        f"rev {changes[0]['revision']} set w:1 [1, 2]",
        f"rev {changes[1]['revision']} delete w:1",
    ]


# -- statistics ---------------------------------------------------------------------------------
def test_stats_reports_counters_locks_and_processes(held: Holder) -> None:
    stats = as_json(run("stats", "--json", "-s", held.name))
    assert isinstance(stats, dict)
    assert stats["url"] == held.url
    assert stats["keys"] >= 4
    assert stats["revision"] >= 4
    assert stats["bytes_used"] > 0
    assert stats["locks_held"] == 1
    assert [h["pid"] for h in stats["lock_holders"]["jobs"]] == [held.pid]
    assert held.pid in stats["attached"]
    assert os.getpid() not in stats["attached"]
    for field in ("messages_published", "messages_dropped"):
        assert isinstance(stats[field], int)
    text = run("stats", "-s", held.name).stdout
    assert f"jobs: pid {held.pid}" in text
    for label in ("keys", "revision", "messages published", "locks held", "processes attached"):
        assert label in text


# -- errors -------------------------------------------------------------------------------------
def test_unknown_store_exits_3_and_creates_nothing() -> None:
    name = f"cli-missing-{uuid.uuid4().hex[:8]}"
    assert_clean_error(run("get", "x", "-s", name), 3, f"no store at shm://{name}")
    assert_clean_error(run("stats", "-s", f"shm://{name}"), 3, "sharedkv ls")
    assert not os.path.exists(os.path.join(shm.root_dir(), name))


def test_usage_errors_exit_2(held: Holder) -> None:
    assert_clean_error(run("get", "x", "-s", "memory://"), 2, "private to one process")
    assert_clean_error(run("get", "", "-s", held.name), 2, "empty")
    assert_clean_error(run("get", "x", "-s", "bad name!"), 2, "invalid store name")
    assert_clean_error(run("get", "x", "-s", "ftp://host"), 2, "unsupported store address")
    assert_clean_error(run("frobnicate"), 2, "No such command", usage=True)
    assert_clean_error(run("get"), 2, "Missing argument 'KEY'", usage=True)
    helped = run("--help")
    assert helped.returncode == 0
    for command in ("ls", "get", "set", "del", "keys", "subscribe", "watch", "stats", "bench"):
        assert command in helped.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("sharedkv._backends.redis") is None
    or importlib.util.find_spec("redis") is None,
    reason="the Redis backend is not installed",
)
def test_unreachable_redis_exits_4() -> None:
    result = run("get", "x", "-s", "redis://127.0.0.1:1/0")
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.redis
@pytest.mark.skipif(
    importlib.util.find_spec("sharedkv._backends.redis") is None
    or importlib.util.find_spec("redis") is None,
    reason="the Redis backend is not installed",
)
def test_works_against_redis(request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("redis_server")
    url = f"{server.url}?namespace=cli-{uuid.uuid4().hex[:8]}"
    assert run("set", "r:1", "{'a': 1}", "-s", url).returncode == 0
    assert run("get", "r:1", "-s", url).stdout == "{'a': 1}\n"
    assert run("incr", "r:n", "5", "-s", url).stdout == "5\n"
    assert run("keys", "r:*", "--json", "-s", url).stdout.strip() == '["r:1", "r:n"]'
    assert run("stats", "-s", url).returncode == 0
    assert run("del", "r:1", "r:n", "-s", url).stdout == "2\n"


# -- choosing the store without --store ---------------------------------------------------------
def test_without_store_zero_one_or_several(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    assert_clean_error(run_isolated(root, "get", "greeting"), 3, "no store is running")
    with holding(["shm://solo"], root):
        only = run_isolated(root, "get", "greeting")
        assert (only.returncode, only.stdout) == (0, "'hello'\n")
        gone = run_isolated(root, "get", "hits", env=clean_env(SHAREDKV_STORE="shm://gone"))
        assert (gone.returncode, gone.stdout) == (0, "41\n")
        assert "$SHAREDKV_STORE names shm://gone, which no longer exists" in gone.stderr
        with holding(["shm://second", "shm://third"], root):
            several = run_isolated(root, "keys")
            assert_clean_error(several, 2, "3 stores are running (second, solo, third)")
            chosen = run_isolated(root, "get", "hits", env=clean_env(SHAREDKV_STORE="shm://third"))
            assert (chosen.returncode, chosen.stdout) == (0, "41\n")


# -- demo and benchmarks ------------------------------------------------------------------------
def test_demo() -> None:
    result = run("demo", "--workers", "2", "--increments", "500")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "counter = 1,000 (expected 2 x 500 = 1,000)" in result.stdout
    assert "OK: nothing lost" in result.stdout


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "benchmarks"
    directory.mkdir()
    (directory / "bench_fake.py").write_text(FAKE_BENCH)
    (directory / "bench_broken.py").write_text(BROKEN_BENCH)
    return directory


def test_bench_runs_scripts_tabulates_ratios_and_draws_a_chart(
    bench_dir: Path, tmp_path: Path
) -> None:
    chart, results = tmp_path / "chart.png", tmp_path / "results.json"
    result = run(
        "bench", "fake", "--quick", "--dir", str(bench_dir), "--out", str(chart),
        "--json", str(results),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "25.00x" in result.stdout  # get: 1,000,000 / 40,000 ops/s
    assert "0.50x" in result.stdout  # set: sharedkv slower
    assert "5.00x" in result.stdout  # handoff p50: 10 us for the peer, 2 us for sharedkv
    assert "handoffs" not in result.stdout  # counts are not compared
    assert "vs redis-py" in result.stdout
    assert "PASS" in result.stdout
    assert "measuring sharedkv" in result.stderr  # progress
    assert json.loads(results.read_text())["fake"]["quick"] is True
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_failures_and_missing_benchmarks(bench_dir: Path, tmp_path: Path) -> None:
    broken = run("bench", "broken", "--dir", str(bench_dir), "--out", str(tmp_path / "c.png"))
    assert broken.returncode == 1
    assert "boom: the peer would not start" in broken.stderr
    assert "benchmark(s) failed: broken" in broken.stderr
    assert_clean_error(run("bench", "nope", "--dir", str(bench_dir)), 2, "no benchmark named")
    elsewhere = tmp_path / "installed"
    elsewhere.mkdir()
    missing = run_isolated(elsewhere, "bench", "--quick", cwd=elsewhere)
    assert_clean_error(missing, 5, "the benchmarks ship with the source tree")
