"""The ``sharedkv`` command: look into and drive stores from a shell, as redis-cli does for Redis.

Every command that works on a store takes ``--store NAME|URL`` (before or after the command
name). Without it: ``$SHAREDKV_STORE`` when it names a store that still exists, else the only
store of this user on this machine. The command only attaches to stores, never creates one
(``shm://NAME?create=0``), so a typo cannot leave an empty store behind.

Exit codes, stable for scripts (see docs/cli.md)::

    0    success
    1    nothing there or failed: missing key, no key matched, no store to list, the demo or
         a benchmark failed
    2    usage error: bad option or argument, malformed value, invalid key, address or pattern,
         several stores and no --store
    3    the store does not exist
    4    the backend failed or cannot be reached (Redis down, store full, ...)
    5    something optional is missing: an extra (redis, matplotlib) or the benchmark scripts
    130  interrupted by Ctrl-C (SIGINT); how subscribe and watch normally end
    143  terminated by SIGTERM
"""

from __future__ import annotations

import ast
import collections
import contextlib
import functools
import json
import math
import os
import pprint
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec
from urllib.parse import unquote, urlsplit

import click
from rich.console import Console
from rich.highlighter import ReprHighlighter
from rich.table import Table
from rich.text import Text

from . import __version__
from ._backends import ENV_VAR, shm
from ._backends.base import Backend, Change, Gap, LockInfo, Message
from ._errors import (
    BackendError,
    ClosedError,
    MissingDependencyError,
    RevisionTooOldError,
    SerializationError,
    SharedKVError,
    StoreNotFoundError,
)
from ._errors import TimeoutError as WaitTimeout
from ._store import Store

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_STORE = 3
EXIT_BACKEND = 4
EXIT_MISSING = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

P = ParamSpec("P")

# The repository root when running from a source checkout (src/sharedkv/_cli.py -> root).
_SOURCE_ROOT = Path(__file__).resolve().parents[2]
_BASE_PEER = "sharedkv"


class CliError(Exception):
    """A failure to report as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the store is closed on the way out."""


# -- errors and exit codes ----------------------------------------------------------------------
def _fail(message: str, code: int) -> int:
    click.echo(f"sharedkv: {message}", err=True)
    return code


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, StoreNotFoundError):
        return EXIT_NO_STORE
    if isinstance(exc, (MissingDependencyError, ImportError)):
        return EXIT_MISSING
    if isinstance(exc, BackendError):
        return EXIT_BACKEND
    if isinstance(exc, SerializationError):
        return EXIT_FAILED  # a value this process cannot decode (its class is not importable)
    if isinstance(exc, (ValueError, TypeError)):
        return EXIT_USAGE  # invalid key, address or pattern; incr on a non-integer; bad ttl
    return EXIT_FAILED


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StoreNotFoundError):
        return f"{exc} (sharedkv ls lists the stores)"
    if isinstance(exc, RevisionTooOldError):
        return f"{exc}; the oldest revision still retained is {exc.oldest}"
    if isinstance(exc, KeyError):
        return f"no key {exc.args[0]!r}"
    return str(exc) or type(exc).__name__


