"""Which metadata store a node opens: the `store` setting, parsed and opened.

""                              the embedded SQLite store in data_dir (store.sqlite3)
"sqlite:PATH"                   the embedded SQLite store at PATH; several processes
                                may share one file (every append is a transaction
                                that checks the user's last sequence number)
"hbase:HOST:PORT[+PORT2][/namespace]"
                                HBase through its Thrift1 gateway at HOST:PORT and,
                                with +PORT2, its Thrift2 gateway at HOST:PORT2 for the
                                appends (pyserver.store.hbase; namespace "pyserver"
                                by default)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_HBASE_NAMESPACE", "StoreSpec", "open_store", "parse_store_spec"]

DEFAULT_HBASE_NAMESPACE = "pyserver"
SQLITE_FILE = "store.sqlite3"


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A parsed `store` setting: kind "sqlite" (with `path`) or "hbase" (host, port, the
    Thrift2 gateway's `commit_port` if any, namespace)."""

    kind: str
    path: Path | None = None
    host: str = ""
    port: int = 0
    namespace: str = ""
    commit_port: int | None = None

    def __str__(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:{self.path}"
        commits = "" if self.commit_port is None else f"+{self.commit_port}"
        return f"hbase:{self.host}:{self.port}{commits}/{self.namespace}"


def parse_store_spec(spec: str, data_dir: Path) -> StoreSpec:
    """The store a `store` setting names; ValueError says what is wrong with it."""
    if not spec:
        return StoreSpec("sqlite", path=data_dir / SQLITE_FILE)
    kind, _, rest = spec.partition(":")
    if kind == "sqlite":
        if not rest:
            raise ValueError("sqlite:PATH needs a path")
        return StoreSpec("sqlite", path=Path(rest))
    if kind == "hbase":
        address, _, namespace = rest.partition("/")
        host, _, ports = address.rpartition(":")
        port, plus, commit_port = ports.partition("+")
        if not host or not all(
            p.isdigit() and 0 < int(p) < 65536 for p in (port, *([commit_port] if plus else []))
        ):
            raise ValueError(f"hbase:HOST:PORT[+PORT2][/namespace] expected, not {spec!r}")
        namespace = namespace or DEFAULT_HBASE_NAMESPACE
        if not namespace.replace("_", "").isalnum():
            raise ValueError(f"HBase namespace {namespace!r}: letters, digits and _ only")
        return StoreSpec(
            "hbase",
            host=host,
            port=int(port),
            namespace=namespace,
            commit_port=int(commit_port) if plus else None,
        )
    raise ValueError(f"store {spec!r}: expected sqlite:PATH or hbase:HOST:PORT[+PORT2][/namespace]")


def open_store(spec: StoreSpec) -> Any:
    """The (not yet opened) store the spec names."""
    if spec.kind == "sqlite":
        from pyserver.store.sqlite import SQLiteStore

        assert spec.path is not None
        return SQLiteStore(spec.path)
    try:
        from pyserver.store.hbase import HBaseStore
    except ImportError as error:
        raise ValueError(f"the HBase store is not available: {error}") from None
    return HBaseStore(spec.host, spec.port, namespace=spec.namespace, commit_port=spec.commit_port)
