"""How values become bytes: pluggable serializers, kept apart from storage.

Stored value bytes are self-describing by their first byte, so a reader never has to guess:

* ``0x80`` starts a pickle (every pickle of protocol 2 or later does), the default;
* an ASCII digit or ``-`` starts a plain decimal integer. Integers are always stored this way,
  whatever the serializer, so ``incr`` works on every backend (Redis scripts included) and
  counters are readable from the command line;
* any other byte is the tag of another serializer, for example ``J`` for :class:`JSONSerializer`.

A store configured with a safe serializer refuses pickled bytes instead of loading them, so bytes
written by an untrusted party can never run code in the reader.
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, runtime_checkable

from ._errors import SerializationError

__all__ = ["JSONSerializer", "PickleSerializer", "Serializer"]

_PICKLE_TAG = 0x80
_INT_FIRST_BYTES = frozenset(b"-0123456789")


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back.

    ``tag`` is one byte that starts every output of ``dumps`` and identifies the format; it must
    not be an ASCII digit, ``-`` or ``0x80``, which are reserved for integers and pickle.
    """

    tag: bytes

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class PickleSerializer:
    """The default: any picklable object, fastest, but never load pickles from untrusted writers."""

    tag = bytes([_PICKLE_TAG])

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        if protocol < 2:
            raise ValueError("pickle protocol must be 2 or later (its output starts with 0x80)")
        self.protocol = protocol

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, self.protocol)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self.protocol})"


class JSONSerializer:
    """A safe serializer: decoding can never run code.

    Handles ``None``, ``bool``, ``int``, ``float``, ``str``, ``list``, ``dict`` with ``str`` keys,
    and also ``bytes``, ``tuple`` and ``set`` (as tagged objects). More types can be registered::

        ser = JSONSerializer()
        ser.register(Point, "point", lambda p: [p.x, p.y], lambda v: Point(*v))
    """

    tag = b"J"
    _MARK = "__sharedkv__"

    def __init__(self) -> None:
        self._by_type: dict[type, tuple[str, Callable[[Any], Any]]] = {}
        self._by_name: dict[str, Callable[[Any], Any]] = {}
        self.register(bytes, "bytes", lambda b: base64.b64encode(b).decode(), base64.b64decode)
        self.register(tuple, "tuple", list, tuple)
        self.register(set, "set", list, set)
        self.register(frozenset, "frozenset", list, frozenset)

    def register(
        self,
        cls: type,
        name: str,
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
    ) -> None:
        """Teach the serializer a type: ``encode`` makes JSON-able data, ``decode`` inverts it."""
        if name in self._by_name:
            raise ValueError(f"a type is already registered under the name {name!r}")
        self._by_type[cls] = (name, encode)
        self._by_name[name] = decode

    def _default(self, obj: Any) -> Any:
        entry = self._by_type.get(type(obj))
        if entry is None:
            raise TypeError(f"{type(obj).__qualname__} is not JSON serializable; register() it")
        name, encode = entry
        return {self._MARK: name, "v": self._wrap(encode(obj))}

    def _wrap(self, obj: Any) -> Any:
        # json.dumps turns tuples into lists without asking ``default``; wrap them ourselves so
        # they come back as tuples.
        if type(obj) in self._by_type and type(obj) is not list:
            return self._default(obj)
        if isinstance(obj, list):
            return [self._wrap(v) for v in obj]
        if isinstance(obj, dict):
            return {k: self._wrap(v) for k, v in obj.items()}
        return obj

    def _hook(self, obj: dict[str, Any]) -> Any:
        name = obj.get(self._MARK)
        if name is None or len(obj) != 2:
            return obj
        decode = self._by_name.get(name)
        if decode is None:
            raise ValueError(f"unknown registered type {name!r}")
        return decode(obj["v"])

    def dumps(self, value: Any) -> bytes:
        text = json.dumps(self._wrap(value), default=self._default, separators=(",", ":"))
        return self.tag + text.encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(bytes(data[1:]), object_hook=self._hook)

    def __repr__(self) -> str:
        return "JSONSerializer()"


