"""The embedded backend: an LMDB environment in shared memory (tmpfs), used by every process.

Layout of one store (a directory, private to its user)::

    <root>/<name>/data.mdb, lock.mdb   the LMDB environment (memory-mapped by every process)
    <root>/<name>/attach.lock          every attached process holds a shared flock on it
    <root>/<name>/info.json            id, creator, creation time, whether it outlives its users

``<root>`` is ``/dev/shm/sharedkv-<uid>`` (mode 0700), or the temp dir where there is no
``/dev/shm``. The last process to detach (or the next one to look, after a crash) removes the
directory: a flock is released by the kernel when its holder dies, so no guessing is involved.

Named databases inside the environment::

    data     key -> value [+ owner] + trailer   trailer = revision, expiry, flags (last byte)
    expiry   be64(expires_at) + key -> ""    for sweeping expired keys in order
    history  be64(revision) -> op, key, value   the last ``history`` changes, for watch(since=)
    meta     "ctr": revision, history bytes, interest version, messages published, dropped
             "secret": 16 random bytes, which a wake-up that carries a message must show
    interest kind + pattern + NUL + owner -> count   who wants wake-ups for what
    chan     channel -> last seq, first retained seq, retained bytes
    msgs     channel + NUL + be64(seq) -> msg id + payload
    hinted   owner + kind + channel -> time sent, seq   a message wake-up not yet taken
    queue    name + NUL + be64(seq) -> item    oldest first; nothing else (see the queue section)
    locks    name + NUL + owner + ident -> since, thread id, thread name
    procs    owner -> attach time            processes that registered anything
    eph      owner + key -> ""               ephemeral keys by owner

Every write is one LMDB write transaction: atomic, serialized across processes by LMDB's robust
mutex (a writer killed mid-transaction leaves the last committed state), and readers never wait.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any

import lmdb

from .. import _proc
from .._errors import (
    BackendError,
    InvalidURLError,
    RevisionTooOldError,
    StoreFullError,
    StoreNotFoundError,
)
from . import _notify
from .base import Backend, Decoder, Feed, Gap, HintedFeed, LockInfo, Record

if sys.platform != "win32":
    import fcntl

__all__ = ["ShmBackend", "list_stores", "root_dir"]

log = logging.getLogger("sharedkv")

# -- record format ---------------------------------------------------------------------
# A data record is the value, the owner's token for an ephemeral key, then a fixed trailer.
# Metadata goes last so that a read needs no copy of the value: the flags byte is the last one
# (0 for an ordinary key, tested first), and pickle ignores the bytes after its STOP opcode.
_TRAILER = struct.Struct("<QdB")  # revision, expires_at (0.0 = never), flags
_TSIZE = _TRAILER.size
#: the record layout, kept in each store's info.json: a store written in another is refused
FORMAT = 2
_F_EXPIRES = 1
_F_EPHEMERAL = 2
_TOKEN_SIZE = _proc.TOKEN_SIZE
_U64 = struct.Struct("<Q")
_BE64 = struct.Struct(">Q")
_U16 = struct.Struct("<H")
_BEF = struct.Struct(">d")
_CHAN = struct.Struct("<QQQ")  # last seq, first retained seq, retained bytes
# All store-wide counters live in one record, read once and written once per transaction.
_CTR = struct.Struct("<QQQQQ")
# (The fourth counted published messages: publish no longer writes it, and stats() counts them
# from the channels' records.)
REV, HBYTES, IVER, _UNUSED, DROPPED = range(5)
_LOCKVAL = struct.Struct("<dQ")  # since, thread id (then the thread's name)

_OP_SET, _OP_DELETE, _OP_EXPIRE = b"s", b"d", b"e"
_OPS = {_OP_SET: "set", _OP_DELETE: "delete", _OP_EXPIRE: "expire"}

# interest kinds (first byte of a hint)
K_MESSAGE, K_KEY, K_QUEUE, K_LOCK = b"m", b"k", b"q", b"l"
# Messages for subscriptions that drive sync callbacks: their hints go to a socket of their own,
# read by the thread that runs those callbacks, so a message costs one thread wake-up, not two.
K_CALLBACK = b"c"
_CALLBACKS_ENDPOINT = "c"  # suffix of that socket's address
_MESSAGE_KINDS = (K_MESSAGE, K_CALLBACK)
# A message wake-up still untaken after this long is sent again: one lost to a receiver that
# died is then refused by the kernel, which is how publishers learn of the death.
_HINT_RESEND_S = 0.5
_HINTED = struct.Struct("<dQ")  # time.time() when sent, the seq that was announced
# A wake-up for sync callbacks may carry its message (seq, msg id, payload) when the receiver
# has nothing else unread: its callbacks then run without reading the log (see publish()).
# Anyone on the machine can send to an abstract socket, so it also carries the store's secret,
# which only processes that can open the store know: a forged one is only a wake-up.
_CARRIED = struct.Struct("<16sQQ")  # secret, seq, msg id
# Publishing a message this large, trimming reads the oldest one's size from a view of the map
# rather than popping a copy of it (messages of one channel tend to be alike in size).
_TRIM_BY_VIEW = 4096
_CARRY_MAX = _notify.MAX_DATAGRAM - 1024  # room for the kind, the channel and _CARRIED

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DEFAULT_MAP = 1 << 40
# The 64-bit word of LMDB's lock file (lock.mdb) holding the last committed transaction id:
# after a magic number, a format number and the readers' pthread mutex (40 bytes on Linux).
_TXNID_WORD = 6
# What one cached entry costs beyond its key and record: dict slot and object headers.
_CACHE_ENTRY_OVERHEAD = 100
_UNCACHED: Any = object()
_ATTACH_TIMEOUT = 10.0

# Environments inherited through fork() must never be used or closed in the child (closing
# would clear the parent's reader slots); children keep them here and open their own.
_orphans: list[Any] = []
_forks = 0  # bumped in every forked child, so backends notice with one global read


def _count_fork() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_count_fork)


def root_dir() -> str:
    """Where this user's stores live: ``$SHAREDKV_DIR`` if set, else /dev/shm when it exists,
    else the temp dir (on systems without a tmpfs, such as macOS)."""
    override = os.environ.get("SHAREDKV_DIR")
    if override:
        return os.path.join(os.path.abspath(override), f"sharedkv-{os.getuid()}")
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    if base is None:
        import tempfile

        base = tempfile.gettempdir()
    return os.path.join(base, f"sharedkv-{os.getuid()}")


def _private_root() -> str:
    root = root_dir()
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    st = os.lstat(root)
    if not os.path.isdir(root) or os.path.islink(root) or st.st_uid != os.getuid():
        raise BackendError(f"{root} is not a directory owned by this user; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)
    return root


def _be_expiry(expires_at: float) -> bytes:
    return _BEF.pack(expires_at)


# Hot paths call py-lmdb with positional arguments -- get(key, default, db),
# put(key, value, dupdata, overwrite, append, db), begin(db, parent, write) -- because its
# keyword parsing costs about 0.1 us per call, a tenth of a whole read.


def _begin_write(b: ShmBackend, buffers: bool = False) -> Any:
    """A write transaction of this process, holding ``b._wlock`` (released by the caller).

    ``buffers``: its reads return views of the map, valid until its next write, not copies."""
    if b._closed or b._forks != _forks:
        b._check()
    b._wlock.acquire()
    try:
        return b._begin(None, None, True, buffers)  # write=True
    except BaseException:
        b._wlock.release()
        raise


class _Write:
    """One write transaction, plus the hints to send once it has committed.

    py-lmdb allows one write transaction per environment at a time and fails (rather than waits)
    for a second one, so threads of this process queue on ``_wlock`` first; LMDB's own robust
    mutex then serializes processes.
    """

    __slots__ = ("backend", "ctr", "ctr_dirty", "expiry_added", "hints", "txn")

    def __init__(self, backend: ShmBackend) -> None:
        self.backend = backend
        self.ctr: list[int] | None = None
        self.ctr_dirty = False
        self.hints: dict[tuple[str, bytes], int] = {}
        self.expiry_added = False

    def __enter__(self) -> _Write:
        self.txn = _begin_write(self.backend)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        b = self.backend
        try:
            if exc_type is None:
                if time.time() >= b._sweep_at:
                    b._maybe_sweep(self)
                if self.ctr_dirty:
                    assert self.ctr is not None
                    self.txn.put(b"ctr", _CTR.pack(*self.ctr), True, True, False, b._meta)
                self.txn.commit()
            else:
                self.txn.abort()
        except lmdb.Error as err:
            with contextlib.suppress(lmdb.Error):
                self.txn.abort()
            raise _translate(b, err) from err
        finally:
            b._wlock.release()
        if exc_type is None:
            if self.expiry_added and b._notifier.listening:
                b._notifier.wake()  # a watcher's expiry timer may now have to fire sooner
            if self.hints:
                b._send_hints(self.hints.items())
        elif issubclass(exc_type, lmdb.Error):
            raise _translate(b, exc) from exc

    def counters(self) -> list[int]:
        if self.ctr is None:
            self.ctr = _read_counters(self.txn, self.backend._meta)
        return self.ctr

    def bump(self, index: int, delta: int = 1) -> int:
        ctr = self.counters()
        ctr[index] += delta
        self.ctr_dirty = True
        return ctr[index]

    def next_rev(self) -> int:
        ctr = self.ctr if self.ctr is not None else self.counters()
        ctr[REV] += 1
        self.ctr_dirty = True
        return ctr[REV]

    def changed(self, op: bytes, kb: bytes, value: bytes | None, rev: int) -> None:
        """Record a change in the history and wake the watchers of that key.

        This runs on every write, so it is written for speed: no watchers and a short history
        cost two comparisons beyond the history record itself."""
        b = self.backend
        ctr = self.ctr if self.ctr is not None else self.counters()
        if b._history > 0:
            record = op + _U16.pack(len(kb)) + kb + (value or b"")
            self.txn.put(_BE64.pack(rev), record, True, True, True, b._hist)  # append=True
            ctr[HBYTES] += len(record)
            if rev % 64 == 0 or ctr[HBYTES] > b._history_bytes:
                b._trim_history(self, rev)
        if b._reg or ctr[IVER] != b._reg_version:
            for token in self.interested(K_KEY, kb.decode()):
                self.hints[(token, K_KEY + kb)] = 1

    def interested(self, kind: bytes, name: str) -> dict[str, int]:
        return self.backend._interested(self.txn, self.counters()[IVER], kind, name)

    def wake(self, kind: bytes, name: bytes) -> None:
        for token in self.interested(kind, name.decode()):
            self.hints[(token, kind + name)] = 1


def _overflow_key(token: bytes, endpoint: str) -> bytes:
    """The meta key flagging that a hint to this endpoint of ``token`` was lost."""
    return b"ovf" + token + endpoint.encode()


class _BareWrite:
    """A write transaction without _Write's bookkeeping (no expiry sweep, no store counters),
    for queue operations and publish; committed when the block ends normally (a commit that changed
    nothing writes nothing), then ``hint`` is sent to ``waiters``."""

    __slots__ = ("backend", "buffers", "hint", "txn", "waiters")

    def __init__(self, backend: ShmBackend, buffers: bool = False) -> None:
        self.backend = backend
        self.buffers = buffers
        self.waiters: dict[str, int] = {}
        self.hint = b""

    def __enter__(self) -> _BareWrite:
        self.txn = _begin_write(self.backend, self.buffers)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        b = self.backend
        try:
            if exc_type is None:
                self.txn.commit()
            else:
                self.txn.abort()
        except lmdb.Error as err:
            with contextlib.suppress(lmdb.Error):
                self.txn.abort()
            raise _translate(b, err) from err
        finally:
            b._wlock.release()
        if exc_type is None and self.waiters:
            b._send_hints(((token, self.hint), 1) for token in self.waiters)
        elif exc_type is not None and issubclass(exc_type, lmdb.Error):
            raise _translate(b, exc) from exc


def _well_formed(raw: bytes) -> bool:
    """Whether a data record has a trailer we can read (anything we wrote has)."""
    if len(raw) < _TSIZE or raw[-1] & ~(_F_EXPIRES | _F_EPHEMERAL):
        return False
    return not raw[-1] & _F_EPHEMERAL or len(raw) >= _TSIZE + _TOKEN_SIZE


def _plain(raw: bytes) -> bool:
    """Whether a record is an ordinary key's (no expiry, no owner): its value is all but the
    trailer. (The two hottest reads, get and get_decoded, test this inline.)"""
    return raw[-1:] == b"\0" and len(raw) >= _TSIZE


def _trailer(raw: bytes) -> tuple[int, float, int]:
    """Revision, expiry and flags of a well-formed record."""
    return _TRAILER.unpack_from(raw, len(raw) - _TSIZE)


def _owner(raw: bytes) -> bytes:
    """The owner's token in the record of an ephemeral key."""
    end = len(raw) - _TSIZE
    return raw[end - _TOKEN_SIZE : end]


