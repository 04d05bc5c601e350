"""Fixtures shared by every test: one ``store`` fixture that runs the suite on every backend."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator

import pytest

import sharedkv
from sharedkv._backends import shm

from ._redis_server import RedisServer, redis_server_binary

BACKENDS: list[object] = ["memory", "shm"]
if importlib.util.find_spec("sharedkv._backends.redis") is not None:
    BACKENDS.append(pytest.param("redis", marks=pytest.mark.redis))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        if os.environ.get("SHAREDKV_REQUIRE_REDIS"):
            pytest.fail("SHAREDKV_REQUIRE_REDIS is set but redis-server is not installed")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


_SESSION = uuid.uuid4().hex[:6]


def unique_name(prefix: str = "t") -> str:
    """A store name unique to this test, tagged with this test session."""
    return f"{prefix}-{_SESSION}{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[sharedkv.Store]:
    kind = request.param
    if kind == "redis":
        pytest.importorskip("redis")
    url = _url_for(request, kind)
    s = sharedkv.Store(url)
    try:
        yield s
    finally:
        if kind == "redis" and not s.closed:
            s.clear()
        s.close()


def _url_for(request: pytest.FixtureRequest, kind: str) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "shm":
        return f"shm://{unique_name()}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return f"{server.url}?namespace={unique_name('ns')}"


@pytest.fixture
def shm_store() -> Iterator[sharedkv.Store]:
    s = sharedkv.Store(f"shm://{unique_name()}")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_stores() -> Iterator[None]:
    before = set(os.listdir(shm.root_dir())) if os.path.isdir(shm.root_dir()) else set()
    yield
    after = set(os.listdir(shm.root_dir())) if os.path.isdir(shm.root_dir()) else set()
    # Only this session's stores: other programs on the machine may be using stores too.
    ours = {
        name for name in after - before if _SESSION in name or name.startswith(f"p{os.getpid()}-")
    }
    assert not ours, f"tests left stores behind: {sorted(ours)}"