class Codec:
    """Encodes values for storage with a :class:`Serializer`, integers always in plain decimal."""

    def __init__(self, serializer: Serializer | None = None) -> None:
        serializer = serializer if serializer is not None else PickleSerializer()
        if not isinstance(serializer, Serializer):
            raise TypeError("serializer must have a one-byte 'tag', 'dumps' and 'loads'")
        tag = bytes(serializer.tag)
        if len(tag) != 1 or (tag[0] in _INT_FIRST_BYTES):
            raise ValueError("a serializer's tag must be one byte that is not a digit or '-'")
        if tag[0] == _PICKLE_TAG and not isinstance(serializer, PickleSerializer):
            raise ValueError("tag 0x80 is reserved for PickleSerializer")
        self.serializer = serializer
        self._tag = tag[0]
        self._dumps = serializer.dumps
        self._loads = serializer.loads
        if type(serializer) is PickleSerializer:
            # The default's fast paths: pickle's own functions, without a Python frame between.
            self._dumps = partial(pickle.dumps, protocol=serializer.protocol)
            self.decode = self._decode_pickle  # type: ignore[method-assign]
            self.decode_trailed = self._decode_pickle_trailed  # type: ignore[method-assign]

    def encode(self, value: Any) -> bytes:
        if type(value) is int:
            try:
                return str(value).encode()
            except ValueError as exc:  # longer than sys.get_int_max_str_digits()
                raise SerializationError(f"cannot store this integer: {exc}") from exc
        try:
            data = self._dumps(value)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize a value of type {type(value).__qualname__} with "
                f"{self.serializer!r}: {exc}"
            ) from exc
        if not data or data[0] != self._tag:
            raise SerializationError(f"{self.serializer!r} produced bytes without its tag")
        return data

    def _decode_pickle(
        self, data: bytes | memoryview, _loads: Callable[[bytes | memoryview], Any] = pickle.loads
    ) -> Any:
        # The default serializer's fast path: one byte test, then straight into pickle.
        if data[:1] == b"\x80":
            try:
                return _loads(data)
            except Exception as exc:
                raise SerializationError(f"stored bytes could not be decoded: {exc}") from exc
        return Codec.decode(self, data)

    def _decode_pickle_trailed(
        self, data: bytes, trailer: int, _loads: Callable[[bytes], Any] = pickle.loads
    ) -> Any:
        # Pickle ignores the bytes after its STOP opcode, so a record's trailer can stay on.
        if data[:1] == b"\x80" and len(data) > trailer:
            try:
                return _loads(data)
            except Exception as exc:
                raise SerializationError(f"stored bytes could not be decoded: {exc}") from exc
        return Codec.decode(self, data[: len(data) - trailer] if trailer else data)

    def decode_trailed(self, data: bytes, trailer: int) -> Any:
        """Decode the value in ``data`` without its last ``trailer`` bytes (a record's metadata)."""
        return self.decode(data[: len(data) - trailer] if trailer else data)

    def decode(self, data: bytes | memoryview) -> Any:
        if type(data) is not bytes:
            data = bytes(data)  # a view of a received datagram: serializers expect bytes
        if not data:
            raise SerializationError("the stored value is empty: nothing sharedkv wrote")
        first = data[0]
        try:
            if first == self._tag:
                return self._loads(data)
            if first in _INT_FIRST_BYTES:
                return int(data)
        except Exception as exc:
            raise SerializationError(f"stored bytes could not be decoded: {exc}") from exc
        raise SerializationError(
            f"stored bytes start with {bytes([first])!r}: written by another serializer than "
            f"{self.serializer!r}; refusing to decode them"
        )


def decode_int(data: bytes | None, what: str) -> int:
    """The integer stored in ``data`` (missing = 0), for backends implementing ``incr``."""
    if data is None:
        return 0
    if data[:1] and data[0] in _INT_FIRST_BYTES:
        try:
            return int(data)
        except ValueError:
            pass  # looks like a number, is not one: not written by incr or set
    raise TypeError(f"the value at {what} is not an integer")