def _ephemeral_of(raw: bytes, token: bytes) -> bool:
    """Whether a record is an ephemeral key owned by ``token``."""
    return _well_formed(raw) and bool(raw[-1] & _F_EPHEMERAL) and _owner(raw) == token


def _value(raw: bytes) -> bytes:
    """The value in a well-formed record."""
    end = len(raw) - _TSIZE
    return raw[: end - _TOKEN_SIZE] if raw[-1] & _F_EPHEMERAL else raw[:end]


def _read_counters(txn: Any, meta: Any) -> list[int]:
    raw = txn.get(b"ctr", None, meta)
    return list(_CTR.unpack(raw)) if raw else [0] * 5


def _translate(b: ShmBackend, err: BaseException) -> BackendError:
    if isinstance(err, lmdb.MapFullError):
        return StoreFullError(
            f"the store {b.url} is full ({b._env.info()['map_size']} bytes mapped); "
            "nothing was written"
        )
    return BackendError(f"LMDB error in {b.url}: {err}")


class ShmBackend(Backend):
    """LMDB in shared memory (``shm://NAME``) or in a directory on disk (``file:///path``)."""

    def __init__(
        self,
        *,
        name: str | None = None,
        path: str | None = None,
        create: bool = True,
        keep: bool = False,
        map_size: int | None = None,
        history: int = 4096,
        history_bytes: int = 32 << 20,
        buffer: int = 1024,
        buffer_bytes: int = 8 << 20,
        durable: bool = False,
        read_cache: int = 32 << 20,
    ) -> None:
        if path is None:
            if name is None:
                name = f"p{os.getpid()}-{secrets.token_hex(4)}"
            elif not _NAME_RE.match(name):
                raise InvalidURLError(
                    f"invalid store name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
                )
            directory = os.path.join(_private_root(), name)
            self.url = f"shm://{name}"
            self.persistent = False
        else:
            directory = os.path.abspath(path)
            self.url = f"file://{directory}"
            self.persistent = True
            keep = True
        self.name = name or os.path.basename(directory)
        self.path = directory
        self.keep = keep
        self._durable = durable
        self._map_size = map_size
        self._history = history
        self._history_bytes = history_bytes
        self._buffer = max(1, buffer)
        self._buffer_bytes = buffer_bytes
        self._create = create
        if isinstance(read_cache, bool) or not isinstance(read_cache, int) or read_cache < 0:
            raise ValueError(f"read_cache must be a number of bytes >= 0, not {read_cache!r}")
        self._read_cache_budget = read_cache
        self._closed = False
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self._open()

    # -- opening, forking, closing -------------------------------------------------------
    def _open(self) -> None:
        self._pid = os.getpid()
        self._forks = _forks
        self._me = _proc.current()
        self._token = self._me.token.hex()
        self._attach_fd = self._attach()
        try:
            self._open_env()
        except BaseException:
            os.close(self._attach_fd)
            raise
        self._open_read_cache()
        self._reg_version = -1
        self._reg: list[tuple[bytes, str, str, int]] = []  # kind, pattern, token, count
        self._match_cache: dict[tuple[bytes, str], dict[str, int]] = {}
        # channel -> who follows it: (token, token hex, kind, subscriptions), both message kinds
        self._targets_cache: dict[str, tuple[tuple[bytes, str, bytes, int], ...]] = {}
        self._dead: set[bytes] = set()
        self._registered = False
        self._sweep_at = 0.0
        self._feeds: set[_ShmFeed] = set()
        self._notifier = _notify.Notifier(
            self._store_id,
            self.path,
            self._token,
            self._on_idle,
            self._next_deadline,
            self._on_process_exit,
            timed_kinds=K_KEY,  # a key change may bring an expiry nearer, for watchers
        )
        # The socket and thread of sync message callbacks, made for the first of them.
        self._callbacks: _notify.Notifier | None = None
        # Leftovers of crashed processes: LMDB reader slots, then our own records of them.
        self._env.reader_check()
        with contextlib.suppress(BackendError):
            self.reap_dead()

    def _attach(self) -> int:
        """Hold a shared flock on attach.lock, creating the store directory when allowed."""
        deadline = time.monotonic() + _ATTACH_TIMEOUT
        lock_path = os.path.join(self.path, "attach.lock")
        while True:
            if self._create and self.persistent:
                os.makedirs(self.path, mode=0o700, exist_ok=True)
            elif self._create:
                # mkdir, not makedirs: if the (empty) root was just removed by a departing
                # process, recreate it through _private_root, which makes it private again.
                try:
                    os.mkdir(self.path, 0o700)
                except FileExistsError:
                    pass
                except FileNotFoundError:
                    _private_root()
                    continue
            try:
                fd = os.open(lock_path, os.O_RDWR | (os.O_CREAT if self._create else 0), 0o600)
            except FileNotFoundError:
                raise StoreNotFoundError(
                    f"no store at {self.url}: it was never created, or every process using it "
                    "has exited and it was removed"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                # Someone holds it exclusively: it is being removed right now. Retry.
                os.close(fd)
                if time.monotonic() > deadline:
                    raise BackendError(f"timed out attaching to {self.url}") from None
                time.sleep(0.01)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed between open and flock
            if not self._create:
                raise StoreNotFoundError(f"the store at {self.url} was removed")
        info_path = os.path.join(self.path, "info.json")
        if not self._create:
            # Attaching only: the creator writes info.json right after taking its flock.
            while not os.path.exists(info_path) and time.monotonic() < deadline:
                time.sleep(0.005)
            if not os.path.exists(info_path):
                os.close(fd)
                raise StoreNotFoundError(f"the store at {self.url} was never completely created")
        if not os.path.exists(info_path):
            self._store_id = secrets.token_hex(8)
            info = {
                "id": self._store_id,
                "name": self.name,
                "url": self.url,
                "creator": os.getpid(),
                "creator_start": self._me.start,
                "created": time.time(),
                "keep": self.keep,
                "format": FORMAT,
            }
            tmp = f"{info_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.chmod(tmp, 0o600)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, info_path)  # first writer wins; losers read the winner's id
            os.unlink(tmp)
        with open(info_path) as f:
            info = json.load(f)
        if info.get("format") != FORMAT:
            os.close(fd)
            raise BackendError(
                f"the store at {self.url} was written by a sharedkv with another record format "
                f"({info.get('format', 1)}, this one reads {FORMAT}); copy its data with that "
                "version, or remove it"
            )
        self._store_id = info["id"]
        self.keep = bool(info.get("keep", False)) or self.keep
        return fd

    def _open_env(self) -> None:
        map_size = self._map_size
        writemap = not self.persistent
        if map_size is None:
            map_size = _DEFAULT_MAP
            if writemap:
                # With a writable map, running tmpfs out of space would raise SIGBUS in whichever
                # process touches the page; capping the map at the free space turns that into a
                # clean StoreFullError instead (MDB_MAP_FULL).
                st = os.statvfs(self.path)
                current = 0
                with contextlib.suppress(FileNotFoundError):
                    current = os.stat(os.path.join(self.path, "data.mdb")).st_size
                map_size = min(map_size, max(current, st.f_bavail * st.f_frsize))
        try:
            self._env = lmdb.open(
                self.path,
                map_size=map_size,
                max_dbs=16,
                max_readers=2048,
                max_spare_txns=16,
                sync=self._durable,
                metasync=self._durable,
                writemap=writemap,
                readahead=False,
                mode=0o600,
                create=True,
            )
        except lmdb.Error as exc:
            raise BackendError(f"cannot open the store at {self.path}: {exc}") from exc
        env = self._env
        self._begin = env.begin
        with env.begin(write=True) as txn:
            self._data = env.open_db(b"data", txn=txn)
            self._exp = env.open_db(b"expiry", txn=txn)
            self._hist = env.open_db(b"history", txn=txn)
            self._meta = env.open_db(b"meta", txn=txn)
            self._interest = env.open_db(b"interest", txn=txn)
            self._chan = env.open_db(b"chan", txn=txn)
            self._msgs = env.open_db(b"msgs", txn=txn)
            self._queue = env.open_db(b"queue", txn=txn)
            self._locks = env.open_db(b"locks", txn=txn)
            self._procs = env.open_db(b"procs", txn=txn)
            self._eph = env.open_db(b"eph", txn=txn)
            self._hinted = env.open_db(b"hinted", txn=txn)
            self._secret = txn.get(b"secret", db=self._meta)
            if self._secret is None:
                self._secret = secrets.token_bytes(16)
                txn.put(b"secret", self._secret, db=self._meta)
        self.max_key_bytes = min(511, env.max_key_size())
        # Names become LMDB keys with a suffix: NUL + owner (12) + acquisition id (8) for locks.
        self.max_name_bytes = self.max_key_bytes - 21

    def _open_read_cache(self) -> None:
        """Find the word of LMDB's lock file that names the snapshot a new reader gets.

        LMDB writers store the id of each committed transaction there, and every read
        transaction starts from the snapshot it names; so a value read in snapshot ``t`` is what
        any read would return for as long as that word still says ``t``. The layout of the lock
        file is LMDB's business, not ours: it is checked against ``env.info()`` around a
        committed write, and the cache stays off where it does not match.

        Closing any descriptor of lock.mdb would drop the fcntl locks by which LMDB tells other
        processes that this one is alive, so the file stays open until LMDB's handle is closed.
        """
        self._cache: tuple[int, dict[str, bytes | None]] = (-1, {})
        self._cache_size = 0
        self._txnid: memoryview | None = None  # the cache is on when this is set
        self._words: memoryview | None = None
        self._lockmap: mmap.mmap | None = None
        self._lockfd = -1
        if self._read_cache_budget <= 0:
            return
        try:
            self._lockfd = os.open(os.path.join(self.path, "lock.mdb"), os.O_RDONLY | os.O_CLOEXEC)
            self._lockmap = mmap.mmap(self._lockfd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            return
        self._words = words = memoryview(self._lockmap).cast("Q")
        for _ in range(3):  # another process's commit in between spoils a check: try again
            before = self._env.info()["last_txnid"]
            if words[_TXNID_WORD] != before:
                continue
            with self._env.begin(write=True, db=self._meta) as txn:
                txn.put(b"probe", _U64.pack(before))
            after = self._env.info()["last_txnid"]
            if after == before + 1 and words[_TXNID_WORD] == after:
                self._txnid = words
                return

    def _close_read_cache(self) -> None:
        """Drop the cache; only once LMDB's handle is closed (or was inherited through fork)."""
        self._cache = (-1, {})
        self._txnid = None
        if self._words is not None:
            self._words.release()
            self._words = None
        if self._lockmap is not None:
            self._lockmap.close()
            self._lockmap = None
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1

    def _after_fork(self) -> None:
        """In a forked child: abandon the parent's handles, then attach anew."""
        _orphans.append(self._env)
        for notifier in self._notifiers():
            notifier.abandon()
        self._close_read_cache()  # our own mapping of the parent's file: still valid, reopened
        inherited = list(self._feeds)
        with contextlib.suppress(OSError):
            os.close(self._attach_fd)  # our copy only; the parent keeps its own
        self._create = False
        self._lock = threading.Lock()
        self._wlock = threading.Lock()  # another thread may have held it at fork time
        self._open()
        # Subscriptions and watches belong to the process that made them; queue and lock
        # handles are objects the child may go on using.
        for feed in inherited:
            if isinstance(feed, _WakeFeed):
                feed.reattach()
            else:
                feed.closed = True

    def _check(self) -> None:
        if self._closed:
            from .._errors import ClosedError

            raise ClosedError("the store is closed")
        if self._forks != _forks and self._pid != os.getpid():
            self._after_fork()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pid != os.getpid():
            _orphans.append(self._env)
            for notifier in self._notifiers():
                notifier.abandon()
            return
        for feed in list(self._feeds):
            feed.close()
        for notifier in self._notifiers():
            notifier.close()
        self._txnid = None  # reads of a closing store go to LMDB, which refuses them
        try:
            if self._registered:
                self._reap(self._me.token)
        except Exception:  # the store stays consistent; stale entries are reaped by others
            pass
        self._env.close()
        self._close_read_cache()
        self._detach()

    def _detach(self) -> None:
        fd = self._attach_fd
        try:
            if not self.keep:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # other processes are still attached
                shutil.rmtree(self.path, ignore_errors=True)
                if not self.persistent:
                    with contextlib.suppress(OSError):  # only if no other store is left
                        os.rmdir(os.path.dirname(self.path))
        finally:
            os.close(fd)

    # -- small helpers --------------------------------------------------------------------
    def _write(self) -> _Write:
        return _Write(self)

    def _notifiers(self) -> list[_notify.Notifier]:
        return [self._notifier] if self._callbacks is None else [self._notifier, self._callbacks]

    def _receiver(self, kind: bytes) -> _notify.Notifier:
        """The notifier whose thread receives hints of ``kind`` in this process."""
        if kind != K_CALLBACK:
            return self._notifier
        with self._lock:
            if self._callbacks is None:
                # Its thread runs the sync callbacks itself, right where their wake-up arrives.
                self._callbacks = _notify.Notifier(
                    self._store_id,
                    self.path,
                    self._token,
                    self._on_callbacks_idle,
                    endpoint=_CALLBACKS_ENDPOINT,
                    thread_name="sharedkv-callbacks",
                    socket_only=True,
                )
            return self._callbacks

    def _send_hints(
        self,
        hints: Iterable[tuple[tuple[str, bytes], int]],
        carried: tuple[bytes, ...] = (),
        carried_to: frozenset[tuple[str, bytes]] | set[tuple[str, bytes]] = frozenset(),
    ) -> int:
        """Send each (token, hint), with the ``carried`` message for those in ``carried_to``
        (only there); return the sum of the counts of those that reached a live process."""
        reached = 0
        dead: set[str] = set()
        full: set[bytes] = set()
        send = self._notifier.send
        for (token, hint), count in hints:
            if token in dead:
                continue
            endpoint = _CALLBACKS_ENDPOINT if hint[0] == K_CALLBACK[0] else ""
            if token == self._token and not endpoint and self._notifier.listening:
                # Our own process: route directly, no socket round trip. (Callbacks go through
                # their socket, so that they run on their own thread.)
                self._notifier.route(hint[0], hint[1:].decode())
                reached += count
                continue
            parts = carried if (token, hint) in carried_to else ()
            result = send(token, hint, endpoint, parts)
            if result == _notify.SENT:
                reached += count
            elif result == _notify.FULL:
                reached += count
                full.add(_overflow_key(bytes.fromhex(token), endpoint))
            else:
                dead.add(token)
        if full:
            # The receiver's socket buffer is full: flag it, so it re-reads everything it
            # follows. While a flag is already up there is nothing to write (a read is cheap).
            with self._env.begin(db=self._meta) as txn:
                full = {key for key in full if txn.get(key) is None}
        if full:
            with self._write() as w:
                for key in full:
                    w.txn.put(key, b"1", db=self._meta)
        for token in dead:
            if not _proc.ProcessId.from_token(bytes.fromhex(token)).alive():
                self._reap(bytes.fromhex(token))
        return reached

    def _decode_record(self, kb: bytes, raw: bytes) -> Record | None:
        """The live record, None when expired or orphaned; BackendError when damaged."""
        if not _well_formed(raw):
            raise BackendError(
                f"the stored record of {kb[:60]!r} is damaged (written by something other "
                "than sharedkv?); overwrite or delete the key"
            )
        rev, exp, flags = _trailer(raw)
        if flags & _F_EXPIRES and exp <= time.time():
            return None
        if flags & _F_EPHEMERAL and not self._owner_alive(_owner(raw)):
            return None
        return Record(_value(raw), rev, exp if flags & _F_EXPIRES else None)

    def _owner_alive(self, token: bytes) -> bool:
        # Asked of the OS on every read of an ephemeral key (a few microseconds), so the key
        # vanishes for every reader the moment its owner is gone; only deaths are remembered.
        if token == self._me.token:
            return True
        if token in self._dead:
            return False
        if _proc.ProcessId.from_token(token).alive():
            return True
        if len(self._dead) > 4096:
            self._dead.clear()
        self._dead.add(token)
        return False

    # -- key-value ------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        if self._forks != _forks:
            self._check()
        raw: bytes | None = self._begin().get(key.encode(), None, self._data)
        if raw is None:
            return None
        if raw[-1:] == b"\0" and len(raw) >= _TSIZE:  # no expiry, not ephemeral
            return raw[:-_TSIZE]
        rec = self._decode_record(b"", raw)
        return None if rec is None else rec.value

    def get_decoded(self, key: str, decode: Decoder, default: Any) -> Any:
        # The hottest path of the library. A fork check that costs a global read; then this
        # process's read cache, whose entries are valid while no transaction has committed since
        # they were read (see _open_read_cache); else one read transaction that py-lmdb ends when
        # it is dropped. A flags byte of 0 marks an ordinary key, and the value is decoded in
        # place, not copied out.
        if self._forks != _forks:
            self._check()
        words = self._txnid
        if words is None:
            raw: Any = self._begin().get(key.encode(), None, self._data)
        else:
            snapshot, cache = self._cache
            raw = cache.get(key, _UNCACHED) if snapshot == words[_TXNID_WORD] else _UNCACHED
            if raw is _UNCACHED:
                raw = self._read_through(key, snapshot, cache)
        if raw is None:
            return default
        if raw[-1:] == b"\0" and len(raw) >= _TSIZE:
            return decode(raw, _TSIZE)
        rec = self._decode_record(b"", raw)  # expiry and owners are checked on every read
        return default if rec is None else decode(rec.value, 0)

    def _read_through(
        self, key: str, snapshot: int, cache: dict[str, bytes | None]
    ) -> bytes | None:
        """Read ``key`` from LMDB and keep it in the cache of the snapshot it was read in.

        The cache is one dict per snapshot, replaced whole when the store moves on, so every
        entry of a dict was read in its snapshot even when threads race to replace it."""
        txn = self._begin()
        raw: bytes | None = txn.get(key.encode(), None, self._data)
        read_in = txn.id()
        size = 0 if raw is None else len(raw)
        # A large value would push out many small ones, and copying it out of LMDB costs little
        # next to unpickling it, so it is not kept.
        keep = size <= self._read_cache_budget >> 10
        cost = len(key) + size + _CACHE_ENTRY_OVERHEAD
        if read_in != snapshot or self._cache_size + cost > self._read_cache_budget:
            # Something committed (or the budget is spent: dropping everything is simpler and
            # cheaper than LRU bookkeeping on every hit). Start the new snapshot's cache.
            self._cache = (read_in, {key: raw} if keep else {})
            self._cache_size = cost if keep else 0
        elif keep:
            cache[key] = raw
            self._cache_size += cost
        return raw

    def get_record(self, key: str) -> Record | None:
        self._check()
        kb = key.encode()
        with self._env.begin(db=self._data) as txn:
            raw = txn.get(kb)
        return None if raw is None else self._decode_record(kb, raw)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self._check()
        out: list[bytes | None] = []
        with self._env.begin(db=self._data) as txn:
            for key in keys:
                kb = key.encode()
                raw = txn.get(kb)
                rec = None if raw is None else self._decode_record(kb, raw)
                out.append(None if rec is None else rec.value)
        return out

    def _live_raw(self, txn: Any, kb: bytes) -> bytes | None:
        """The stored record of ``kb`` if it is live; dead ones are removed on the way."""
        raw: bytes | None = txn.get(kb, None, self._data)
        if raw is None or _plain(raw):
            return raw
        if not _well_formed(raw) or self._decode_record(kb, raw) is None:
            self._remove(txn, kb, raw)  # a damaged record is replaced like a dead one
            return None
        return raw

    def _remove(self, txn: Any, kb: bytes, raw: bytes, keep_record: bool = False) -> None:
        """Delete a record and its index entries (only the index entries with ``keep_record``)."""
        if not keep_record:
            txn.delete(kb, db=self._data)
        if not _well_formed(raw):
            return
        _, exp, flags = _trailer(raw)
        if flags & _F_EXPIRES:
            txn.delete(_be_expiry(exp) + kb, db=self._exp)
        if flags & _F_EPHEMERAL:
            txn.delete(_owner(raw) + kb, db=self._eph)

    def _put(
        self,
        w: _Write,
        kb: bytes,
        value: bytes,
        old: bytes | None,
        ttl: float | None,
        ephemeral: bool = False,
        keep_expiry: bool = False,
    ) -> int:
        txn = w.txn
        if old is not None and old[-1]:
            _, old_exp, flags = _trailer(old)
            if keep_expiry and flags & _F_EXPIRES:
                ttl = old_exp - time.time()
            self._remove(txn, kb, old, keep_record=True)  # the put below replaces the record
        rev = w.next_rev()
        flags = 0
        exp = 0.0
        owner = b""
        if ttl is not None:
            flags |= _F_EXPIRES
            exp = time.time() + ttl
            txn.put(_be_expiry(exp) + kb, b"", db=self._exp)
            w.expiry_added = True
        if ephemeral:
            flags |= _F_EPHEMERAL
            owner = self._me.token
            txn.put(owner + kb, b"", db=self._eph)
            self._register_process(txn)
        txn.put(kb, value + owner + _TRAILER.pack(rev, exp, flags), True, True, False, self._data)
        w.changed(_OP_SET, kb, value, rev)
        return rev

    def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        if_revision: int | None = None,
        ephemeral: bool = False,
    ) -> int:
        kb = key.encode()
        with _Write(self) as w:
            old = w.txn.get(kb, None, self._data)
            if old is not None and not _plain(old):
                old = self._live_raw(w.txn, kb)
            if if_revision is not None:
                current = 0 if old is None else _trailer(old)[0]
                if current != if_revision:
                    return 0
            return self._put(w, kb, value, old, ttl, ephemeral)

    def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None) -> int:
        rev = 0
        with self._write() as w:
            for key, value in items:
                kb = key.encode()
                rev = self._put(w, kb, value, self._live_raw(w.txn, kb), ttl)
        return rev

    def delete(self, key: str, *, if_revision: int | None = None) -> bool:
        kb = key.encode()
        with self._write() as w:
            old = self._live_raw(w.txn, kb)
            if old is None:
                return False
            if if_revision is not None and _trailer(old)[0] != if_revision:
                return False
            self._remove(w.txn, kb, old)
            w.changed(_OP_DELETE, kb, None, w.next_rev())
            return True

    def pop(self, key: str) -> bytes | None:
        kb = key.encode()
        with self._write() as w:
            old = self._live_raw(w.txn, kb)
            if old is None:
                return None
            rec = self._decode_record(kb, old)
            self._remove(w.txn, kb, old)
            w.changed(_OP_DELETE, kb, None, w.next_rev())
        return None if rec is None else rec.value

    def incr(self, key: str, amount: int) -> int:
        from .._codec import decode_int

        kb = key.encode()
        with self._write() as w:
            old = self._live_raw(w.txn, kb)
            rec = None if old is None else self._decode_record(kb, old)
            result = decode_int(None if rec is None else rec.value, repr(key)) + amount
            self._put(w, kb, str(result).encode(), old, None, keep_expiry=True)
        return result

    def expire(self, key: str, ttl: float | None) -> bool:
        kb = key.encode()
        with self._write() as w:
            old = self._live_raw(w.txn, kb)
            if old is None:
                return False
            flags = old[-1]
            if ttl is None and not flags & _F_EXPIRES:
                return True
            rec = self._decode_record(kb, old)
            assert rec is not None
            self._put(w, kb, rec.value, old, ttl, bool(flags & _F_EPHEMERAL))
        return True

    def items(self, pattern: str | None = None) -> list[tuple[str, bytes]]:
        self._check()
        out: list[tuple[str, bytes]] = []
        prefix = _literal_prefix(pattern)
        with self._env.begin(db=self._data) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return out
            for kb, raw in cur:
                if prefix and not kb.startswith(prefix):
                    break
                key = kb.decode()
                if pattern is not None and not fnmatchcase(key, pattern):
                    continue
                if _plain(raw):
                    out.append((key, raw[:-_TSIZE]))
                elif _well_formed(raw):  # a damaged record is left out of listings
                    rec = self._decode_record(kb, raw)
                    if rec is not None:
                        out.append((key, rec.value))
        return out

    def keys(self, pattern: str | None = None) -> list[str]:
        return [key for key, _ in self.items(pattern)]

    def count(self) -> int:
        self._check()
        with self._env.begin() as txn:
            total = int(txn.stat(self._data)["entries"])
            if txn.stat(self._exp)["entries"] == 0 and txn.stat(self._eph)["entries"] == 0:
                return total
            # Some keys may be expired or orphaned but not yet swept: count the live ones.
            cur = txn.cursor(db=self._data)
            return sum(
                1
                for kb, raw in cur
                if _plain(raw) or (_well_formed(raw) and self._decode_record(kb, raw) is not None)
            )

    def clear(self) -> None:
        with self._write() as w:
            cur = w.txn.cursor(db=self._data)
            keys = [
                bytes(kb)
                for kb, raw in cur
                if not _well_formed(raw) or self._decode_record(kb, raw)
            ]
            w.txn.drop(self._data, delete=False)
            w.txn.drop(self._exp, delete=False)
            w.txn.drop(self._eph, delete=False)
            for kb in keys:
                w.changed(_OP_DELETE, kb, None, w.next_rev())

    def revision(self) -> int:
        self._check()
        with self._env.begin() as txn:
            return _read_counters(txn, self._meta)[REV]

    # -- expiry and history -----------------------------------------------------------------
    def _maybe_sweep(self, w: _Write, force: bool = False) -> None:
        now = time.time()
        if not force and now < self._sweep_at:
            return
        self._sweep_at = now + 0.05  # amortize: expired keys are invisible anyway
        cur = w.txn.cursor(db=self._exp)
        removed = 0
        while cur.first() and removed < 256:
            ek = cur.key()
            if _BEF.unpack_from(ek)[0] > now:
                break
            kb = bytes(ek[8:])
            raw = w.txn.get(kb, db=self._data)
            cur.delete()
            # Expire the record only if this index entry is really its expiry.
            if (
                raw is not None
                and _well_formed(raw)
                and raw[-1] & _F_EXPIRES
                and _trailer(raw)[1] == _BEF.unpack_from(ek)[0]
            ):
                self._remove(w.txn, kb, raw)
                w.changed(_OP_EXPIRE, kb, None, w.next_rev())
            removed += 1

    def _trim_history(self, w: _Write, rev: int) -> None:
        """Keep the history within ``history`` changes and ``history_bytes`` bytes.

        Called every 64 revisions, or at once when over the byte budget (amortized)."""
        ctr = w.counters()
        cutoff = _BE64.pack(max(0, rev - self._history))
        newest = _BE64.pack(rev)
        cur = w.txn.cursor(db=self._hist)
        key = cur.key() if cur.first() else b""
        # Never the change just made; delete() moves the cursor on to the next record.
        while key and key != newest and (key <= cutoff or ctr[HBYTES] > self._history_bytes):
            ctr[HBYTES] -= len(cur.value())
            cur.delete()
            key = cur.key()

    def _next_expiry(self) -> float | None:
        with self._env.begin(db=self._exp) as txn:
            cur = txn.cursor()
            if cur.first():
                return float(_BEF.unpack_from(cur.key())[0])
        return None

    # -- interest registry and process table --------------------------------------------------
    def _register_process(self, txn: Any) -> None:
        if not self._registered:
            txn.put(self._me.token, _U64.pack(int(time.time())), db=self._procs)
            self._registered = True

    def _interested(self, txn: Any, version: int, kind: bytes, name: str) -> dict[str, int]:
        """Tokens (hex) of processes with interest of ``kind`` matching ``name``, with counts.

        The registry is cached per process and reloaded when its version counter moves."""
        if version != self._reg_version:
            self._load_registry(txn, version)
        if not self._reg:
            return {}
        cache_key = (kind, name)
        found = self._match_cache.get(cache_key)
        if found is None:
            found = {}
            for rkind, pattern, token, count in self._reg:
                if rkind == kind and (pattern == name or fnmatchcase(name, pattern)):
                    found[token] = found.get(token, 0) + count
            if len(self._match_cache) > 4096:
                self._match_cache.clear()
            self._match_cache[cache_key] = found
        return found

    def _load_registry(self, txn: Any, version: int) -> None:
        reg = []
        for key, raw in txn.cursor(db=self._interest):
            ik = bytes(key)  # a view of the map when the transaction reads with buffers
            kind = ik[:1]
            pattern, token = ik[1 : -_TOKEN_SIZE - 1], ik[-_TOKEN_SIZE:]
            reg.append((kind, pattern.decode(), token.hex(), _U64.unpack(raw)[0]))
        self._reg = reg
        self._reg_version = version
        self._match_cache = {}
        self._targets_cache = {}

    def _message_targets(self, channel: str) -> tuple[tuple[bytes, str, bytes, int], ...]:
        """Who follows ``channel`` by the cached registry: (token, token hex, kind, count).

        Callers make sure the registry is current (its version read in their transaction)."""
        found = self._targets_cache.get(channel)
        if found is None:
            counts: dict[tuple[str, bytes], int] = {}
            for rkind, pattern, token, count in self._reg:
                if rkind not in _MESSAGE_KINDS:
                    continue
                if pattern == channel or fnmatchcase(channel, pattern):
                    counts[(token, rkind)] = counts.get((token, rkind), 0) + count
            found = tuple((bytes.fromhex(t), t, k, n) for (t, k), n in counts.items())
            if len(self._targets_cache) > 4096:
                self._targets_cache.clear()
            self._targets_cache[channel] = found
        return found

    def _add_interest(self, w: _Write, kind: bytes, pattern: str, delta: int) -> None:
        ik = kind + pattern.encode() + b"\0" + self._me.token
        raw = w.txn.get(ik, db=self._interest)
        count = (_U64.unpack(raw)[0] if raw else 0) + delta
        if count > 0:
            w.txn.put(ik, _U64.pack(count), db=self._interest)
        else:
            w.txn.delete(ik, db=self._interest)
        self._register_process(w.txn)
        w.bump(IVER)

    def _reap(self, token: bytes) -> None:
        """Remove everything a (dead or closing) process left: interest, locks, ephemeral keys."""
        with self._write() as w:
            txn = w.txn
            changed = False
            for ik in [k for k, _ in txn.cursor(db=self._interest) if k.endswith(token)]:
                txn.delete(ik, db=self._interest)
                changed = True
            if changed:
                w.bump(IVER)
            for lk in [k for k, _ in txn.cursor(db=self._locks) if token in k]:
                name = lk[: lk.index(b"\0")]
                if lk[len(name) + 1 : len(name) + 1 + _TOKEN_SIZE] == token:
                    txn.delete(lk, db=self._locks)
                    w.wake(K_LOCK, name)
            cur = txn.cursor(db=self._eph)
            keys = []
            if cur.set_range(token):
                for ek, _ in cur:
                    if not ek.startswith(token):
                        break
                    keys.append(bytes(ek[_TOKEN_SIZE:]))
            for kb in keys:
                txn.delete(token + kb, db=self._eph)
                raw = txn.get(kb, db=self._data)
                if raw is not None and _ephemeral_of(raw, token):
                    self._remove(txn, kb, raw)
                    w.changed(_OP_DELETE, kb, None, w.next_rev())
            txn.delete(token, db=self._procs)
            txn.delete(_overflow_key(token, ""), db=self._meta)
            txn.delete(_overflow_key(token, _CALLBACKS_ENDPOINT), db=self._meta)
            _delete_prefix(txn, self._hinted, token)

    def reap_dead(self) -> int:
        """Release what dead processes left behind; returns how many processes were reaped."""
        self._check()
        with self._env.begin() as txn:
            tokens = {bytes(k) for k, _ in txn.cursor(db=self._procs)}
            # An overflow flag can be written just after its process was reaped: sweep those too.
            cur = txn.cursor(db=self._meta)
            if cur.set_range(b"ovf"):
                for key, _ in cur:
                    if not key.startswith(b"ovf"):
                        break
                    tokens.add(bytes(key[3 : 3 + _TOKEN_SIZE]))
        dead = [t for t in tokens if not _proc.ProcessId.from_token(t).alive()]
        for token in dead:
            self._reap(token)
        return len(dead)

    # -- the notifier's background work ------------------------------------------------------
    def _next_deadline(self) -> float | None:
        if self._closed or not any(f.kind == K_KEY for f in list(self._feeds)):
            return None
        try:
            nxt = self._next_expiry()
        except lmdb.Error:
            return None
        deadline = None if nxt is None else time.monotonic() + max(0.0, nxt - time.time())
        if not _notify._HAS_PIDFD and self._ephemeral_owners():
            # Without pidfds, look for dead owners of ephemeral keys twice a second.
            soon = time.monotonic() + 0.5
            deadline = soon if deadline is None else min(deadline, soon)
        return deadline

    def _ephemeral_owners(self) -> dict[bytes, int]:
        """Processes (other than this one) that own ephemeral keys: token -> pid."""
        owners: dict[bytes, int] = {}
        with self._env.begin(db=self._eph) as txn:
            cur = txn.cursor()
            more = cur.first()
            while more:
                token = bytes(cur.key()[:_TOKEN_SIZE])
                if token != self._me.token:
                    owners[token] = _proc.ProcessId.from_token(token).pid
                # Jump past every key of this owner.
                more = cur.set_range(token + b"\xff" * 8)
        return owners

    def _on_process_exit(self, token: bytes) -> None:
        if not self._closed and self._pid == os.getpid():
            self._reap(token)

    def _on_idle(self, hints: _notify.Hints) -> None:
        if not self._take_hints(self._notifier, K_MESSAGE, "", hints):
            return
        if any(f.kind == K_KEY for f in list(self._feeds)):
            nxt = self._next_expiry()
            if nxt is not None and nxt <= time.time():
                with self._write() as w:
                    self._maybe_sweep(w, force=True)
            # Watchers must see ephemeral keys go when their owner dies: ask the kernel to tell
            # us when each owner exits (pidfd), or check them here where there is no pidfd.
            owners = self._ephemeral_owners()
            if _notify._HAS_PIDFD:
                self._notifier.watch_exits(owners)
            else:
                for token in owners:
                    if not _proc.ProcessId.from_token(token).alive():
                        self._reap(token)

    def _on_callbacks_idle(self, hints: _notify.Hints) -> None:
        if self._callbacks is not None:
            self._take_hints(self._callbacks, K_CALLBACK, _CALLBACKS_ENDPOINT, hints)

    def _take_hints(
        self, receiver: _notify.Notifier, kind: bytes, endpoint: str, hints: _notify.Hints
    ) -> bool:
        """After ``receiver`` routed a burst: take down the "hinted" marks of the message
        wake-ups it brought, so that publishers send the next ones, and re-read everything when
        a wake-up was lost to a full socket. False when this backend can no longer be used here.

        A publisher that finds a mark sends nothing, so every message published while the mark
        was up must still be read: a channel that moved past the announced message is routed
        again, after the mark is gone (its first routing may have read too early)."""
        if self._closed or self._pid != os.getpid():
            return False
        token = self._me.token
        ovf = _overflow_key(token, endpoint)
        names = [name for k, name in hints if k == kind[0]]
        again: list[str] = []
        if names:
            if kind == K_MESSAGE:
                # The readers just woken run on other threads of this process. Let them take
                # the GIL first: the transaction below holds the store's writer lock, and a
                # writer lock held while this thread waits for the GIL stalls every publisher.
                time.sleep(0)
            with self._write() as w:
                txn = w.txn
                overflowed = txn.pop(ovf, db=self._meta) is not None
                for name in names:
                    cb = name.encode()
                    mark = txn.pop(token + kind + cb, db=self._hinted)
                    if mark is None:
                        continue
                    meta = txn.get(cb, db=self._chan)
                    if len(mark) != _HINTED.size or (
                        meta is not None and _CHAN.unpack(meta)[0] > _HINTED.unpack(mark)[1]
                    ):
                        again.append(name)
                if overflowed:
                    _delete_prefix(txn, self._hinted, token + kind)
        else:
            with self._env.begin(db=self._meta) as txn:
                overflowed = txn.get(ovf) is not None
            if overflowed:
                with self._write() as w:
                    w.txn.delete(ovf, db=self._meta)
                    _delete_prefix(w.txn, self._hinted, token + kind)
        if overflowed:
            for feed in receiver.feeds:
                feed.hint(None)
        for name in again:
            receiver.route(kind[0], name)
        return True

    # -- messaging -------------------------------------------------------------------------
    def _current_registry(self, txn: Any) -> None:
        version = _read_counters(txn, self._meta)[IVER]
        if version != self._reg_version:
            self._load_registry(txn, version)

    def has_subscribers(self, channel: str) -> bool:
        if self._forks != _forks:
            self._check()
        if self._message_targets(channel):
            return True  # as last seen; publish() checks again in its transaction
        with self._env.begin() as txn:
            self._current_registry(txn)
        return bool(self._message_targets(channel))

    def publish(self, channel: str, payload: bytes) -> int:
        if self._closed or self._forks != _forks:
            self._check()
        targets = self._message_targets(channel)
        if not targets:
            # Most publishes with nobody listening stop here, after one read transaction.
            with self._env.begin() as txn:
                self._current_registry(txn)
            targets = self._message_targets(channel)
            if not targets:
                return 0
        cb = channel.encode()
        sends: list[tuple[tuple[str, bytes], int]] = []
        carried_to: set[tuple[str, bytes]] = set()  # the wake-ups that carry the message
        reached = 0
        # The hot path of every message: one write transaction, without what _Write adds for
        # key-value writes (history, sweeping expired keys). Publishing a large message, it
        # reads views of the map, not copies: trimming then needs only the size of the oldest
        # message, not its bytes (for 64 KiB, a copy that touched 16 pages a new process had
        # never mapped). Small ones are faster with copies (views cost more to make).
        large = len(payload) >= _TRIM_BY_VIEW
        with _BareWrite(self, buffers=large) as w:
            txn = w.txn
            ctr = _read_counters(txn, self._meta)
            if ctr[IVER] != self._reg_version:
                self._load_registry(txn, ctr[IVER])
                targets = self._message_targets(channel)
                if not targets:
                    return 0  # nothing written: the commit writes nothing
            # The store-wide message id, which orders messages across channels: the id of this
            # transaction, which LMDB raises on every commit, so that publish writes no counter.
            msg_id = txn.id()
            meta = txn.get(cb, None, self._chan)
            last, first, nbytes = _CHAN.unpack(meta) if meta else (0, 1, 0)
            seq = last + 1
            msgs, record = self._msgs, _U64.pack(msg_id) + payload
            txn.put(cb + b"\0" + _BE64.pack(seq), record, True, True, False, msgs)
            nbytes += len(payload)
            # Bounded buffer: drop the oldest messages past the count or byte limit.
            trim = None
            while first < seq and (seq - first + 1 > self._buffer or nbytes > self._buffer_bytes):
                old_key = cb + b"\0" + _BE64.pack(first)
                if not large:
                    old = txn.pop(old_key, msgs)
                    if old is not None:
                        nbytes -= len(old) - 8
                else:
                    trim = trim or txn.cursor(msgs)
                    if trim.set_key(old_key):
                        nbytes -= len(trim.value()) - 8
                        trim.delete()
                first += 1
            txn.put(cb, _CHAN.pack(seq, first, nbytes), True, True, False, self._chan)
            now = time.time()
            mark = _HINTED.pack(now, seq)
            hinted = self._hinted
            for token, token_hex, kind, count in targets:
                hint = kind + cb
                if token_hex == self._token and kind == K_MESSAGE:
                    sends.append(((token_hex, hint), count))  # routed here, at once
                    continue
                # One wake-up per channel until the receiver has taken it (_take_hints):
                # a burst of messages costs one datagram, and no socket fills up.
                mark_key = token + kind + cb
                if len(payload) <= _CARRY_MAX:
                    # No mark up for any channel of that receiving socket: its process has
                    # taken every earlier wake-up, so the wake-up can carry the message
                    # itself, to be read without reading the log (each feed still checks
                    # the message's seq against its cursor: see _take_carried).
                    endpoint, marks = token + kind, txn.cursor(hinted)
                    if not (marks.set_range(endpoint) and marks.key()[: len(endpoint)] == endpoint):
                        txn.put(mark_key, mark, True, True, False, hinted)
                        sends.append(((token_hex, hint), count))
                        carried_to.add((token_hex, hint))
                        continue
                if not txn.put(mark_key, mark, True, False, False, hinted):
                    sent = txn.get(mark_key, None, hinted)
                    if (
                        len(sent) == _HINTED.size
                        and abs(now - _HINTED.unpack(sent)[0]) < _HINT_RESEND_S
                    ):
                        reached += count
                        continue
                    txn.put(mark_key, mark, True, True, False, hinted)
                sends.append(((token_hex, hint), count))
        if not carried_to:
            return reached + self._send_hints(sends)
        carried = (b"\0" + _CARRIED.pack(self._secret, seq, msg_id), payload)
        return reached + self._send_hints(sends, carried, carried_to)

    def subscribe(self, patterns: Iterable[str], *, callbacks: bool = False) -> Feed:
        return _MessageFeed(self, tuple(patterns), K_CALLBACK if callbacks else K_MESSAGE)

    def watch(self, pattern: str, since: int | None) -> Feed:
        return _WatchFeed(self, pattern, since)

    # -- queues ----------------------------------------------------------------------------
    # A queue is its items and nothing else: the oldest and the newest key give its head and
    # tail, so a put writes one record (a batch, one per item), a take deletes the ones it
    # returns, and an empty take writes nothing. These are the hottest writes and touch no
    # other record, so each is one bare write transaction rather than a _Write: no expiry
    # sweep, no store counters. A put wakes the processes whose getters sleep on the queue, a
    # take those whose putters wait for room. With nobody waiting anywhere in the store, that
    # costs one read of the interest version, inside the transaction, which orders it against
    # a waiter's registration (see _wait._plan).
    def queue_put(self, name: str, item: bytes, maxsize: int) -> bool:
        return self._queue_append(name, (item,), maxsize)

    def queue_put_many(self, name: str, items: Sequence[bytes], maxsize: int) -> bool:
        return self._queue_append(name, items, maxsize)

    def queue_get(self, name: str) -> bytes | None:
        taken = self._queue_take(name, 1)
        return taken[0] if taken else None

    def queue_get_many(self, name: str, max_items: int) -> list[bytes]:
        return self._queue_take(name, max_items)

    def _queue_append(self, name: str, items: Sequence[bytes], maxsize: int) -> bool:
        nb = name.encode()
        prefix = nb + b"\0"
        with _BareWrite(self) as w:
            cur = w.txn.cursor(db=self._queue)
            tail = _queue_tail(cur, nb)
            if maxsize > 0 and tail - _queue_head(cur, nb, tail) + len(items) > maxsize:
                return False  # nothing written: the commit writes nothing
            if len(items) == 1:
                cur.put(prefix + _BE64.pack(tail), items[0])
            else:
                pack = _BE64.pack
                cur.putmulti([(prefix + pack(seq), item) for seq, item in enumerate(items, tail)])
            w.waiters = self._queue_waiters(w.txn, name)
            w.hint = K_QUEUE + nb
        return True

    def _queue_take(self, name: str, max_items: int) -> list[bytes]:
        nb = name.encode()
        taken: list[bytes] = []
        with _BareWrite(self) as w:
            cur = w.txn.cursor(db=self._queue)
            if cur.set_range(nb + b"\0"):
                # Every key from here up to nb + 1 is this queue's (see _queue_tail); a cursor
                # moved past the last record of the database has the key b"".
                beyond = nb + b"\1"
                key = cur.key()
                while key and key < beyond:
                    taken.append(cur.value())
                    cur.delete()
                    if len(taken) == max_items:
                        break
                    key = cur.key()
            if taken:
                w.waiters = self._queue_waiters(w.txn, name)
                w.hint = K_QUEUE + nb
        return taken

    def _queue_waiters(self, txn: Any, name: str) -> dict[str, int]:
        version = _read_counters(txn, self._meta)[IVER]
        if version == self._reg_version and not self._reg:
            return {}
        return self._interested(txn, version, K_QUEUE, name)

    def queue_size(self, name: str) -> int:
        self._check()
        nb = name.encode()
        with self._env.begin(db=self._queue) as txn:
            cur = txn.cursor()
            tail = _queue_tail(cur, nb)
            return tail - _queue_head(cur, nb, tail)

    def queue_feed(self, name: str) -> Feed:
        return _WakeFeed(self, K_QUEUE, name)

    # -- locks -----------------------------------------------------------------------------
    def _lock_key(self, name: bytes, owner: LockInfo) -> bytes:
        return name + b"\0" + self._me.token + _U64.pack(owner.ident)

    def _lock_holders(self, txn: Any, nb: bytes) -> list[tuple[bytes, bytes]]:
        prefix = nb + b"\0"
        cur = txn.cursor(db=self._locks)
        out = []
        if cur.set_range(prefix):
            for lk, val in cur:
                if not lk.startswith(prefix):
                    break
                out.append((bytes(lk), bytes(val)))
        return out

    def lock_acquire(self, name: str, limit: int, owner: LockInfo) -> bool:
        nb = name.encode()
        with self._write() as w:
            txn = w.txn
            holders = 0
            for lk, _ in self._lock_holders(txn, nb):
                token = lk[len(nb) + 1 : len(nb) + 1 + _TOKEN_SIZE]
                if token == self._me.token or _proc.ProcessId.from_token(token).alive():
                    holders += 1
                else:
                    txn.delete(lk, db=self._locks)  # its holder died: the OS told us
            if holders >= limit:
                return False
            value = _LOCKVAL.pack(owner.since, owner.thread_id) + owner.thread_name.encode()[:200]
            txn.put(self._lock_key(nb, owner), value, db=self._locks)
            self._register_process(txn)
        return True

    def lock_release(self, name: str, owner: LockInfo) -> bool:
        nb = name.encode()
        lk = self._lock_key(nb, owner)
        with self._write() as w:
            if not w.txn.delete(lk, db=self._locks):
                return False
            w.wake(K_LOCK, nb)
        return True

    def lock_owners(self, name: str) -> list[LockInfo]:
        self._check()
        nb = name.encode()
        with self._env.begin() as txn:
            holders = self._lock_holders(txn, nb)
        out = []
        for lk, val in holders:
            rest = lk[len(nb) + 1 :]
            pid_info = _proc.ProcessId.from_token(rest[:_TOKEN_SIZE])
            if not pid_info.alive():
                continue
            since, thread_id = _LOCKVAL.unpack_from(val)
            out.append(
                LockInfo(
                    pid=pid_info.pid,
                    thread_id=thread_id,
                    thread_name=val[_LOCKVAL.size :].decode(errors="replace"),
                    since=since,
                    ident=_U64.unpack(rest[_TOKEN_SIZE:])[0],
                )
            )
        return out

    def lock_feed(self, name: str) -> Feed:
        return _WakeFeed(self, K_LOCK, name)

    def lock_names(self) -> list[str]:
        """Names of the locks and semaphores that have holders right now."""
        self._check()
        names: set[str] = set()
        with self._env.begin(db=self._locks) as txn:
            for key, _ in txn.cursor():
                names.add(bytes(key[: key.index(b"\0")]).decode())
        return sorted(names)

    # -- statistics ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        self._check()
        info = self._env.info()
        with self._env.begin() as txn:
            ctr = _read_counters(txn, self._meta)
            # Every channel's last seq is how many messages it was sent.
            published = sum(_CHAN.unpack(meta)[0] for _, meta in txn.cursor(db=self._chan))
            locks = txn.stat(self._locks)["entries"]
            procs = [bytes(k) for k, _ in txn.cursor(db=self._procs)]
        used = 0
        for fname in ("data.mdb", "lock.mdb"):
            with contextlib.suppress(FileNotFoundError):
                used += os.stat(os.path.join(self.path, fname)).st_blocks * 512
        return {
            "url": self.url,
            "path": self.path,
            "keys": self.count(),
            "bytes_used": used,
            "map_size": info["map_size"],
            "revision": ctr[REV],
            "messages_published": published,
            "messages_dropped": ctr[DROPPED],
            "locks_held": locks,
            "processes": [p.pid for p in map(_proc.ProcessId.from_token, procs) if p.alive()],
            "readers": _reader_pids(self._env),
        }

    def add_dropped(self, count: int) -> None:
        with self._write() as w:
            w.bump(DROPPED, count)


