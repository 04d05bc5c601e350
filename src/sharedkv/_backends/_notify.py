"""The notification layer of the shared-memory backend: wake-up datagrams between processes.

Every message, change and queue item is written to the shared LMDB environment first; a writer
then sends a tiny *hint* (a kind byte plus a name, for example ``b"m" + channel``) to each
process that registered interest, over a Unix datagram socket. The receiving process's notifier
thread routes the hint to its local feeds, which read the data from shared memory themselves.
(One exception, an optimization: a hint may also *carry* a copy of a message that the receiver
can take without reading the log, when the backend knows that nothing else is unread; the log
stays the source of truth.) So:

* an idle process sleeps in ``recv`` and uses no CPU;
* a publisher never blocks: sends are non-blocking, and a full receive buffer only loses hints,
  which :meth:`Notifier.drain_overflow` turns into a full re-read;
* a dead receiver is detected by the kernel (``ECONNREFUSED``), so the sender forgets it;
* a forged hint can only cause a spurious wake-up, never inject data.

On Linux the sockets live in the abstract namespace, so a killed process leaves no file behind.
Elsewhere they are files in the store's directory, removed on close and swept when stale.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Protocol

log = logging.getLogger("sharedkv")

_ABSTRACT = sys.platform.startswith("linux")
_HAS_PIDFD = hasattr(os, "pidfd_open")
_RCVBUF = 4 << 20  # the kernel caps this at net.core.rmem_max; more room means fewer overflows
MAX_DATAGRAM = 128 << 10  # the largest hint a receiver takes whole (a kind, a name, a message)

SENT, DEAD, FULL = 0, 1, 2


class LocalFeed(Protocol):
    def matches(self, kind: int, name: str) -> bool: ...

    def hint(self, name: str | None) -> None: ...

    def carry(self, name: str, message: memoryview) -> None: ...


Hints = list[tuple[int, str]]


class Notifier:
    """Sends hints to other processes and routes received hints to local feeds.

    A process may have several receiving *endpoints*, each a socket with its own thread, named
    by a suffix of the process's address (``""`` for the main one). ``on_idle(hints)`` is called
    by the receiving thread after each burst, with the hints it routed (none when it woke for
    another reason), and when ``next_deadline()`` (a ``time.monotonic()`` value or None) passes;
    the backend uses it for overflow checks and timed work such as expiring keys for watchers.
    Hints of ``timed_kinds`` may bring that deadline nearer.

    A thread that waits on a feed may read the socket itself instead (:meth:`lead`): the
    routing thread then leaves the socket alone until that thread leaves it, so a wake-up
    reaches the waiter with one thread wake-up, not two.
    """

    def __init__(
        self,
        store_id: str,
        directory: str,
        token_hex: str,
        on_idle: Callable[[Hints], None],
        next_deadline: Callable[[], float | None] = lambda: None,
        on_exit: Callable[[bytes], None] = lambda token: None,
        *,
        endpoint: str = "",
        thread_name: str | None = None,
        timed_kinds: bytes = b"",
        socket_only: bool = False,
    ) -> None:
        self._store_id = store_id
        # Nothing to watch but the socket (no deadline, no exits, no waiter reading it): the
        # routing thread then sleeps in recv() itself, one system call fewer per wake-up, and
        # wake() reaches it as an empty datagram.
        self._socket_only = socket_only
        self._directory = directory
        self._on_idle = on_idle
        self._next_deadline = next_deadline
        self._on_exit = on_exit
        self._timed_kinds = frozenset(timed_kinds)  # hints that may move next_deadline()
        self._thread_name = thread_name or f"sharedkv-notify-{store_id[:8]}"
        # Processes whose exit we are told about by the kernel (pidfd), by token.
        self._watched: dict[bytes, int] = {}
        self._watched_changed = False
        self._pidfds: dict[int, bytes] = {}
        self._addresses: dict[tuple[str, str], str | bytes] = {}
        self.address = self.address_of(token_hex, endpoint)
        # Replaced, never changed in place: the routing thread reads it without the lock.
        self._feeds: tuple[LocalFeed, ...] = ()
        self._to_hint: list[LocalFeed] = []  # feeds the thread must tell to re-read, once
        self._lock = threading.Lock()
        self._recv: socket.socket | None = None
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # A thread blocked in a feed's wait() may read the socket itself while it waits (see
        # lead()): the routing thread then leaves the socket alone, and hands back the hints
        # that thread read, for on_idle.
        self._leading = threading.Lock()
        self._led = False
        self._led_by = 0  # the thread id of the leading thread, 0 when none
        self._handoff: Hints = []
        self._lead_r, self._lead_w = os.pipe()
        os.set_blocking(self._lead_w, False)
        self._leader: tuple[bytearray, select.poll, select.poll, int] | None = None
        self._deadline: float | None = None  # the routing thread's next timed work
        self._bystanders = 0  # threads waiting while another one leads

    def address_of(self, token_hex: str, endpoint: str = "") -> str | bytes:
        address = self._addresses.get((token_hex, endpoint))
        if address is None:
            if _ABSTRACT:
                address = f"\0sharedkv-{self._store_id}-{token_hex}{endpoint}".encode()
            else:
                address = os.path.join(self._directory, "sock", token_hex + endpoint)
            if len(self._addresses) > 4096:
                self._addresses.clear()
            self._addresses[(token_hex, endpoint)] = address
        return address

    # -- sending ------------------------------------------------------------------------
    def send(
        self, token_hex: str, hint: bytes, endpoint: str = "", carried: Sequence[bytes] = ()
    ) -> int:
        """Send ``hint`` (followed by the parts of a ``carried`` message, in one datagram)."""
        try:
            if carried:
                self._send.sendmsg((hint, *carried), (), 0, self.address_of(token_hex, endpoint))
            else:
                self._send.sendto(hint, self.address_of(token_hex, endpoint))
        except BlockingIOError:
            return FULL
        except (ConnectionRefusedError, FileNotFoundError):
            return DEAD
        except OSError as exc:
            if exc.errno in (errno.ENOBUFS, errno.EAGAIN, errno.EMSGSIZE):
                return FULL  # the hint is lost: the receiver is told to re-read everything
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return DEAD
            raise
        return SENT

    # -- receiving ----------------------------------------------------------------------
    @property
    def listening(self) -> bool:
        return self._recv is not None

    def listen(self) -> None:
        """Bind this process's socket and start the routing thread (once)."""
        with self._lock:
            if self._recv is not None or self._closing:
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            if not _ABSTRACT:
                assert isinstance(self.address, str)
                os.makedirs(os.path.dirname(self.address), mode=0o700, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address)
            sock.bind(self.address)
            sock.setblocking(self._socket_only)
            self._recv = sock
            self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            self._thread.start()

    def add(self, feed: LocalFeed) -> None:
        with self._lock:
            self._feeds = (*self._feeds, feed)

    def remove(self, feed: LocalFeed) -> None:
        with self._lock:
            self._feeds = tuple(f for f in self._feeds if f is not feed)

    @property
    def feeds(self) -> tuple[LocalFeed, ...]:
        return self._feeds

    def route(self, kind: int, name: str | None, message: memoryview | None = None) -> None:
        """Deliver one hint to the matching local feeds (``name=None``: every feed of ``kind``),
        with the ``message`` it carried, if any: a view valid only during the call."""
        for feed in self._feeds:
            try:
                if name is None or feed.matches(kind, name):
                    if message is None:
                        feed.hint(name)
                    else:
                        assert name is not None
                        feed.carry(name, message)
            except Exception:  # a broken feed must not stop the others
                log.exception("sharedkv: a feed failed to take a wake-up")

    def watch_exits(self, processes: dict[bytes, int]) -> None:
        """Report (through ``on_exit``) when any of these processes (token -> pid) exits."""
        assert not self._socket_only, "a socket-only notifier watches nothing else"
        with self._lock:
            changed = processes != self._watched
            if changed:
                self._watched = dict(processes)
                self._watched_changed = True
        if changed:
            self.wake()

    def _sync_pidfds(self, poller: select.poll) -> list[bytes]:
        """Open pidfds for newly watched processes, close the others; returns exits seen."""
        from .. import _proc

        with self._lock:
            wanted = dict(self._watched)
            self._watched_changed = False
        exited: list[bytes] = []
        current = {token: fd for fd, token in self._pidfds.items()}
        for token, fd in current.items():
            if token not in wanted:
                poller.unregister(fd)
                os.close(fd)
                del self._pidfds[fd]
        for token, pid in wanted.items():
            if token in current:
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                exited.append(token)
                continue
            # The pid may have been reused since the token was written: check it is the same
            # process (by start time) now that the pidfd pins it.
            if not _proc.ProcessId.from_token(token).alive():
                os.close(fd)
                exited.append(token)
                continue
            self._pidfds[fd] = token
            poller.register(fd, select.POLLIN)
        return exited

    def wake_feed(self, feed: LocalFeed) -> None:
        """Have the routing thread tell ``feed`` to re-read everything, soon: its wake-ups then
        run on that thread."""
        with self._lock:
            self._to_hint.append(feed)
        self.wake()

    def wake(self) -> None:
        """Make the routing thread run ``on_idle`` soon (for example after a deadline changed)."""
        with contextlib.suppress(BlockingIOError, OSError):
            if self._socket_only:
                # Lost only when the socket is full: its thread then wakes for what fills it.
                self._send.sendto(b"", self.address)
            else:
                os.write(self._wake_w, b"x")

    def _hint_asked_feeds(self) -> None:
        """Tell the feeds passed to :meth:`wake_feed` to re-read everything."""
        with self._lock:
            to_hint, self._to_hint = self._to_hint, []
        for feed in to_hint:
            try:
                feed.hint(None)
            except Exception:
                log.exception("sharedkv: a feed failed to take a wake-up")

    def _run_on_socket(self) -> None:
        """The routing thread of a socket-only notifier: it sleeps in recv()."""
        sock = self._recv
        assert sock is not None
        buffer = bytearray(MAX_DATAGRAM)
        waiting = select.poll()
        waiting.register(sock.fileno(), select.POLLIN)
        while not self._closing:
            received: dict[tuple[int, str], None] = {}
            try:
                self._receive(buffer, waiting, received)  # blocks until a datagram comes
            except OSError:
                if self._closing:
                    return
                raise
            if self._closing:
                break
            self._hint_asked_feeds()
            try:
                self._on_idle(list(received))
            except Exception:
                if self._closing:
                    return
                log.exception("sharedkv: background maintenance failed")

    def _run(self) -> None:
        if self._socket_only:
            self._run_on_socket()
            return
        sock = self._recv
        assert sock is not None
        buffer = bytearray(MAX_DATAGRAM)
        fileno = sock.fileno()
        poller = select.poll()
        poller.register(fileno, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        # Asks whether another datagram waits: cheaper than a recv that fails with EAGAIN.
        waiting = select.poll()
        waiting.register(fileno, select.POLLIN)
        exited: list[bytes] = []
        listening = True
        while not self._closing:
            if self._watched_changed:
                exited += self._sync_pidfds(poller)
            for token in exited:
                try:
                    self._on_exit(token)
                except Exception:
                    log.exception("sharedkv: cleaning up after an exited process failed")
            exited = []
            deadline = self._deadline = self._next_deadline()
            timeout_ms = None
            if deadline is not None:
                timeout_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
            try:
                ready = poller.poll(timeout_ms)
            except InterruptedError:
                continue
            if self._closing:
                break
            received: dict[tuple[int, str], None] = {}
            for fd, _ in ready:
                if fd == fileno:
                    try:
                        self._receive(buffer, waiting, received)
                    except OSError:
                        if self._closing:
                            return
                        raise
                elif fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._hint_asked_feeds()
                elif fd in self._pidfds:
                    exited.append(self._pidfds.pop(fd))
                    poller.unregister(fd)
                    os.close(fd)
            # Whatever woke us: follow the socket's owner (a waiting thread may have taken it,
            # or given it back, or left it untended), and take the hints it read.
            with self._lock:
                handoff, self._handoff = self._handoff, []
                if self._led and not self._leading.locked():
                    self._led = False
                led = self._led
            received.update(dict.fromkeys(handoff))
            if led == listening:
                listening = not led
                if listening:
                    poller.register(fileno, select.POLLIN)
                else:
                    poller.unregister(fileno)
            try:
                self._on_idle(list(received))
            except Exception:
                if self._closing:
                    return
                log.exception("sharedkv: background maintenance failed")

    def _receive(
        self,
        buffer: bytearray,
        waiting: select.poll,
        received: dict[tuple[int, str], None],
        enough: Callable[[], bool] | None = None,
    ) -> None:
        """Read and route every waiting datagram, or until ``enough()``; add what was routed to
        ``received``.

        Each hint is routed as soon as it is read (the first one before asking for more: it is
        usually the only one); a burst of plain hints for one name is routed once."""
        sock = self._recv
        assert sock is not None
        recv_into, view = sock.recv_into, memoryview(buffer)
        try:
            while True:
                size = recv_into(buffer)
                if size:
                    end = buffer.find(0, 1, size)  # names never hold a NUL
                    message = None if end < 0 else view[end + 1 : size]
                    raw_name = bytes(view[1 : size if end < 0 else end])
                    key = (buffer[0], raw_name.decode("utf-8", "replace"))
                    if message is not None or key not in received:
                        received[key] = None
                        self.route(*key, message)
                if (enough is not None and enough()) or not waiting.poll(0):
                    break  # what is left waits for the next reader of the socket
        except (BlockingIOError, InterruptedError):
            pass

    def lead(
        self, done: Callable[[], bool], timeout: float, alone: Callable[[], bool]
    ) -> bool | None:
        """Wait until ``done()``, at most ``timeout`` seconds, reading this process's socket on
        the calling thread: a wake-up then costs one thread wake-up instead of two (the routing
        thread's, then the waiter's). Returns ``done()``, or None when another thread already
        leads (the caller then waits as usual). The feed waited on must call :meth:`poke` when
        it changes, so that a change made by another thread ends the wait.

        When the waiter leaves and its feed is ``alone()`` (no other feed here, no other
        reader), the socket stays with the next waiter: waking the routing thread to take it
        back would preempt the waiter just as it hands its message out. Whatever wakes the
        routing thread later (a new feed, a deadline) makes it take the socket back; the next
        waiter takes down the marks of the wake-ups read here, before it sleeps."""
        if (
            self._recv is None
            or self._closing
            or self._socket_only
            or not self._leading.acquire(blocking=False)
        ):
            return None
        received: dict[tuple[int, str], None] = {}
        try:
            with self._lock:
                handoff, self._handoff = self._handoff, []
                pause = not self._led
                self._led = True
                self._led_by = threading.get_ident()
            if pause:
                self.wake()  # the routing thread leaves the socket to us from now on
            if handoff:
                self._run_on_idle(handoff)  # may route again: then done() may hold already
            if self._leader is None:  # made once: only one thread leads at a time
                fileno = self._recv.fileno()
                poller, waiting = select.poll(), select.poll()
                poller.register(fileno, select.POLLIN)
                poller.register(self._lead_r, select.POLLIN)
                waiting.register(fileno, select.POLLIN)
                self._leader = (bytearray(MAX_DATAGRAM), poller, waiting, fileno)
            buffer, poller, waiting, fileno = self._leader
            deadline = time.monotonic() + timeout
            while not done():
                if received:
                    # What we routed was for others, and we sleep on: take down its marks now
                    # (the routing thread's on_idle), or their publishers would go quiet.
                    hints, received = list(received), {}
                    self._run_on_idle(hints)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    break
                ready = poller.poll(None if math.isinf(remaining) else remaining * 1000 + 1)
                for fd, _ in ready:
                    if fd == fileno:
                        # A waiter returns with its own wake-up, before asking for more.
                        self._receive(buffer, waiting, received, done)
                        # The routing thread keeps the timed work (expiring keys for watchers):
                        # tell it when what we routed brought a deadline nearer.
                        if self._timed_kinds and any(k in self._timed_kinds for k, _ in received):
                            due = self._next_deadline()
                            if due is not None and (self._deadline is None or due < self._deadline):
                                self._deadline = due
                                self.wake()
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._lead_r, 4096)
            return done()
        finally:
            # Decided and released under the lock: see reclaim() and standing_by().
            with self._lock:
                self._led_by = 0
                self._handoff.extend(received)
                give_back = self._bystanders > 0 or not alone()
                if give_back:
                    self._led = False
                self._leading.release()
            if give_back:
                self.wake()  # the routing thread takes the socket and the hints read here

    def _run_on_idle(self, hints: Hints) -> None:
        try:
            self._on_idle(hints)
        except Exception:  # the waiter's own wait goes on; the routing thread logs the same
            log.exception("sharedkv: background maintenance failed")

    def reclaim(self) -> None:
        """Something will rely on the routing thread (a wake-up callback was added): have it
        read the socket again if a waiter left it untended."""
        with self._lock:
            take = self._led and not self._leading.locked()
            if take:
                self._led = False
        if take:
            self.wake()

    @contextlib.contextmanager
    def standing_by(self) -> Iterator[None]:
        """Around a wait that relies on the current leader (or the routing thread) to route its
        wake-ups: the leader then gives the socket back when it leaves."""
        with self._lock:
            self._bystanders += 1
        self.reclaim()
        try:
            yield
        finally:
            with self._lock:
                self._bystanders -= 1

    def poke(self) -> None:
        """A feed changed: end the sleep of a :meth:`lead` wait on another thread, so that it
        checks ``done()`` again. (The leading thread's own routing needs no poke.)"""
        led_by = self._led_by
        if led_by and led_by != threading.get_ident():
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._lead_w, b"x")

    def close(self) -> None:
        with self._lock:
            self._closing = True
            thread, self._thread = self._thread, None
        self.wake()
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._lead_w, b"x")  # a leading waiter sees _closing and leaves
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        # A waiter reading the socket leaves at once (_closing): wait for it before closing.
        if self._leading.acquire(timeout=5):
            self._leading.release()
        for fd in list(self._pidfds):
            os.close(fd)
        self._pidfds.clear()
        if self._recv is not None:
            self._recv.close()
            if not _ABSTRACT and isinstance(self.address, str):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address)
        self._send.close()
        for fd in (self._wake_r, self._wake_w, self._lead_r, self._lead_w):
            os.close(fd)

    def abandon(self) -> None:
        """In a forked child: drop the parent's socket and thread without touching them."""
        for fd in (self._wake_r, self._wake_w, self._lead_r, self._lead_w, *self._pidfds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pidfds.clear()
        for sock in (self._recv, self._send):
            if sock is not None:
                # detach() forgets the fd without shutting the parent's socket down.
                with contextlib.suppress(OSError):
                    os.close(sock.detach())


def glob_matches(patterns: tuple[str, ...], name: str) -> str | None:
    """The first of ``patterns`` that matches ``name``, or None."""
    for pattern in patterns:
        if pattern == name or fnmatchcase(name, pattern):
            return pattern
    return None
