"""The ``liteyuki.comm`` API (LiteyukiBot's ``storage`` and ``channel`` modules) on sharedkv.

Code written for that API keeps working after changing one import line::

    from sharedkv.liteyuki import shared_memory, Channel, get_channel, set_channel

* :data:`shared_memory` (``GlobalKeyValueStore.get_instance()``) is a :class:`KeyValueStore`:
  ``set``, ``get``, ``delete``, ``get_all``, ``publish``, ``on_subscriber_receive``,
  ``run_subscriber_receive_funcs`` and ``await start_receive_loop()``, on the process tree's
  default :class:`sharedkv.Store`. Every process, main or child, has the full API.
* :class:`Channel` is a named point-to-point channel on a :meth:`sharedkv.Store.queue`: every
  item is received once, by one receiver. ``Channel[T]`` checks what is sent against ``T``.
* :func:`set_channel`, :func:`set_channels`, :func:`get_channel`, :func:`get_channels`: a registry
  of channels kept in the shared store, so any process can look a channel up by name.

``KeyValueStore`` and ``Channel`` objects pickle as addresses, so they can be passed to a child
process (``multiprocessing.Process(args=(shared_memory, chan))``, spawn, fork or forkserver) and
work there. What changed from the origin, and why, is in ``docs/migrating-from-liteyuki.md``.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import inspect
import logging
import os
import pickle
import threading
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import (
    Annotated,
    Any,
    ClassVar,
    Generic,
    Literal,
    NewType,
    TypeVar,
    Union,
    get_args,
    get_origin,
)

from ._backends import ENV_VAR
from ._errors import ClosedError, QueueEmpty, TimeoutError
from ._queue import Queue
from ._store import Store
from ._wait import resolve_timeout

__all__ = [
    "Channel",
    "GlobalKeyValueStore",
    "KeyValueStore",
    "get_channel",
    "get_channels",
    "set_channel",
    "set_channels",
    "shared_memory",
]

log = logging.getLogger("sharedkv")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: where the channel registry lives among the default store's keys (hidden from ``get_all``)
REGISTRY_PREFIX = "sharedkv.liteyuki.channel:"
#: the prefix of the queue that carries a channel's items
QUEUE_PREFIX = "sharedkv.liteyuki.channel."

# -- process-local state ------------------------------------------------------------------------
# A forked child inherits this module's objects. Handles opened before the fork are replaced by
# handles of the child's own on first use: ``_fork_generation`` tells them apart cheaply.
_fork_generation = 0
_open_lock = threading.Lock()
_registry_lock = threading.Lock()
_subscriber_funcs: dict[str, list[Callable[[Any], Any]]] = {}
_kv_by_address: dict[str, KeyValueStore] = {}
_local_channels: dict[tuple[str, str], Channel[Any]] = {}


def _after_fork_in_child() -> None:
    global _fork_generation, _open_lock, _registry_lock
    _fork_generation += 1
    # Another thread may have held a lock at the instant of the fork; it never releases it here.
    _open_lock = threading.Lock()
    _registry_lock = threading.Lock()
    GlobalKeyValueStore._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the key-value store --------------------------------------------------------------------------
class KeyValueStore:
    """The origin's shared key-value store and publish/subscribe bus, on a :class:`Store`.

    ``KeyValueStore()`` uses the process tree's default store (``sharedkv.Store()``), opened on
    first use; ``KeyValueStore("shm://name")`` or ``KeyValueStore(store)`` another one. Every
    method works in every process: children read and write directly in shared memory, and a
    ``set`` is applied before it returns.

    ``store`` is the underlying :class:`Store`, for everything else sharedkv offers (``incr``,
    ``lock``, ``queue``, TTLs...).
    """

    def __init__(self, store: Store | str | None = None) -> None:
        if store is not None and not isinstance(store, (Store, str)):
            raise TypeError(f"store must be a Store, an address or None, not {type(store)!r}")
        self._address: str | None = store.url if isinstance(store, Store) else store
        self._store: Store | None = store if isinstance(store, Store) else None
        self._generation = _fork_generation

    @property
    def store(self) -> Store:
        """The underlying store (after a fork, a handle of this process's own on the same data)."""
        store = self._store
        if store is not None and self._generation == _fork_generation:
            return store
        return self._open()

    def _open(self) -> Store:
        with _open_lock:
            store = self._store
            if store is not None and self._generation == _fork_generation:
                return store
            # Inherited through fork: the parent's handle must not be used here (its callback
            # thread did not survive the fork); the address reaches the same data.
            address = store.url if store is not None else self._address
            self._store = Store(address)
            self._generation = _fork_generation
            return self._store

    def _known_address(self) -> str | None:
        """This store's address, without opening it when it is not open yet."""
        if self._store is not None:
            return self._store.url
        return self._address if self._address is not None else os.environ.get(ENV_VAR)

    @property
    def url(self) -> str:
        return self.store.url

    def __reduce__(self) -> tuple[Any, ...]:
        # Travels as its address; in the receiving process it becomes that process's own handle
        # (the shared_memory singleton when the address is the default store).
        return (_kv_for, (self.store.url,))

    def __repr__(self) -> str:
        address = self._known_address()
        return f"<KeyValueStore {address or 'default store, not opened yet'!r}>"

    def close(self) -> None:
        """Close this handle; the next use opens the store again (the default store if this
        handle was made without an address)."""
        with _open_lock:
            store, self._store = self._store, None
            same_process = self._generation == _fork_generation
            self._generation = _fork_generation
        if store is not None and same_process:
            store.close()

    # -- the origin's key-value methods --------------------------------------------------------
    def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``. Applied (and visible to every process) on return."""
        store = self._store  # the ``store`` property, inlined: this is the hot path
        if store is None or self._generation != _fork_generation:
            store = self._open()
        store.set(key, value)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default``. A copy: changing it changes nothing shared."""
        store = self._store
        if store is None or self._generation != _fork_generation:
            store = self._open()
        return store.get(key, default)

    def delete(self, key: str, ignore_key_error: bool = True) -> None:
        """Remove ``key``. A missing key is ignored, or raises ``KeyError`` when
        ``ignore_key_error`` is false."""
        self.store.delete(key, ignore_key_error)

    def get_all(self) -> dict[str, Any]:
        """A snapshot copy of every key and value (never a live view)."""
        return {k: v for k, v in self.store.items() if not k.startswith(REGISTRY_PREFIX)}

    # -- the origin's publish/subscribe methods ----------------------------------------------
    def publish(self, channel_: str, data: Any) -> int:
        """Send ``data`` to every subscriber of ``channel_`` in every process. Returns how many
        subscriptions it reached: 0, harmlessly, when nobody subscribed."""
        return self.store.publish(channel_, data)

    def on_subscriber_receive(self, channel_: str) -> Callable[[F], F]:
        """Decorator: call the function with the data of each message published to
        ``channel_``, from any process. Works in children too.

        Sync functions run at once on the store's callback thread; ``async`` ones on the event
        loop that registered them, or the one running :meth:`start_receive_loop`. The function
        is returned unchanged."""
        register = self.store.on_subscriber_receive(channel_)

        def decorator(func: F) -> F:
            register(func)
            _subscriber_funcs.setdefault(channel_, []).append(func)
            return func

        return decorator

    @staticmethod
    async def run_subscriber_receive_funcs(channel_: str, data: Any) -> None:
        """Run this process's ``on_subscriber_receive`` functions for ``channel_`` with ``data``,
        concurrently, and wait for them (nothing is published). A failing function is logged."""
        funcs = list(_subscriber_funcs.get(channel_, ()))
        results = await asyncio.gather(*(_call(f, data) for f in funcs), return_exceptions=True)
        for func, result in zip(funcs, results, strict=True):
            if isinstance(result, Exception):
                log.error("sharedkv: subscriber %r failed", func, exc_info=result)

    async def start_receive_loop(self) -> None:
        """Run this process's ``async`` subscriber functions on the running event loop until the
        store closes or the task is cancelled. Any process may run it."""
        await self.store.start_receive_loop()


async def _call(func: Callable[[Any], Any], data: Any) -> Any:
    result = func(data)
    if inspect.isawaitable(result):
        result = await result
    return result


class GlobalKeyValueStore:
    """Holder of the process's :class:`KeyValueStore` on the default store."""

    _instance: ClassVar[KeyValueStore | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def get_instance(cls) -> KeyValueStore:
        if cls._instance is None:
            with cls._lock:
                if cls._instance is None:
                    cls._instance = KeyValueStore()
        return cls._instance


def _kv_for(address: str | None) -> KeyValueStore:
    """This process's handle on the store at ``address`` (the singleton for the default)."""
    default = GlobalKeyValueStore.get_instance()
    if address is None or address == default._known_address():
        return default
    with _registry_lock:
        kv = _kv_by_address.get(address)
        if kv is None:
            kv = _kv_by_address[address] = KeyValueStore(address)
        return kv


#: the process tree's shared store and bus, under the origin's name
shared_memory: KeyValueStore = GlobalKeyValueStore.get_instance()


# -- runtime type checks --------------------------------------------------------------------------
_UNSET: Any = object()
_NoneType = type(None)
_BARE_TUPLE: Any = typing.Tuple  # noqa: UP006 - "any tuple", unlike tuple[()] (same args)


def _type_repr(tp: Any) -> str:
    if tp is Ellipsis:
        return "..."
    if tp is None or tp is _NoneType:
        return "None"
    if tp is Any:
        return "Any"
    if get_origin(tp) is None and isinstance(tp, type):
        if "_channel_origin" in tp.__dict__ or tp.__module__ == "builtins":
            return tp.__qualname__
        return f"{tp.__module__}.{tp.__qualname__}"
    return repr(tp).replace("typing.", "")


def _validate_type(tp: Any) -> None:
    """Raise TypeError when ``tp`` holds a construct the runtime check cannot verify."""
    if tp is Any or tp is None or tp is Ellipsis or isinstance(tp, (TypeVar, NewType)):
        return
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Annotated:
        _validate_type(args[0])
        return
    if origin in (Literal, collections.abc.Callable):
        return
    if origin is Union or origin is types.UnionType or origin is tuple or origin is type:
        for arg in args:
            _validate_type(arg)
        return
    if isinstance(origin, type):
        for arg in args:
            _validate_type(arg)
        return
    if origin is None and isinstance(tp, type):
        return
    raise TypeError(
        f"a Channel cannot check values against {tp!r} (forward references and special typing "
        "forms are not supported); give the type itself, or pass type_check=False"
    )


def _wrong(value: Any, tp: Any, path: str) -> str:
    return f"{path} is {type(value).__qualname__}, not {_type_repr(tp)}"


def _mismatch(value: Any, tp: Any, path: str = "value") -> str | None:
    """Why ``value`` does not conform to the type ``tp``, or None when it does."""
    if tp is Any or tp is object:
        return None
    if tp is None or tp is _NoneType:
        return None if value is None else _wrong(value, None, path)
    if isinstance(tp, TypeVar):
        if tp.__bound__ is not None:
            return _mismatch(value, tp.__bound__, path)
        if tp.__constraints__:
            return _mismatch(value, Union[tp.__constraints__], path)  # noqa: UP007
        return None
    if isinstance(tp, NewType):
        return _mismatch(value, tp.__supertype__, path)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Annotated:
        return _mismatch(value, args[0], path)
    if origin is Union or origin is types.UnionType:
        if any(_mismatch(value, arg, path) is None for arg in args):
            return None
        return _wrong(value, tp, path)
    if origin is Literal:
        if any(type(value) is type(arg) and value == arg for arg in args):
            return None
        return f"{path} is {value!r}, not {_type_repr(tp)}"
    if origin is collections.abc.Callable:
        return None if callable(value) else _wrong(value, tp, path)
    if origin is type:
        if not isinstance(value, type):
            return _wrong(value, tp, path)
        bound = args[0] if args else Any
        if isinstance(bound, type) and get_origin(bound) is None and not issubclass(value, bound):
            return f"{path} is the class {value.__qualname__}, not a subclass of {bound.__name__}"
        return None
    if origin is tuple:
        return _tuple_mismatch(value, tp, args, path)
    if isinstance(origin, type):
        return _collection_mismatch(value, tp, origin, args, path)
    if isinstance(tp, type):
        cls = tp.__dict__.get("_channel_origin", tp)  # Channel[X] checks for any Channel
        if isinstance(value, cls):
            return None
        # The numeric tower of PEP 484: an int is acceptable where a float is expected.
        if (tp is float and isinstance(value, int)) or (
            tp is complex and isinstance(value, (int, float))
        ):
            return None
        return _wrong(value, tp, path)
    raise TypeError(f"cannot check values against {tp!r}")


def _tuple_mismatch(value: Any, tp: Any, args: tuple[Any, ...], path: str) -> str | None:
    if not isinstance(value, tuple):
        return _wrong(value, tp, path)
    if tp is _BARE_TUPLE:
        return None
    if len(args) == 2 and args[1] is Ellipsis:
        for i, item in enumerate(value):
            why = _mismatch(item, args[0], f"{path}[{i}]")
            if why is not None:
                return why
        return None
    if len(value) != len(args):
        return f"{path} has {len(value)} items, not {len(args)} as in {_type_repr(tp)}"
    for i, (item, arg) in enumerate(zip(value, args, strict=True)):
        why = _mismatch(item, arg, f"{path}[{i}]")
        if why is not None:
            return why
    return None


def _collection_mismatch(
    value: Any, tp: Any, origin: type, args: tuple[Any, ...], path: str
) -> str | None:
    if not isinstance(value, origin):
        return _wrong(value, tp, path)
    collection: Any = value
    if issubclass(origin, Mapping) and len(args) == 2:
        for key, item in collection.items():
            why = _mismatch(key, args[0], f"a key of {path}")
            if why is None:
                why = _mismatch(item, args[1], f"{path}[{key!r}]")
            if why is not None:
                return why
    elif issubclass(origin, collections.abc.Collection) and len(args) == 1:
        # Only collections are walked: iterating an iterator would consume it.
        ordered = issubclass(origin, collections.abc.Sequence)
        for i, item in enumerate(collection):
            why = _mismatch(item, args[0], f"{path}[{i}]" if ordered else f"an item of {path}")
            if why is not None:
                return why
    return None


# -- channels -------------------------------------------------------------------------------------
def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a channel name must be a str, not {type(name).__qualname__}")
    if not name:
        raise ValueError("a channel name must not be empty")
    return name


Handler = Callable[[Any], Any]


@dataclass
class _ReceiveHandler:
    func: Handler
    filter: Handler | None


@dataclass
class _Runner:
    """A receive loop: where it runs, in which process, and whether it is asked to stop."""

    generation: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread | None = None
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    waiting: bool = False  # waiting for an item (not handling one)

    def request_stop(self) -> None:
        # Runs on the loop: interrupt a wait, but let an item being handled finish.
        self.stopping = True
        if self.waiting and self.task is not None:
            self.task.cancel()

    @property
    def running(self) -> bool:
        return (
            self.generation == _fork_generation
            and not self.stopping
            and (self.task is None or not self.task.done())
        )


_LOOP_WAIT = 60.0  # the receive loop waits this long at a time, then waits again


class Channel(Generic[T]):
    """A named, point-to-point channel between threads and processes, on a shared queue.

    ``send`` appends an item; ``receive`` (or ``async_receive``) takes the oldest one. Each item
    is received exactly once, by one receiver, in any process: several receivers compete for
    items. ``receive`` waits at most ``timeout`` seconds (30 by default), then raises
    :class:`sharedkv.TimeoutError`.

    ``Channel[T](name)`` checks every sent value against ``T`` at run time and raises TypeError
    on a mismatch (``type_check=False`` turns that off; ``type_check=True`` without ``T`` is a
    TypeError). Supported: ``Any``, ``None``, ``Optional``/``Union``/``X | Y``, ``tuple[...]``
    (fixed or with ``...``), ``list``/``set``/``frozenset``/``dict`` and other collections of
    ``collections.abc`` (elements checked), ``Literal``, ``type[X]``, ``Callable``,
    ``Annotated``, ``NewType``, ``TypeVar`` and plain classes (``int`` is accepted for ``float``).

    Names: one handle per name in a process (a second ``Channel(name)`` raises ValueError; use
    :func:`get_channel`). Across processes the same name *is* the same channel: that is how a
    process reaches a channel without being handed it. A channel pickles as its name and store
    address and becomes the receiving process's handle on the same queue.

    ``@on_receive(filter_func)`` registers a handler; :meth:`start_receive_loop` then takes each
    item from the queue and gives it to every handler of this process whose filter accepts it.
    """

    _type_arg: ClassVar[Any] = _UNSET
    _parameterised: ClassVar[dict[Any, type[Channel[Any]]]] = {}

    def __class_getitem__(cls, item: Any) -> Any:
        # ``Channel[T]`` must know T while __init__ runs (to check type_check=True, and to check
        # every send), which a typing alias does not allow: it sets __orig_class__ only after
        # __init__ has returned. So each parameterisation is a small subclass that records T.
        if cls._type_arg is not _UNSET and not isinstance(cls._type_arg, TypeVar):
            raise TypeError(f"{cls.__name__} is already parameterised")
        base: type[Channel[Any]] = cls.__dict__.get("_channel_origin", cls)
        key = (base, item)
        try:
            return cls._parameterised[key]
        except (KeyError, TypeError):  # TypeError: an unhashable argument (not cached)
            pass
        sub = types.new_class(
            f"{base.__name__}[{_type_repr(item)}]",
            (base,),
            exec_body=lambda ns: ns.update(
                _type_arg=item, _channel_origin=base, __module__=base.__module__
            ),
        )
        with contextlib.suppress(TypeError):
            cls._parameterised[key] = sub
        return sub

    def __init__(
        self,
        name: str,
        type_check: bool | None = None,
        *,
        store: Store | str | None = None,
        maxsize: int = 0,
    ) -> None:
        _check_name(name)
        type_arg = type(self)._type_arg
        if type_check is None:
            type_check = type_arg is not _UNSET
        elif type_check and type_arg is _UNSET:
            raise TypeError(
                f"type_check=True needs a type parameter: Channel[YourType]({name!r}, ...)"
            )
        if type_arg is not _UNSET:
            _validate_type(type_arg)
        kv = _kv_for_store(store)
        self._setup(name, kv, maxsize, type_arg, bool(type_check))
        self._queue()  # validates the name and maxsize against the store now, not at first use
        with _registry_lock:
            if (self.url, name) in _local_channels:
                raise ValueError(
                    f"a channel named {name!r} already exists in this process; "
                    "use get_channel(name) to reach it"
                )
            _local_channels[(self.url, name)] = self
        _registry_kv().store.set(REGISTRY_PREFIX + name, self._record())

    def _setup(
        self, name: str, kv: KeyValueStore, maxsize: int, type_arg: Any, type_check: bool
    ) -> None:
        self.name = name
        self.maxsize = maxsize
        self.type_check = type_check
        self._type = type_arg
        self._kv = kv
        self.url = kv.store.url
        self._queue_name = QUEUE_PREFIX + name
        self._handle: Queue | None = None
        self._handle_store: Store | None = None
        self._handlers: list[_ReceiveHandler] = []
        self._runner: _Runner | None = None
        self._runner_lock = threading.Lock()

    def _record(self) -> dict[str, Any]:
        blob = None
        if self._type is not _UNSET:
            try:
                blob = pickle.dumps(self._type, pickle.HIGHEST_PROTOCOL)
            except Exception:  # a type that cannot travel: other processes will not check
                blob = None
        return {
            "name": self.name,
            "store": self.url,
            "maxsize": self.maxsize,
            "type_check": self.type_check,
            "type": blob,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (self._record(),))

    def __repr__(self) -> str:
        shown = "" if self._type is _UNSET else f"[{_type_repr(self._type)}]"
        return f"<Channel{shown} {self.name!r} on {self.url!r}>"

    @property
    def store(self) -> Store:
        return self._kv.store

    def _queue(self) -> Queue:
        store = self._kv.store
        handle = self._handle
        if handle is None or self._handle_store is not store:
            with _open_lock:
                if self._handle is None or self._handle_store is not store:
                    self._handle = store.queue(self._queue_name, self.maxsize)
                    self._handle_store = store
                handle = self._handle
        return handle

    # -- sending and receiving ------------------------------------------------------------------
    def check(self, data: Any) -> None:
        """Raise TypeError when type checking is on and ``data`` does not match the channel's
        type (``send`` does this first)."""
        if self.type_check:
            why = _mismatch(data, self._type)
            if why is not None:
                raise TypeError(f"channel {self.name!r} carries {_type_repr(self._type)}: {why}")

    def send(self, data: T, timeout: float | None = None) -> None:
        """Append ``data`` for one receiver. On a bounded channel (``maxsize``) that is full,
        wait up to ``timeout`` seconds (30 by default), then raise :class:`sharedkv.QueueFull`."""
        self.check(data)
        self._queue().put(data, timeout=timeout)

    def receive(self, timeout: float | None = None) -> T:
        """Take the oldest item, waiting up to ``timeout`` seconds (30 by default) for one;
        then raise :class:`sharedkv.TimeoutError`."""
        limit = resolve_timeout(timeout)
        try:
            item: T = self._queue().get(timeout=limit)
        except QueueEmpty:
            raise TimeoutError(f"nothing arrived on channel {self.name!r} in {limit} s") from None
        return item

    async def async_receive(self, timeout: float | None = None) -> T:
        """:meth:`receive` for coroutines: waits on the event loop, blocking no thread."""
        limit = resolve_timeout(timeout)
        try:
            item: T = await self._queue().get_async(timeout=limit)
        except QueueEmpty:
            raise TimeoutError(f"nothing arrived on channel {self.name!r} in {limit} s") from None
        return item

    def qsize(self) -> int:
        """How many items wait in the channel (sent and not yet received by anyone)."""
        return self._queue().qsize()

    # -- handlers ---------------------------------------------------------------------------------
    def on_receive(
        self, filter_func: Callable[[T], Any] | None = None
    ) -> Callable[[Callable[[T], Any]], Callable[[T], Any]]:
        """Decorator: run the function (sync or ``async``) for each item this process's receive
        loop takes, when ``filter_func`` (sync or ``async``; optional) returns true. Works in
        every process. The function is returned unchanged."""
        if filter_func is not None and not callable(filter_func):
            raise TypeError("filter_func must be callable or None")

        def decorator(func: Callable[[T], Any]) -> Callable[[T], Any]:
            if not callable(func):
                raise TypeError("the decorated object must be callable")
            self._handlers.append(_ReceiveHandler(func, filter_func))
            return func

        return decorator

    async def _dispatch(self, item: Any) -> None:
        accepted = False
        for handler in list(self._handlers):
            try:
                if handler.filter is not None and not await _call(handler.filter, item):
                    continue
                accepted = True
                await _call(handler.func, item)
            except Exception:
                log.exception("sharedkv: handler %r of channel %r failed", handler.func, self.name)
        if not accepted:
            log.debug("sharedkv: no handler of channel %r accepted an item", self.name)

    async def _serve(self, runner: _Runner) -> None:
        while not runner.stopping:
            runner.waiting = True
            try:
                item = await self._queue().get_async(timeout=_LOOP_WAIT)
            except QueueEmpty:
                continue
            except ClosedError:
                return
            except Exception:
                log.exception("sharedkv: channel %r could not take an item", self.name)
                await asyncio.sleep(0.5)
                continue
            finally:
                runner.waiting = False
            await self._dispatch(item)

    def start_receive_loop(self) -> None:
        """Start taking items and handing them to the ``on_receive`` handlers, in the background.

        Called from a coroutine, the loop is a task of the running event loop (handlers run
        there); otherwise it gets a daemon thread with an event loop of its own. Items are
        handled one at a time, in order. Idempotent; any process may run one."""
        with self._runner_lock:
            if self.is_receive_loop_running:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._runner = self._start_thread()
            else:
                runner = _Runner(_fork_generation, loop)
                runner.task = loop.create_task(
                    self._serve(runner), name=f"sharedkv-channel-{self.name}"
                )
                self._runner = runner

    def _start_thread(self) -> _Runner:
        ready = threading.Event()
        runners: list[_Runner] = []

        async def main() -> None:
            runner = _Runner(_fork_generation, asyncio.get_running_loop(), thread)
            runner.task = asyncio.current_task()
            runners.append(runner)
            ready.set()
            await self._serve(runner)

        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                asyncio.run(main())

        thread = threading.Thread(target=run, name=f"sharedkv-channel-{self.name}", daemon=True)
        thread.start()
        ready.wait()
        return runners[0]

    @property
    def is_receive_loop_running(self) -> bool:
        runner = self._runner
        return runner is not None and runner.running

    def stop_receive_loop(self, timeout: float = 5.0) -> None:
        """Stop this process's receive loop (an item being handled is finished first)."""
        with self._runner_lock:
            runner, self._runner = self._runner, None
        if runner is None or runner.generation != _fork_generation:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            runner.loop.call_soon_threadsafe(runner.request_stop)
        if runner.thread is not None and runner.thread is not threading.current_thread():
            runner.thread.join(timeout)

    def close(self) -> None:
        """Stop the receive loop and release this process's handle. Items waiting in the
        channel stay for other receivers; the name stays registered."""
        self.stop_receive_loop()
        with _registry_lock:
            if _local_channels.get((self.url, self.name)) is self:
                del _local_channels[(self.url, self.name)]
        with _open_lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()


def _kv_for_store(store: Store | str | None) -> KeyValueStore:
    if isinstance(store, Store):
        with _registry_lock:
            kv = _kv_by_address.get(store.url)
            if kv is None or kv._store is not store:
                kv = _kv_by_address[store.url] = KeyValueStore(store)
            return kv
    if store is not None and not isinstance(store, str):
        raise TypeError(f"store must be a Store, an address or None, not {type(store)!r}")
    return _kv_for(store)


def _registry_kv() -> KeyValueStore:
    return GlobalKeyValueStore.get_instance()


def _attach(record: dict[str, Any]) -> Channel[Any]:
    """This process's handle on the channel described by ``record`` (made on first use)."""
    kv = _kv_for(record["store"])
    name = record["name"]
    key = (kv.store.url, name)
    with _registry_lock:
        existing = _local_channels.get(key)
        if existing is not None:
            return existing
    type_arg = _UNSET
    if record["type"] is not None:
        try:
            type_arg = pickle.loads(record["type"])
        except Exception:
            log.warning("sharedkv: the type of channel %r cannot be rebuilt here", name)
    cls: type[Channel[Any]] = Channel
    if type_arg is not _UNSET:
        cls = Channel.__class_getitem__(type_arg)
    channel = cls.__new__(cls)
    channel._setup(
        name, kv, record["maxsize"], type_arg, bool(record["type_check"]) and type_arg is not _UNSET
    )
    with _registry_lock:
        # Another thread may have attached meanwhile: keep the first handle.
        return _local_channels.setdefault(key, channel)


# -- the channel registry -----------------------------------------------------------------------


def set_channel(name: str, channel: Channel[Any]) -> None:
    """Register ``channel`` under ``name`` for every process (replacing any previous one)."""
    if not isinstance(channel, Channel):
        raise TypeError(f"{channel!r} is not a Channel")
    _registry_kv().store.set(REGISTRY_PREFIX + _check_name(name), channel._record())


def set_channels(channels: Mapping[str, Channel[Any]]) -> None:
    """Register several channels at once (all or none)."""
    records = {}
    for name, channel in channels.items():
        if not isinstance(channel, Channel):
            raise TypeError(f"{channel!r} is not a Channel")
        records[REGISTRY_PREFIX + _check_name(name)] = channel._record()
    _registry_kv().store.set_many(records)


def get_channel(name: str) -> Channel[Any]:
    """The channel registered under ``name`` (by any process); ``KeyError`` when none is."""
    record = _registry_kv().store.get(REGISTRY_PREFIX + _check_name(name))
    if record is None:
        raise KeyError(name)
    return _attach(record)


def get_channels() -> dict[str, Channel[Any]]:
    """Every registered channel, by registered name."""
    items = _registry_kv().store.items(REGISTRY_PREFIX + "*")
    return {key[len(REGISTRY_PREFIX) :]: _attach(record) for key, record in items}