def _reader_pids(env: Any) -> list[int]:
    pids = set()
    for line in env.readers().splitlines()[1:]:
        parts = line.split()
        if parts and parts[0].isdigit():
            pids.add(int(parts[0]))
    return sorted(pids)


def _delete_prefix(txn: Any, db: Any, prefix: bytes) -> None:
    cur = txn.cursor(db=db)
    if cur.set_range(prefix):
        while cur.key().startswith(prefix) and cur.delete():
            pass


def _literal_prefix(pattern: str | None) -> bytes:
    """The part of a glob before its first wildcard, to seek instead of scanning everything."""
    if not pattern:
        return b""
    cut = len(pattern)
    for ch in "*?[":
        i = pattern.find(ch)
        if i != -1:
            cut = min(cut, i)
    return pattern[:cut].encode()


# -- queue records ---------------------------------------------------------------------------
def _queue_tail(cur: Any, nb: bytes) -> int:
    """The sequence number the next item of queue ``nb`` gets: one past its newest item's, 0
    when it is empty. Its items are the keys from nb + NUL up to nb + 1, and no other queue's
    key falls in between, since names hold no NUL."""
    found = cur.prev() if cur.set_range(nb + b"\1") else cur.last()
    key = cur.key() if found else b""
    if len(key) == len(nb) + 9 and key.startswith(nb + b"\0"):
        return int(_BE64.unpack_from(key, len(nb) + 1)[0]) + 1
    return 0