def _silence_stdout() -> None:
    # The reader of our output went away: make the interpreter's final flush a no-op.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _guarded(func: Callable[P, int]) -> Callable[P, int]:
    """Turn the errors a command can meet into a one-line message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return func(*args, **kwargs)
        except CliError as exc:
            return _fail(str(exc), exc.code)
        except KeyboardInterrupt:
            if sys.stderr.isatty():
                click.echo(err=True)  # end the line the terminal's ^C echo started
            return EXIT_INTERRUPTED
        except _Terminated:
            return EXIT_TERMINATED
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_OK
        except (SharedKVError, ImportError, OSError) as exc:
            return _fail(_describe(exc), _exit_code(exc))

    return wrapper


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While streaming, SIGTERM ends the command like Ctrl-C does: cleanly, store closed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- output -------------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output is not squeezed into 80 columns unless COLUMNS says so.
    width = None if stream.isatty() or "COLUMNS" in os.environ else 160
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    return repr(key)


def _jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it; what JSON cannot express becomes its Python repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {_json_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        try:
            members = sorted(value)
        except TypeError:
            members = list(value)
        return [_jsonable(v) for v in members]
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return repr(bytes(value))
    return repr(value)


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _emit_json(value: Any) -> None:
    _emit(json.dumps(_jsonable(value), ensure_ascii=False))


def _show_value(value: Any, raw: bool) -> None:
    if raw and isinstance(value, str):
        _emit(value)
        return
    if raw and isinstance(value, (bytes, bytearray)):
        sys.stdout.buffer.write(bytes(value) + b"\n")
        sys.stdout.flush()
        return
    console = _console()
    text = pprint.pformat(value, width=console.width, sort_dicts=False)
    console.print(ReprHighlighter()(Text(text)), soft_wrap=True)


def _fmt_bytes(size: Any) -> str:
    if not isinstance(size, (int, float)):
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop always returns


def _fmt_time(stamp: Any) -> str:
    if not isinstance(stamp, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _fmt_pids(pids: Sequence[int] | None) -> str:
    if pids is None:
        return "?"
    return ", ".join(map(str, pids)) if pids else "-"


def _key_value_table(rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(Text(label), Text(value))
    return table


# -- choosing and opening a store ---------------------------------------------------------------
@dataclass
class _Settings:
    store: str | None = None


def _store_option(func: Callable[P, int]) -> Callable[P, int]:
    return click.option(
        "--store",
        "-s",
        "store",
        metavar="NAME|URL",
        default=None,
        help="The store: a name (shm://NAME) or an address such as redis://host:6379/0.",
    )(func)


def _json_option(func: Callable[P, int]) -> Callable[P, int]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def _attach_url(address: str) -> str:
    """The address to open, made attach-only for shared-memory and file stores."""
    if "://" not in address:
        address = f"shm://{address}"
    scheme = urlsplit(address).scheme.lower()
    if scheme == "memory":
        raise CliError("memory:// stores are private to one process: no command can reach one", 2)
    if scheme in ("shm", "file") and "create=" not in address:
        address += ("&" if "?" in address else "?") + "create=0"
    return address


def _status(info: dict[str, Any]) -> str:
    """live: processes are attached; kept: nobody is, but it was made to stay; stale: leftovers
    of processes that died, removed by the next sweep."""
    if info.get("live"):
        return "live"
    return "kept" if info.get("keep") else "stale"


def _usable_stores() -> list[dict[str, Any]]:
    return [info for info in shm.list_stores() if _status(info) != "stale"]


def _shm_name(address: str) -> str | None:
    parts = urlsplit(address)
    if parts.scheme.lower() != "shm":
        return None
    return unquote(parts.netloc + parts.path).strip("/")


def _default_address() -> str:
    stores = _usable_stores()
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        name = _shm_name(from_env)
        if name is None or name in {info.get("name") for info in stores}:
            return from_env
        click.echo(f"sharedkv: note: ${ENV_VAR} names {from_env}, which no longer exists", err=True)
    if len(stores) == 1:
        return str(stores[0]["url"])
    if not stores:
        raise CliError(
            "no store is running for this user on this machine: start a program that uses "
            "sharedkv, or name one with --store NAME|URL",
            EXIT_NO_STORE,
        )
    names = [str(info.get("name")) for info in stores]
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    raise CliError(f"{len(names)} stores are running ({shown}): choose one with --store NAME", 2)


def _address(option: str | None) -> str:
    ctx = click.get_current_context(silent=True)
    settings = ctx.find_object(_Settings) if ctx is not None else None
    chosen = option or (settings.store if settings is not None else None)
    return _attach_url(chosen or _default_address())


@contextlib.contextmanager
def _opened(option: str | None) -> Iterator[Store]:
    """The chosen store, closed afterwards; bad input to its methods is a usage error."""
    store = Store(_address(option))
    try:
        yield store
    except (ValueError, TypeError) as exc:
        if isinstance(exc, SharedKVError):
            raise
        raise CliError(str(exc), EXIT_USAGE) from exc
    finally:
        store.close()


# -- values -------------------------------------------------------------------------------------
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)


def _parse_value(text: str, as_string: bool) -> Any:
    """JSON, else a Python literal (tuples, bytes, sets, True/None...), else an error."""
    if as_string:
        return text
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except _LITERAL_ERRORS:
        pass
    raise CliError(
        f"cannot read {text!r} as JSON or as a Python literal: quote a string "
        f"(for example '\"{text}\"') or pass --string to store the text as it is",
        EXIT_USAGE,
    )


_string_option = click.option(
    "--string", "as_string", is_flag=True, help="Store the text as it is (no JSON or literal)."
)


# -- who is attached, how big ---------------------------------------------------------------------
def _attached_pids(directory: str) -> set[int] | None:
    """Processes holding the store's attach lock, read from /proc/locks (Linux); else None."""
    try:
        st = os.stat(os.path.join(directory, "attach.lock"))
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: set[int] = set()
    for line in lines:
        fields = line.split()
        if "FLOCK" not in fields or "->" in fields:
            continue
        at = fields.index("FLOCK")
        if len(fields) > at + 4 and fields[at + 4] == ident and fields[at + 3].isdigit():
            pids.add(int(fields[at + 3]))
    pids.discard(0)  # holders outside our pid namespace
    return pids


