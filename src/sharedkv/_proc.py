"""Who is this process, and is that other process still alive?

A process is identified by its pid *and* its start time, so a recycled pid is never mistaken
for the process that died. Liveness comes from the operating system (``/proc`` on Linux, a null
signal elsewhere), never from a timeout.
"""

from __future__ import annotations

import os
import struct
import threading

__all__ = ["ProcessId", "current", "is_alive"]

_TOKEN = struct.Struct("<IQ")  # pid, start time in clock ticks since boot (0 where unknown)
TOKEN_SIZE = _TOKEN.size


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; 0 without /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else _fallback_alive(pid)
    except OSError:
        return _fallback_alive(pid)
    # The command name (field 2) may hold spaces and parentheses: fields resume after the last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # a zombie has exited; only its exit status remains
        return None
    return int(fields[19])


def _fallback_alive(pid: int) -> int | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


class ProcessId:
    """pid plus start time; ``token`` is its fixed-size binary form for storage."""

    __slots__ = ("pid", "start", "token")

    def __init__(self, pid: int, start: int) -> None:
        self.pid = pid
        self.start = start
        self.token = _TOKEN.pack(pid, start)

    @classmethod
    def from_token(cls, token: bytes) -> ProcessId:
        pid, start = _TOKEN.unpack(token[:TOKEN_SIZE])
        return cls(pid, start)

    def alive(self) -> bool:
        return is_alive(self.pid, self.start)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessId) and other.token == self.token

    def __hash__(self) -> int:
        return hash(self.token)

    def __repr__(self) -> str:
        return f"ProcessId(pid={self.pid}, start={self.start})"


def is_alive(pid: int, start: int) -> bool:
    now_start = _start_time(pid)
    if now_start is None:
        return False
    # 0 means "unknown" on platforms without /proc: trust the pid alone there.
    return start == 0 or now_start in (0, start)


def ancestors(limit: int = 32) -> list[ProcessId]:
    """This process's parent, grandparent, ... (nearest first), where /proc can tell."""
    out: list[ProcessId] = []
    pid = os.getppid()
    while pid > 1 and len(out) < limit:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            break
        fields = stat[stat.rindex(b")") + 2 :].split()
        out.append(ProcessId(pid, int(fields[19])))
        pid = int(fields[1])
    return out


_current: ProcessId | None = None
_current_lock = threading.Lock()


def current() -> ProcessId:
    """This process, recomputed after fork."""
    global _current
    pid = os.getpid()
    cur = _current
    if cur is None or cur.pid != pid:
        with _current_lock:
            start = _start_time(pid)
            _current = cur = ProcessId(pid, start or 0)
    return cur