def _queue_head(cur: Any, nb: bytes, tail: int) -> int:
    """The sequence number of the oldest item of queue ``nb`` (``tail`` when it is empty)."""
    if tail and cur.set_range(nb + b"\0"):
        key = cur.key()
        if len(key) == len(nb) + 9 and key.startswith(nb + b"\0"):
            return int(_BE64.unpack_from(key, len(nb) + 1)[0])
    return tail


# -- feeds -----------------------------------------------------------------------------------
class _ShmFeed(HintedFeed):
    """A feed registered with this process's notifier (and, for others, in the interest table)."""

    kind: bytes

    def __init__(self, backend: ShmBackend, patterns: tuple[str, ...]) -> None:
        super().__init__()
        backend._check()
        self.backend = backend
        self.patterns = patterns
        # A change must end the sleep of a thread reading the socket for its wait (see wait()).
        self._poke: Callable[[], None] | None = (
            None if self.kind == K_CALLBACK else backend._notifier.poke
        )

    def _register(self, w: _Write) -> None:
        for pattern in self.patterns:
            self.backend._add_interest(w, self.kind, pattern, +1)

    def _start(self) -> None:
        b = self.backend
        receiver = b._receiver(self.kind)
        b._feeds.add(self)
        receiver.add(self)
        receiver.listen()
        b._notifier.wake()  # let the notifier look at deadlines and owners for this feed

    def matches(self, kind: int, name: str) -> bool:
        return kind == self.kind[0] and (
            name in self.patterns or _notify.glob_matches(self.patterns, name) is not None
        )

    def carry(self, name: str, message: memoryview) -> None:
        self.hint(name)  # only subscriptions take carried messages

    def _changed(self) -> None:
        super()._changed()
        if self._poke is not None:
            self._poke()

    def wait(self, generation: int, timeout: float) -> bool:
        # The waiting thread reads the process's socket itself while no other thread does:
        # a wake-up then reaches it directly, not through the notifier thread.
        if self.kind != K_CALLBACK and not self.closed:
            notifier = self.backend._notifier
            done = notifier.lead(
                lambda: self._generation != generation or self.closed,
                timeout,
                lambda: not self._wakeups and notifier.feeds == (self,),
            )
            if done is not None:
                return done
            with notifier.standing_by():
                return super().wait(generation, timeout)
        return super().wait(generation, timeout)

    def add_wakeup(self, callback: Callable[[], None]) -> Callable[[], None]:
        remove = super().add_wakeup(callback)
        if self.kind != K_CALLBACK:
            self.backend._notifier.reclaim()  # a waiter may have left the socket untended
        return remove

    def close(self) -> None:
        if self.closed:
            return
        b = self.backend
        b._receiver(self.kind).remove(self)
        b._feeds.discard(self)
        super().close()
        if self._poke is not None:
            self._poke()  # a thread reading the socket for this feed's wait leaves it
        if b._closed or b._pid != os.getpid():
            return
        with contextlib.suppress(Exception), b._write() as w:
            for pattern in self.patterns:
                b._add_interest(w, self.kind, pattern, -1)