def _dir_size(directory: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _others(pids: Any) -> list[int]:
    """A pid list without this process (the command itself is never reported)."""
    return sorted({int(p) for p in pids or ()} - {os.getpid()})


def _peek(info: dict[str, Any], status: str) -> tuple[int | None, list[int] | None]:
    """Key count and attached processes as the store itself reports them."""
    if status == "stale" or "id" not in info:
        return None, None  # stale: looking would not change it; no id: still being created
    try:
        with Store(_attach_url(str(info["url"]))) as store:
            stats = store.stats()
    except Exception:  # it went away, or is being set up, while we looked: nothing to report
        return None, None
    attached = [*stats.get("processes", ()), *stats.get("readers", ())]
    return int(stats.get("keys", 0)), _others(attached)


def _describe_store(info: dict[str, Any]) -> dict[str, Any]:
    status = _status(info)
    path = str(info["path"])
    holders = _attached_pids(path)  # before attaching: the command does not count itself
    keys, reported = _peek(info, status)
    return {
        "name": info.get("name"),
        "url": info.get("url"),
        "status": status,
        "keep": bool(info.get("keep")),
        "creator": info.get("creator"),
        "created": info.get("created"),
        "path": path,
        "size": _dir_size(path),
        "keys": keys,
        "processes": _others(holders) if holders is not None else reported,
    }


def _stores_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for title in ("NAME", "URL", "STATUS", "KEYS", "SIZE", "PROCESSES", "CREATOR", "CREATED"):
        table.add_column(title, no_wrap=title != "PROCESSES")
    colours = {"live": "green", "kept": "cyan", "stale": "red"}
    for row in rows:
        table.add_row(
            Text(str(row["name"])),
            Text(str(row["url"])),
            Text(row["status"], style=colours[row["status"]]),
            Text("-" if row["keys"] is None else str(row["keys"])),
            Text(_fmt_bytes(row["size"])),
            Text(_fmt_pids(row["processes"])),
            Text(str(row["creator"] or "-")),
            Text(_fmt_time(row["created"])),
        )
    return table


# -- locks ----------------------------------------------------------------------------------------
def _lock_names(backend: Backend) -> list[str] | None:
    """Names of the locks held, where the backend can tell."""
    public = getattr(backend, "lock_names", None)
    if callable(public):
        return sorted(public())
    env, db = getattr(backend, "_env", None), getattr(backend, "_locks", None)
    if env is None or db is None:
        return None
    try:  # the shared-memory layout: lock name, NUL, holder
        with env.begin(db=db) as txn:
            raw = {bytes(k).split(b"\0", 1)[0] for k in txn.cursor().iternext(values=False)}
    except Exception:
        return None
    return sorted(name.decode(errors="replace") for name in raw)


def _lock_holders(store: Store) -> dict[str, list[LockInfo]] | None:
    names = _lock_names(store.backend)
    if names is None:
        return None
    holders = {name: store.backend.lock_owners(name) for name in names}
    return {name: owners for name, owners in holders.items() if owners}


def _holder_json(owner: LockInfo) -> dict[str, Any]:
    return {"pid": owner.pid, "thread": owner.thread_name, "since": owner.since}


def _holder_text(owner: LockInfo) -> str:
    held = max(0.0, time.time() - owner.since)
    return f"pid {owner.pid} ({owner.thread_name}, {held:.1f} s)"


def _holders_text(holders: dict[str, list[LockInfo]]) -> str:
    parts = [f"{name}: {', '.join(map(_holder_text, owners))}" for name, owners in holders.items()]
    return "; ".join(parts) or "-"


# -- streams --------------------------------------------------------------------------------------
def _event_json(event: Message | Change | Gap) -> dict[str, Any]:
    if isinstance(event, Message):
        return {
            "type": "message",
            "channel": event.channel,
            "seq": event.seq,
            "pattern": event.pattern,
            "data": event.data,
        }
    if isinstance(event, Change):
        return {
            "type": event.kind,
            "key": event.key,
            "revision": event.revision,
            "value": event.value,
        }
    return {
        "type": "gap",
        "channel": event.channel,
        "first_seq": event.first_seq,
        "last_seq": event.last_seq,
        "count": event.count,
    }


def _event_line(event: Message | Change | Gap) -> str:
    if isinstance(event, Message):
        return f"{event.channel} #{event.seq} {event.data!r}"
    if isinstance(event, Change):
        line = f"rev {event.revision} {event.kind} {event.key}"
        return f"{line} {event.value!r}" if event.kind == "set" else line
    return (
        f"gap {event.channel}: {event.count} lost (#{event.first_seq}..#{event.last_seq}), "
        "this reader fell behind"
    )


def _stream(
    next_event: Callable[[float], Message | Change | Gap], as_json: bool, count: int | None
) -> int:
    """Print events as they come, one line each (flushed), until ``count`` or an interrupt."""
    shown = 0
    while count is None or shown < count:
        try:
            event = next_event(5.0)
        except WaitTimeout:
            continue
        except ClosedError:
            return EXIT_FAILED
        if as_json:
            _emit_json(_event_json(event))
        else:
            _emit(_event_line(event))
        if not isinstance(event, Gap):
            shown += 1
    return EXIT_OK


def _ready(message: str) -> None:
    click.echo(message, err=True)
    sys.stderr.flush()


_count_option = click.option(
    "--count",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many events (default: run until Ctrl-C).",
)


# -- benchmarks -----------------------------------------------------------------------------------
def _find_benchmarks(explicit: str | None) -> Path:
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = [_SOURCE_ROOT / "benchmarks", Path.cwd() / "benchmarks"]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("bench_*.py")):
            return candidate
    if explicit is not None:
        raise CliError(f"no benchmark scripts (bench_*.py) in {explicit}", EXIT_USAGE)
    raise CliError(
        "the benchmarks ship with the source tree, not with the installed package: run this "
        "from a checkout of sharedkv (they live in its benchmarks/ directory), or pass --dir",
        EXIT_MISSING,
    )


