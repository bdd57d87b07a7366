"""Which metadata store a node opens: the `store` setting, parsed and opened.

""                              the embedded SQLite store in data_dir (store.sqlite3)
"sqlite:PATH"                   the embedded SQLite store at PATH; several processes
                                may share one file (every append is a transaction
                                that checks the user's last sequence number)
"hbase:HOST:PORT[/namespace]"   HBase through its Thrift1 gateway
                                (pyserver.store.hbase; namespace "pyserver" by default)
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
    """A parsed `store` setting: kind "sqlite" (with `path`) or "hbase" (host, port, namespace)."""

    kind: str
    path: Path | None = None
    host: str = ""
    port: int = 0
    namespace: str = ""

    def __str__(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:{self.path}"
        return f"hbase:{self.host}:{self.port}/{self.namespace}"


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
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"hbase:HOST:PORT[/namespace] expected, not {spec!r}")
        namespace = namespace or DEFAULT_HBASE_NAMESPACE
        if not namespace.replace("_", "").isalnum():
            raise ValueError(f"HBase namespace {namespace!r}: letters, digits and _ only")
        return StoreSpec("hbase", host=host, port=int(port), namespace=namespace)
    raise ValueError(f"store {spec!r}: expected sqlite:PATH or hbase:HOST:PORT[/namespace]")


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
    return HBaseStore(spec.host, spec.port, namespace=spec.namespace)