class _MessageFeed(_ShmFeed):
    """A subscription: read by threads and event loops (``K_MESSAGE``), or by sync callbacks
    that the ``sharedkv-callbacks`` thread runs as wake-ups of this feed (``K_CALLBACK``)."""

    def __init__(self, backend: ShmBackend, patterns: tuple[str, ...], kind: bytes) -> None:
        self.kind = kind
        self.wakes_on_callback_thread = kind == K_CALLBACK
        super().__init__(backend, patterns)
        # Where each channel stood when we subscribed: later messages are ours, and any of
        # them trimmed before we read them are reported as a gap.
        self._cursors: dict[str, int] = {}
        self._carried: tuple[str, int, bytes] | None = None  # channel, seq, payload
        self._sink: Callable[[Any], None] | None = None  # see deliver_to()
        # Each pattern with the part before its first wildcard, and whether that is all of it.
        self._prefixes = [
            (pattern, prefix, len(prefix) == len(pattern.encode()))
            for pattern, prefix in ((p, _literal_prefix(p)) for p in patterns)
        ]
        # Listen before registering: a message published in between must find our socket.
        self._start()
        with backend._write() as w:
            self._register(w)
            for channel, meta in self._followed(w.txn):
                self._cursors[channel] = _CHAN.unpack(meta)[0]

    def _followed(self, txn: Any) -> Iterator[tuple[str, bytes]]:
        """Every existing channel matching our patterns, with its meta record."""
        chan = self.backend._chan
        seen: set[str] = set()
        for pattern, prefix, exact in self._prefixes:
            if exact:  # one channel
                meta = txn.get(prefix, db=chan)
                if meta is not None and pattern not in seen:
                    seen.add(pattern)
                    yield pattern, meta
                continue
            cur = txn.cursor(db=chan)
            if not cur.set_range(prefix):
                continue
            for ck, meta in cur:
                if not ck.startswith(prefix):
                    break
                channel = bytes(ck).decode("utf-8", "replace")
                if channel not in seen and fnmatchcase(channel, pattern):
                    seen.add(channel)
                    yield channel, meta

    def refresh(self) -> None:
        self.backend._receiver(self.kind).wake_feed(self)

    def deliver_to(self, sink: Callable[[Any], None]) -> None:
        if self.kind == K_CALLBACK:
            self._sink = sink

    def carry(self, name: str, message: memoryview) -> None:
        # Set here by the receiving thread, taken by fetch() on a reader's thread: one reference
        # swapped whole. A carried message that a reader misses, or that another overwrites
        # before it was taken, only sends that reader to the log, which has them all.
        if len(message) >= _CARRIED.size:
            secret, seq, _ = _CARRIED.unpack_from(message)
            if hmac.compare_digest(secret, self.backend._secret):
                # The view is valid only during this call: the sink decodes it right here,
                # a reader on another thread later takes a copy.
                payload = message[_CARRIED.size :]
                if self._sink is not None and self._deliver(name, seq, payload):
                    return
                self._carried = (name, seq, payload.tobytes())
        super().hint(name)

    def _deliver(self, channel: str, seq: int, payload: memoryview) -> bool:
        """Hand a carried message to the sink at once, when it is the next one of its channel
        and nothing else waits to be read: the path of a sync callback's message, which this
        thread (the feed's one reader) then runs without a wake-up or a read of the log."""
        with self._mutex:
            if self._hinted or self._everything or self.closed:
                return False
            if seq != self._cursors.get(channel, 0) + 1:
                return False
            self._cursors[channel] = seq
        assert self._sink is not None
        self._sink((channel, payload, seq, self._pattern_of(channel)))
        return True

    def _pattern_of(self, channel: str) -> str | None:
        """The pattern a message of ``channel`` is reported with: None for a literal match."""
        pattern = self.patterns[0] if len(self.patterns) == 1 else None
        if pattern is None:
            pattern = _notify.glob_matches(self.patterns, channel)
        return None if pattern == channel else pattern

    def hint(self, name: str | None) -> None:
        # A plain wake-up after a carried one announces messages the carried one is not: a
        # reader that takes both hints at once must read the log. (This matters where the
        # reader runs on another thread than the one receiving its wake-ups.)
        self._carried = None
        super().hint(name)

    def _take_carried(self, dirty: list[str], everything: bool) -> Any:
        """The carried message as an event, when it is all there is to read, else None.

        The publisher carried it only if every earlier wake-up to this process had been
        taken, so nothing published before it is unread; its seq must follow our cursor."""
        carried, self._carried = self._carried, None
        if carried is None or everything or dirty != [carried[0]]:
            return None
        channel, seq, payload = carried
        if seq != self._cursors.get(channel, 0) + 1:
            return None
        self._cursors[channel] = seq
        return (channel, payload, seq, self._pattern_of(channel))

    def fetch(self) -> list[Any]:
        dirty, everything = self.take_hints()
        if not dirty and not everything:
            return []
        if self._carried is not None:
            event = self._take_carried(dirty, everything)
            if event is not None:
                return [event]
        events: list[tuple[int, Any]] = []
        patterns = self.patterns
        channels_read = 0
        # Read every followed channel, not only the one we were woken for, in one snapshot:
        # a message of another channel whose wake-up is still in flight (or was lost to a full
        # socket) is then never overtaken by a later one. Sorting by the store-wide message
        # number restores publication order across channels.
        with self.backend._env.begin() as txn:
            for channel, meta in self._followed(txn):
                pattern = patterns[0] if len(patterns) == 1 else None
                if pattern is None:
                    pattern = _notify.glob_matches(patterns, channel)
                if pattern is not None and self._read_channel(txn, channel, meta, pattern, events):
                    channels_read += 1
        if channels_read > 1:
            events.sort(key=lambda e: e[0])
        return [e for _, e in events]

    def _read_channel(
        self, txn: Any, channel: str, meta: bytes, pattern: str, events: list[tuple[int, Any]]
    ) -> bool:
        """Append the messages of ``channel`` after our cursor; False when there were none."""
        last, first, _ = _CHAN.unpack(meta)
        cursor = self._cursors.get(channel, 0)
        if cursor >= last:
            return False
        shown = None if pattern == channel else pattern
        if cursor + 1 < first:
            events.append((0, Gap(channel, cursor + 1, first - 1)))
        start = max(cursor + 1, first)
        prefix = channel.encode() + b"\0"
        size = len(prefix) + 8
        cur = txn.cursor(db=self.backend._msgs)
        if cur.set_range(prefix + _BE64.pack(start)):
            for mk, val in cur:
                if not mk.startswith(prefix):
                    break
                seq = _BE64.unpack_from(mk, len(prefix))[0] if len(mk) == size else 0
                if seq == 0 or len(val) < 8:
                    log.warning("sharedkv: skipping a malformed message record in %r", channel)
                    continue
                events.append((_U64.unpack_from(val)[0], (channel, val[8:], seq, shown)))
                if seq >= last:
                    break
        self._cursors[channel] = last
        return True