def _select_scripts(directory: Path, names: Sequence[str]) -> list[Path]:
    scripts = sorted(directory.glob("bench_*.py"))
    if not names:
        return scripts
    wanted = {n.removeprefix("bench_").removesuffix(".py") for n in names}
    chosen = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    missing = wanted - {s.stem.removeprefix("bench_") for s in chosen}
    if missing:
        known = ", ".join(s.stem.removeprefix("bench_") for s in scripts)
        raise CliError(f"no benchmark named {', '.join(sorted(missing))} (there are: {known})", 2)
    return chosen


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_script(
    script: Path, quick: bool, out: Path, progress: Callable[[str], None]
) -> tuple[int, list[str]]:
    """Run one benchmark script; its exit code and the last lines it printed."""
    command = [
        sys.executable,
        "-u",
        str(script),
        *(["--quick"] if quick else []),
        "--json",
        str(out),
    ]
    tail: collections.deque[str] = collections.deque(maxlen=25)
    with subprocess.Popen(
        command,
        cwd=script.parent.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                progress(line.rstrip())
            return proc.wait(), list(tail)
        except BaseException:
            _stop(proc)
            raise


@contextlib.contextmanager
def _progress(err: Console, label: str) -> Iterator[Callable[[str], None]]:
    if not err.is_terminal:
        err.print(Text(f"{label} ...", style="bold"))
        yield lambda line: err.print(Text(line, style="dim"), soft_wrap=True)
        return
    with err.status(Text(f"{label} ...")) as status:

        def update(line: str) -> None:
            if line.strip():
                status.update(Text(f"{label}: {line.strip()[: err.width - len(label) - 8]}"))

        yield update


@dataclass
class _Comparison:
    """One measurement of sharedkv (``ours``, the peer it is measured as) against its peers.

    ``ratios``: how many times better sharedkv did than each peer: its rate divided by theirs,
    or for times (latencies), their time divided by its time. Above 1: sharedkv is better."""

    bench: str
    what: str
    detail: str
    ours: str
    ratios: dict[str, float]


_TIME_UNITS = {"ns", "us", "µs", "ms", "s"}


def _measurement(row: Any) -> tuple[str, str, str, float, bool] | None:
    """(what, detail, peer, value, higher is better) from a row of either result schema."""
    if not isinstance(row, dict) or not isinstance(row.get("peer"), str):
        return None
    if isinstance(row.get("ops_per_s"), (int, float)):  # op, kind, ops_per_s, latencies
        return str(row.get("op", "")), str(row.get("kind", "")), row["peer"], row["ops_per_s"], True
    value, unit = row.get("value"), str(row.get("unit", ""))
    if not isinstance(value, (int, float)) or not (unit.endswith("/s") or unit in _TIME_UNITS):
        return None  # counts (messages, handoffs...) are not compared
    what = f"{row.get('benchmark', '')} {row.get('metric', '')}".strip()
    return what, unit, row["peer"], float(value), unit.endswith("/s")


def _base_peer(peers: Sequence[str]) -> str | None:
    if _BASE_PEER in peers:
        return _BASE_PEER
    return next((p for p in peers if p.startswith(_BASE_PEER)), None)


def _comparisons(bench: str, payload: dict[str, Any]) -> list[_Comparison]:
    groups: dict[tuple[str, str], dict[str, tuple[float, bool]]] = {}
    for row in payload.get("rows") or []:
        found = _measurement(row)
        if found is not None and math.isfinite(found[3]) and found[3] > 0:
            groups.setdefault(found[:2], {})[found[2]] = found[3:]
    out = []
    for (what, detail), by_peer in groups.items():
        ours = _base_peer(list(by_peer))
        if ours is None:
            continue
        mine, higher_better = by_peer[ours]
        ratios = {
            peer: (mine / theirs if higher_better else theirs / mine)
            for peer, (theirs, _) in by_peer.items()
            if peer != ours
        }
        if ratios:
            out.append(_Comparison(bench, what, detail, ours, ratios))
    return out


def _peers(comparisons: Sequence[_Comparison]) -> list[str]:
    return list(dict.fromkeys(p for c in comparisons for p in c.ratios))


def _ratio_table(comparisons: Sequence[_Comparison]) -> Table:
    peers = _peers(comparisons)
    table = Table(
        title="times better than each peer: sharedkv's rate ÷ theirs, or their time ÷ sharedkv's"
        "  (> 1: sharedkv is better)",
        header_style="bold",
        box=None,
    )
    for title in ("benchmark", "measurement", "", "sharedkv as"):
        table.add_column(title)
    for peer in peers:
        table.add_column(f"vs {peer}", justify="right")
    for c in comparisons:
        cells = [_ratio_cell(c.ratios.get(p)) for p in peers]
        table.add_row(Text(c.bench), Text(c.what), Text(c.detail), Text(c.ours), *cells)
    return table


def _ratio_cell(value: float | None) -> Text:
    if value is None or math.isnan(value):
        return Text("-")
    return Text(f"{value:.2f}x", style="green" if value >= 1 else "red")


def _bar_text(bar: dict[str, Any]) -> str:
    if bar.get("detail"):
        return str(bar["detail"])
    numbers = {k: v for k, v in bar.items() if k not in ("name", "passed")}
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()
    )


