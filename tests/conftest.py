"""Shared fixtures: which implementations a parametrised test runs against."""

from __future__ import annotations

import os

import pytest

from pyserver.implementation import PURE_FORCED


def implementation_params() -> list:
    """`native` and `pure`; under PYSERVER_PURE=1 the native param is skipped, never otherwise."""
    native_marks = (
        [pytest.mark.skip(reason="PYSERVER_PURE=1 forces the pure twins")] if PURE_FORCED else []
    )
    return [pytest.param("native", marks=native_marks), "pure"]


# ---- the real engines (scripts/engines up) ----
#
# Tests that need ZooKeeper, HBase or memcached take these fixtures. Where an
# engine is not running they skip, so a developer can run the rest of the suite
# without starting them; under PYSERVER_REQUIRE_ENGINES=1 (set by .ci/run, which
# starts the engines first) a missing engine fails the test instead.

REQUIRE_ENGINES = os.environ.get("PYSERVER_REQUIRE_ENGINES", "") not in ("", "0")


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _need(engine: str, host: str, port: int) -> tuple[str, int]:
    if not _listening(host, port):
        message = f"{engine} is not running on {host}:{port} (scripts/engines up {engine})"
        if REQUIRE_ENGINES:
            pytest.fail(message)
        pytest.skip(message)
    return host, port


@pytest.fixture
def zookeeper() -> str:
    """The cells' ZooKeeper, as "host:port"."""
    port = int(os.environ.get("PYSERVER_ZOOKEEPER_PORT", "2181"))
    host, port = _need("zookeeper", "127.0.0.1", port)
    return f"{host}:{port}"


@pytest.fixture
def hbase_thrift() -> tuple[str, int]:
    """HBase's Thrift1 gateway, as (host, port)."""
    return _need("hbase", "127.0.0.1", int(os.environ.get("PYSERVER_THRIFT_PORT", "9090")))


@pytest.fixture
def hbase_thrift2() -> tuple[str, int]:
    """HBase's Thrift2 gateway (the HBase store's appends with `commit_port`), as (host, port)."""
    return _need("hbase", "127.0.0.1", int(os.environ.get("PYSERVER_THRIFT2_PORT", "9092")))


@pytest.fixture
def memcached_servers() -> list[tuple[str, int]]:
    """The memcached instances, one per data centre, as (host, port) pairs."""
    ports = os.environ.get("PYSERVER_MEMCACHED_PORTS", "11211,11212").split(",")
    return [_need("memcached", "127.0.0.1", int(port)) for port in ports]