class _WatchFeed(_ShmFeed):
    kind = K_KEY

    def __init__(self, backend: ShmBackend, pattern: str, since: int | None) -> None:
        super().__init__(backend, (pattern,))
        with backend._write() as w:
            self._register(w)
            current = w.counters()[REV]
            if since is not None and since < current:
                cur = w.txn.cursor(db=backend._hist)
                oldest = _BE64.unpack(cur.key())[0] if cur.first() else current + 1
                if since + 1 < oldest:
                    raise RevisionTooOldError(
                        f"changes after revision {since} are no longer retained "
                        f"(the oldest retained is {oldest})",
                        oldest,
                    )
            self._cursor = current if since is None else min(since, current)
        self._start()
        if since is not None and self._cursor < current:
            self.hint(None)

    def fetch(self) -> list[Any]:
        dirty, everything = self.take_hints()
        if not dirty and not everything:
            return []
        b = self.backend
        out: list[Any] = []
        pattern = self.patterns[0]
        with b._env.begin() as txn:
            cur = txn.cursor(db=b._hist)
            if not cur.set_range(_BE64.pack(self._cursor + 1)):
                return out
            first = True
            for hk, record in cur:
                if len(hk) != 8:
                    continue  # not a revision: nothing we wrote
                rev = _BE64.unpack(hk)[0]
                if first and rev > self._cursor + 1 and self._cursor > 0:
                    out.append(Gap("", self._cursor + 1, rev - 1))
                first = False
                self._cursor = rev
                try:
                    (klen,) = _U16.unpack_from(record, 1)
                    key = bytes(record[3 : 3 + klen]).decode()
                    op = _OPS[bytes(record[:1])]
                except (struct.error, UnicodeDecodeError, KeyError):
                    log.warning("sharedkv: skipping a malformed history record at %d", rev)
                    continue
                if not (pattern == key or fnmatchcase(key, pattern)):
                    continue
                value = bytes(record[3 + klen :]) if op == "set" else None
                out.append((op, key, rev, value))
        return out