def _print_bars(console: Console, payloads: dict[str, dict[str, Any]]) -> None:
    """The pass/fail targets the scripts checked."""
    verdicts = {True: ("PASS", "green"), False: ("FAIL", "red"), None: ("N/A ", "yellow")}
    for bench, payload in payloads.items():
        for bar in payload.get("bars") or []:
            if isinstance(bar, dict):
                word, colour = verdicts.get(bar.get("passed"), verdicts[None])
                line = f" {bench}: {bar.get('name')}: {_bar_text(bar)}"
                console.print(Text(word, style=colour) + Text(line), soft_wrap=True)


def _write_chart(comparisons: Sequence[_Comparison], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {peer: f"C{i % 10}" for i, peer in enumerate(_peers(comparisons))}
    fig, ax = plt.subplots(figsize=(min(60.0, max(6.0, 0.9 * len(comparisons) + 2)), 5.5))
    labelled: set[str] = set()
    for x, comparison in enumerate(comparisons):
        width = 0.8 / len(comparison.ratios)
        for i, (peer, ratio) in enumerate(comparison.ratios.items()):
            # Bars grow from 1 (a tie): up where sharedkv is better, down where it is worse.
            bar = ax.bar(
                x + (i - (len(comparison.ratios) - 1) / 2) * width,
                ratio - 1.0,
                width,
                bottom=1.0,
                color=colours[peer],
                label=None if peer in labelled else f"vs {peer}",
            )
            ax.bar_label(bar, labels=[f"{ratio:.2g}x"], fontsize=7)
            labelled.add(peer)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    several = len({c.bench for c in comparisons}) > 1
    labels = [f"{c.bench + ': ' if several else ''}{c.what} ({c.detail})" for c in comparisons]
    ax.set_xticks(range(len(comparisons)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("times better than the peer (log scale)")
    ax.set_title("sharedkv against its peers (> 1: sharedkv is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _chart(comparisons: Sequence[_Comparison], out: Path, required: bool) -> None:
    if not comparisons:
        return
    try:
        _write_chart(comparisons, out)
    except ImportError:
        if required:
            raise CliError(
                "the chart needs matplotlib: pip install matplotlib (or 'sharedkv[bench]')",
                EXIT_MISSING,
            ) from None
        click.echo("sharedkv: note: no chart (matplotlib is not installed)", err=True)
        return
    click.echo(f"chart: {out}", err=True)


def _run_benchmarks(
    scripts: Sequence[Path], quick: bool, workdir: Path
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    err = _console(stderr=True)
    payloads: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for index, script in enumerate(scripts, 1):
        name = script.stem.removeprefix("bench_")
        out = workdir / f"{name}.json"
        label = f"[{index}/{len(scripts)}] {script.name}{' --quick' if quick else ''}"
        with _progress(err, label) as progress:
            code, tail = _run_script(script, quick, out, progress)
        if code != 0 or not out.exists():
            failed.append(name)
            err.print(Text("\n".join(tail[-15:]), style="dim"))
            err.print(Text(f"{script.name} failed (exit code {code})", style="red"))
            continue
        payloads[name] = json.loads(out.read_text())
    return payloads, failed


# -- the commands ---------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "-s",
    metavar="NAME|URL",
    default=None,
    help=f"The store for every command: a name (shm://NAME) or an address. Default: "
    f"${ENV_VAR} when it names a store that exists, else the only store running.",
)
@click.version_option(__version__, prog_name="sharedkv")
@click.pass_context
def cli(ctx: click.Context, store: str | None) -> None:
    """Inspect and drive sharedkv stores: keys, messages, changes, statistics.

    Exit codes: 0 ok, 1 not found / failed, 2 usage, 3 store not found, 4 backend failed or
    unreachable, 5 optional part missing, 130 Ctrl-C, 143 SIGTERM.
    """
    ctx.obj = _Settings(store)


@cli.command("ls")
@_json_option
@_guarded
def ls_command(as_json: bool) -> int:
    """List this user's stores on this machine (live, kept, or stale leftovers)."""
    rows = [_describe_store(info) for info in shm.list_stores()]
    if as_json:
        _emit_json(rows)
    elif rows:
        _console().print(_stores_table(rows))
    else:
        click.echo("no stores", err=True)
    return EXIT_OK if rows else EXIT_FAILED


@cli.command("get")
@click.argument("key")
@_store_option
@_json_option
@click.option("--raw", is_flag=True, help="Print str and bytes values as they are.")
@_guarded
def get_command(key: str, store: str | None, as_json: bool, raw: bool) -> int:
    """Print the value of KEY (exit code 1 if it is absent)."""
    with _opened(store) as s:
        try:
            entry = s.get_entry(key)
        except SerializationError as exc:
            raise CliError(f"cannot decode the value of {key!r} here: {exc}", EXIT_FAILED) from None
        url = s.url
    if entry is None:
        raise CliError(f"no key {key!r} in {url}", EXIT_FAILED)
    if as_json:
        _emit_json(entry.value)
    else:
        _show_value(entry.value, raw)
    return EXIT_OK


@cli.command("set")
@click.argument("key")
@click.argument("value")
@_store_option
@click.option("--ttl", type=float, default=None, help="Expire the key after this many seconds.")
@_string_option
@_guarded
def set_command(key: str, value: str, store: str | None, ttl: float | None, as_string: bool) -> int:
    """Set KEY to VALUE: JSON, else a Python literal, else an error (unless --string)."""
    data = _parse_value(value, as_string)
    with _opened(store) as s:
        s.set(key, data, ttl=ttl)
    click.echo("OK")
    return EXIT_OK


@cli.command("del")
@click.argument("keys", nargs=-1, required=True)
@_store_option
@_guarded
def del_command(keys: tuple[str, ...], store: str | None) -> int:
    """Delete KEYS; prints how many existed (exit code 1 if none did)."""
    with _opened(store) as s:
        deleted = sum(1 for key in keys if s.delete(key))
    click.echo(str(deleted))
    return EXIT_OK if deleted else EXIT_FAILED


@cli.command("keys")
@click.argument("pattern", default="*")
@_store_option
@_json_option
@_guarded
def keys_command(pattern: str, store: str | None, as_json: bool) -> int:
    """List the keys matching the glob PATTERN (default: all), sorted."""
    with _opened(store) as s:
        names = s.keys(pattern)
    if as_json:
        _emit_json(names)
    else:
        for name in names:
            _emit(name)
    return EXIT_OK if names else EXIT_FAILED


@cli.command("ttl")
@click.argument("key")
@_store_option
@_json_option
@_guarded
def ttl_command(key: str, store: str | None, as_json: bool) -> int:
    """Seconds before KEY expires, or "none" when it does not."""
    with _opened(store) as s:
        try:
            remaining = s.ttl(key)
        except KeyError:
            raise CliError(f"no key {key!r} in {s.url}", EXIT_FAILED) from None
    if as_json:
        _emit_json(None if remaining is None else round(remaining, 3))
    else:
        click.echo("none" if remaining is None else f"{remaining:.3f}")
    return EXIT_OK


@cli.command("expire", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("seconds", type=float)
@_store_option
@_guarded
def expire_command(key: str, seconds: float, store: str | None) -> int:
    """Make KEY expire in SECONDS."""
    with _opened(store) as s:
        if not s.expire(key, seconds):
            raise CliError(f"no key {key!r} in {s.url}", EXIT_FAILED)
    click.echo("OK")
    return EXIT_OK


@cli.command("persist")
@click.argument("key")
@_store_option
@_guarded
def persist_command(key: str, store: str | None) -> int:
    """Remove the expiry of KEY."""
    with _opened(store) as s:
        if not s.persist(key):
            raise CliError(f"no key {key!r} in {s.url}", EXIT_FAILED)
    click.echo("OK")
    return EXIT_OK


@cli.command("incr", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("amount", type=int, default=1)
@_store_option
@_guarded
def incr_command(key: str, amount: int, store: str | None) -> int:
    """Add AMOUNT (default 1, may be negative) to the integer at KEY; prints the result."""
    with _opened(store) as s:
        click.echo(str(s.incr(key, amount)))
    return EXIT_OK


@cli.command("publish")
@click.argument("channel")
@click.argument("data")
@_store_option
@_string_option
@_guarded
def publish_command(channel: str, data: str, store: str | None, as_string: bool) -> int:
    """Publish DATA (parsed as for set) on CHANNEL; prints how many subscribers received it."""
    value = _parse_value(data, as_string)
    with _opened(store) as s:
        click.echo(str(s.publish(channel, value)))
    return EXIT_OK


@cli.command("subscribe")
@click.argument("patterns", nargs=-1, required=True)
@_store_option
@_json_option
@_count_option
@_guarded
def subscribe_command(
    patterns: tuple[str, ...], store: str | None, as_json: bool, count: int | None
) -> int:
    """Print messages on channels matching PATTERNS, one line each, until Ctrl-C (exit 130)."""
    with _sigterm_raises(), _opened(store) as s, s.subscribe(*patterns) as sub:
        _ready(f"subscribed to {', '.join(patterns)} on {s.url} (Ctrl-C to stop)")
        return _stream(lambda t: sub.get(timeout=t), as_json, count)


@cli.command("watch")
@click.argument("pattern", default="*")
@_store_option
@click.option(
    "--since",
    type=click.IntRange(min=0),
    default=None,
    metavar="REV",
    help="First replay the retained changes after revision REV.",
)
@_json_option
@_count_option
@_guarded
def watch_command(
    pattern: str, store: str | None, since: int | None, as_json: bool, count: int | None
) -> int:
    """Print changes (set, delete, expire) to keys matching PATTERN until Ctrl-C (exit 130)."""
    with _sigterm_raises(), _opened(store) as s, s.watch(pattern, since=since) as changes:
        start = "" if since is None else f" since revision {since}"
        _ready(f"watching {pattern} on {s.url}{start} (Ctrl-C to stop)")
        return _stream(lambda t: changes.get(timeout=t), as_json, count)


_STAT_LABELS = {
    "url": "store",
    "path": "path",
    "keys": "keys",
    "bytes_used": "bytes used",
    "map_size": "map size",
    "revision": "revision",
    "messages_published": "messages published",
    "messages_dropped": "messages dropped",
    "locks_held": "locks held",
    "lock_holders": "held by",
    "attached": "processes attached",
    "processes": "processes registered",
    "readers": "reader processes",
}


def _collect_stats(s: Store) -> dict[str, Any]:
    stats = dict(s.stats())
    for field in ("processes", "readers"):
        if field in stats:
            stats[field] = _others(stats[field])
    holders = _lock_holders(s)
    if holders is not None:
        stats["lock_holders"] = holders
    path = stats.get("path") or s.path
    attached = _attached_pids(str(path)) if path else None
    if attached is not None:
        stats["attached"] = _others(attached)
    return stats


def _stat_text(field: str, value: Any) -> str:
    if field in ("bytes_used", "map_size"):
        return _fmt_bytes(value)
    if field == "lock_holders":
        return _holders_text(value)
    if field in ("attached", "processes", "readers"):
        return _fmt_pids(value)
    return str(value)


@cli.command("stats")
@_store_option
@_json_option
@_guarded
def stats_command(store: str | None, as_json: bool) -> int:
    """Keys, memory, revision, messages, locks and their holders, processes attached."""
    with _opened(store) as s:
        stats = _collect_stats(s)
    if as_json:
        holders = stats.get("lock_holders") or {}
        stats["lock_holders"] = {n: [_holder_json(o) for o in os_] for n, os_ in holders.items()}
        _emit_json(stats)
        return EXIT_OK
    order = [f for f in _STAT_LABELS if f in stats] + [f for f in stats if f not in _STAT_LABELS]
    rows = [(_STAT_LABELS.get(f, f.replace("_", " ")), _stat_text(f, stats[f])) for f in order]
    _console().print(_key_value_table(rows))
    return EXIT_OK


@cli.command("bench")
@click.argument("names", nargs=-1)
@click.option("--quick", is_flag=True, help="Small sizes: a smoke test of about a minute.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Where to write the PNG chart (default: sharedkv-bench.png).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Keep the results.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Benchmark scripts.")
@_guarded
def bench_command(
    names: tuple[str, ...],
    quick: bool,
    out: str | None,
    json_out: str | None,
    directory: str | None,
) -> int:
    """Run the benchmark scripts (all, or NAMES such as kv) and chart sharedkv against peers."""
    scripts = _select_scripts(_find_benchmarks(directory), names)
    with tempfile.TemporaryDirectory(prefix="sharedkv-bench-") as tmp:
        payloads, failed = _run_benchmarks(scripts, quick, Path(tmp))
    comparisons = [c for name, data in payloads.items() for c in _comparisons(name, data)]
    console = _console()
    if comparisons:
        console.print(_ratio_table(comparisons))
    _print_bars(console, payloads)
    if json_out:
        Path(json_out).write_text(json.dumps(payloads, indent=2) + "\n")
    _chart(comparisons, Path(out or "sharedkv-bench.png"), required=out is not None)
    if failed:
        raise CliError(f"benchmark(s) failed: {', '.join(failed)}", EXIT_FAILED)
    return EXIT_OK


@cli.command("demo")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--increments", type=click.IntRange(min=1), default=10_000, show_default=True)
@_guarded
def demo_command(workers: int, increments: int) -> int:
    """Worker processes incrementing one shared counter and reporting progress by messages."""
    from ._demo import run_demo

    return EXIT_OK if run_demo(workers, increments) else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        result = cli.main(args=args, prog_name="sharedkv", standalone_mode=False)
    except click.exceptions.Abort:
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return result if isinstance(result, int) else EXIT_OK
