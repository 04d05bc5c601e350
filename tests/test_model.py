"""Model-checked behaviour: random sequences of every key-value operation, on every backend,
against a plain-Python model of what the store must hold.

Expiry is modelled without waiting where possible: long TTLs (the key must still be there, with
an expiry close to the one asked for), plus one rule that sets a very short TTL and waits for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import sharedkv

from .conftest import BACKENDS, unique_name

KEYS = ["a", "b", "c", "user:1", "user:2", "user:10", "job:1", "ü-key"]
PATTERNS = ["*", "user:*", "user:?", "*:1", "[ab]", "job:*", "ü*", "?", "user:[12]", "nothing*"]
LONG_TTL = 1000.0  # never runs out during a test
SHORT_TTL = 0.02
TTL_TOLERANCE = 2.0  # seconds of slack when comparing expiry times
MISSING = object()

keys = st.sampled_from(KEYS)
ttls = st.sampled_from([None, None, LONG_TTL])
values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-5, max_value=5),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
)


@dataclass
class Item:
    value: Any
    revision: int
    expires_at: float | None


def _same(got: Any, want: Any) -> bool:
    """Equal, and of the same type (1 is not True, (1,) is not [1])."""
    if type(got) is not type(want):
        return False
    if isinstance(want, float) and math.isnan(want):
        return math.isnan(got)
    return bool(got == want)


class StoreMachine(RuleBasedStateMachine):
    """Drives a store and a dict side by side; every answer of the store must match the dict."""

    def __init__(self, open_store: Callable[[], sharedkv.Store]) -> None:
        super().__init__()
        self.store = open_store()
        self.model: dict[str, Item] = {}
        self.rev = self.store.revision  # the highest revision seen so far
        self.short_ttls_left = 2  # per run: each one sleeps

    def teardown(self) -> None:
        if not self.store.closed:
            if not self.store.url.startswith(("memory", "shm", "file")):
                self.store.clear()
            self.store.close()

    # -- helpers ---------------------------------------------------------------------------
    def _wrote(self, key: str, value: Any, ttl: float | None, started: float) -> None:
        """``key`` was just written: it has a new revision, above every earlier one."""
        entry = self.store.get_entry(key)
        assert entry is not None, f"{key!r} missing right after it was written"
        assert _same(entry.value, value), (entry.value, value)
        assert entry.revision > self.rev, f"revision {entry.revision} after {self.rev}"
        assert self.store.revision >= entry.revision
        self.rev = entry.revision
        expires_at = None if ttl is None else started + ttl
        self.model[key] = Item(value, entry.revision, expires_at)

    def _changed_store(self) -> None:
        """Something was removed: the store's revision moved past every earlier one."""
        revision = self.store.revision
        assert revision > self.rev, f"store revision {revision} after {self.rev}"
        self.rev = revision

    def _expected_ttl(self, key: str) -> float | None:
        """The expiry a read-modify-write keeps: seconds left, or None."""
        item = self.model[key]
        return None if item.expires_at is None else item.expires_at - time.time()

    # -- writes ----------------------------------------------------------------------------
    @rule(key=keys, value=values, ttl=ttls, ephemeral=st.booleans())
    def set(self, key: str, value: Any, ttl: float | None, ephemeral: bool) -> None:
        started = time.time()
        assert self.store.set(key, value, ttl=ttl, ephemeral=ephemeral) is True
        self._wrote(key, value, ttl, started)

    @rule(key=keys, value=values, ttl=ttls)
    def add(self, key: str, value: Any, ttl: float | None) -> None:
        started = time.time()
        absent = key not in self.model
        assert self.store.add(key, value, ttl=ttl) is absent
        if absent:
            self._wrote(key, value, ttl, started)

    @rule(key=keys, value=values, right=st.booleans())
    def compare_and_set(self, key: str, value: Any, right: bool) -> None:
        current = self.model[key].revision if key in self.model else 0
        revision = current if right else (current + 1 if current else self.rev + 1)
        started = time.time()
        assert self.store.set(key, value, if_revision=revision) is right
        if right:
            self._wrote(key, value, None, started)

    @rule(mapping=st.dictionaries(keys, values, min_size=1, max_size=4), ttl=ttls)
    def set_many(self, mapping: dict[str, Any], ttl: float | None) -> None:
        started = time.time()
        before = self.rev
        self.store.set_many(mapping, ttl=ttl)
        top = before
        for key, value in mapping.items():
            self.rev = before  # every key of the batch is above what came before it
            self._wrote(key, value, ttl, started)
            top = max(top, self.rev)
        self.rev = top

    @rule(key=keys, condition=st.sampled_from(["none", "right", "wrong"]))
    def delete(self, key: str, condition: str) -> None:
        present = key in self.model
        revision = None
        if condition != "none":
            current = self.model[key].revision if present else 0
            revision = current if condition == "right" else current + 1
        expected = present and condition != "wrong"
        assert self.store.delete(key, if_revision=revision) is expected
        if expected:
            del self.model[key]
            self._changed_store()
        elif not present:
            with pytest.raises(KeyError):
                self.store.delete(key, ignore_key_error=False)

    @rule(key=keys)
    def pop(self, key: str) -> None:
        item = self.model.pop(key, None)
        got = self.store.pop(key, MISSING)
        if item is None:
            assert got is MISSING
            with pytest.raises(KeyError):
                self.store.pop(key)
        else:
            assert _same(got, item.value)
            self._changed_store()

    @rule(key=keys, amount=st.integers(min_value=-(2**66), max_value=2**66))
    def incr(self, key: str, amount: int) -> None:
        item = self.model.get(key)
        if item is not None and type(item.value) is not int:
            with pytest.raises(TypeError):
                self.store.incr(key, amount)
            return
        started = time.time()
        ttl = None if item is None else self._expected_ttl(key)
        expected = (0 if item is None else item.value) + amount
        assert self.store.incr(key, amount) == expected
        self._wrote(key, expected, ttl, started)

    @rule(key=keys, new=values)
    def update(self, key: str, new: Any) -> None:
        item = self.model.get(key)
        old = "default" if item is None else item.value

        def fn(value: Any) -> Any:
            return [value, new]

        started = time.time()
        ttl = None if item is None else self._expected_ttl(key)
        assert _same(self.store.update(key, fn, default="default"), [old, new])
        self._wrote(key, [old, new], ttl, started)

    @rule(key=keys)
    def expire(self, key: str) -> None:
        started = time.time()
        present = key in self.model
        assert self.store.expire(key, LONG_TTL) is present
        if present:
            self._wrote(key, self.model[key].value, LONG_TTL, started)

    @rule(key=keys)
    def persist(self, key: str) -> None:
        present = key in self.model
        assert self.store.persist(key) is present
        if present:
            item = self.model[key]
            item.expires_at = None
            entry = self.store.get_entry(key)
            assert entry is not None and entry.revision >= item.revision
            self.rev = max(self.rev, entry.revision)
            item.revision = entry.revision

    @rule()
    def clear(self) -> None:
        had_keys = bool(self.model)
        self.store.clear()
        self.model.clear()
        if had_keys:
            self._changed_store()
        assert len(self.store) == 0 and self.store.keys() == []

    @precondition(lambda self: self.short_ttls_left > 0)
    @rule(key=keys, value=values)
    def short_ttl_runs_out(self, key: str, value: Any) -> None:
        self.short_ttls_left -= 1
        assert self.store.set(key, value, ttl=SHORT_TTL)
        time.sleep(SHORT_TTL * 2.5)
        self.model.pop(key, None)
        assert self.store.get(key, MISSING) is MISSING
        assert key not in self.store
        assert self.store.get_entry(key) is None
        with pytest.raises(KeyError):
            self.store.ttl(key)
        assert self.store.expire(key, LONG_TTL) is False
        # Expiry itself may take revisions (an "expire" change); they still only grow.
        revision = self.store.revision
        assert revision >= self.rev
        self.rev = revision

    # -- reads -----------------------------------------------------------------------------
    @rule(key=keys)
    def get(self, key: str) -> None:
        item = self.model.get(key)
        if item is None:
            assert self.store.get(key) is None
            assert self.store.get(key, MISSING) is MISSING
            assert key not in self.store
            with pytest.raises(KeyError):
                self.store[key]
        else:
            assert _same(self.store.get(key, MISSING), item.value)
            assert _same(self.store[key], item.value)
            assert key in self.store

    @rule(key=keys)
    def get_entry_and_ttl(self, key: str) -> None:
        item = self.model.get(key)
        entry = self.store.get_entry(key)
        if item is None:
            assert entry is None
            with pytest.raises(KeyError):
                self.store.ttl(key)
            return
        assert entry is not None
        assert _same(entry.value, item.value)
        assert entry.revision == item.revision
        ttl = self.store.ttl(key)
        if item.expires_at is None:
            assert entry.expires_at is None and ttl is None and entry.ttl is None
        else:
            assert entry.expires_at is not None and ttl is not None
            assert abs(entry.expires_at - item.expires_at) < TTL_TOLERANCE
            assert abs(ttl - (item.expires_at - time.time())) < TTL_TOLERANCE

    @rule(wanted=st.lists(keys, max_size=5))
    def get_many(self, wanted: list[str]) -> None:
        got = self.store.get_many(wanted)
        assert set(got) == {k for k in wanted if k in self.model}
        for key, value in got.items():
            assert _same(value, self.model[key].value)

    @rule(pattern=st.sampled_from(PATTERNS))
    def keys_and_items(self, pattern: str) -> None:
        want = sorted(k for k in self.model if fnmatchcase(k, pattern))
        assert self.store.keys(pattern) == want
        items = self.store.items(pattern)
        assert [k for k, _ in items] == want
        for key, value in items:
            assert _same(value, self.model[key].value)
        assert len(self.store.values(pattern)) == len(want)

    # -- what must hold after every step -----------------------------------------------------
    @invariant()
    def everything_matches(self) -> None:
        snapshot = self.store.get_all()
        assert set(snapshot) == set(self.model)
        for key, value in snapshot.items():
            assert _same(value, self.model[key].value), key
        assert len(self.store) == len(self.model)
        assert sorted(self.store) == sorted(self.model)
        revision = self.store.revision
        assert revision >= self.rev
        self.rev = revision


# -- running it on every backend --------------------------------------------------------------
MODEL_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], sharedkv.Store]]:
    kind = request.param
    if kind == "memory":
        yield lambda: sharedkv.Store("memory://")
    elif kind == "shm":
        yield lambda: sharedkv.Store(f"shm://{unique_name('model')}")
    else:
        pytest.importorskip("redis")
        server = request.getfixturevalue("redis_server")
        yield lambda: sharedkv.Store(f"{server.url}?namespace={unique_name('model')}")


def test_store_behaves_like_the_model(open_store: Callable[[], sharedkv.Store]) -> None:
    def machine() -> RuleBasedStateMachine:
        return StoreMachine(open_store)

    run_state_machine_as_test(machine, settings=MODEL_SETTINGS)  # type: ignore[arg-type]