class _WakeFeed(_ShmFeed):
    """Only wake-ups (for blocking queue and lock waits); the waiter re-reads state itself.

    It is registered with other processes only while armed, that is while a thread actually
    waits: a producer then sends wake-ups only to consumers that are asleep."""

    def __init__(self, backend: ShmBackend, kind: bytes, name: str) -> None:
        self.kind = kind
        super().__init__(backend, (name,))
        self._armed = 0
        self._arm_lock = threading.Lock()
        self._start()

    def arm(self) -> None:
        with self._arm_lock:
            self._armed += 1
            if self._armed == 1:
                with self.backend._write() as w:
                    self._register(w)

    def disarm(self) -> None:
        with self._arm_lock:
            self._armed -= 1
            if self._armed == 0 and not self.backend._closed:
                with contextlib.suppress(Exception), self.backend._write() as w:
                    for pattern in self.patterns:
                        self.backend._add_interest(w, self.kind, pattern, -1)

    def reattach(self) -> None:
        """In a forked child: the same handle keeps working, registered as this process."""
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._sleepers = 0
        self._wakeups = ()
        self._arm_lock = threading.Lock()
        self._armed = 0
        self._start()

    def close(self) -> None:
        if self.closed:
            return
        b = self.backend
        b._notifier.remove(self)
        b._feeds.discard(self)
        Feed.close(self)
        with self._arm_lock:
            armed, self._armed = self._armed, 0
        if armed and not b._closed and b._pid == os.getpid():
            with contextlib.suppress(Exception), b._write() as w:
                for pattern in self.patterns:
                    b._add_interest(w, self.kind, pattern, -1)

    def fetch(self) -> list[Any]:
        self.take_hints()
        return []


def list_stores() -> list[dict[str, Any]]:
    """The stores under this user's root, with their info and whether anyone is attached."""
    root = root_dir()
    out: list[dict[str, Any]] = []
    if not os.path.isdir(root):
        return out
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, "info.json")) as f:
                info: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            info = {"name": name, "url": f"shm://{name}"}
        info["path"] = path
        info["live"] = _attached(path)
        out.append(info)
    return out


def _attached(path: str) -> bool:
    try:
        fd = os.open(os.path.join(path, "attach.lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


_UNNAMED_RE = re.compile(r"^p\d+-[0-9a-f]{8}$")


def is_unnamed(url: str) -> bool:
    """Whether ``url`` is a process tree's default store (created by ``Store()``)."""
    return url.startswith("shm://") and bool(_UNNAMED_RE.match(url[6:].split("?", 1)[0]))


def nearest_ancestor_store() -> str | None:
    """The default store created by this process's nearest ancestor, if any.

    A child started by a fork server inherits the fork server's environment, not its
    parent's, so the environment alone can name a stale store; the process tree cannot."""
    root = root_dir()
    try:
        names = [n for n in os.listdir(root) if _UNNAMED_RE.match(n)]
    except OSError:
        return None
    if not names:
        return None
    rank = {(p.pid, p.start): i for i, p in enumerate(_proc.ancestors())}
    best: tuple[int, str] | None = None
    for name in names:
        try:
            with open(os.path.join(root, name, "info.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        i = rank.get((info.get("creator"), info.get("creator_start")))
        if i is not None and (best is None or i < best[0]):
            best = (i, str(info.get("url")))
    return None if best is None else best[1]


def sweep_stale(min_age: float = 5.0) -> list[str]:
    """Remove stores that nobody is attached to (their users crashed), unless kept on purpose."""
    root = root_dir()
    removed: list[str] = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        path = os.path.join(root, name)
        lock_path = os.path.join(path, "attach.lock")
        try:
            with open(os.path.join(path, "info.json")) as f:
                if json.load(f).get("keep"):
                    continue
        except (OSError, ValueError):
            # No info: half-created. Only remove it once it is clearly abandoned.
            try:
                if time.time() - os.stat(path).st_mtime < min_age:
                    continue
            except FileNotFoundError:
                continue
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(path).st_mtime >= min_age:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def destroy(name: str) -> bool:
    """Remove a named store (even one kept with ``keep=True``) once nobody is attached."""
    path = os.path.join(root_dir(), name)
    if not _NAME_RE.match(name) or not os.path.isdir(path):
        return False
    if _attached(path):
        raise BackendError(f"store {name!r} is still in use")
    shutil.rmtree(path, ignore_errors=True)
    return True
