"""The data access layer: one store interface, pluggable engines (embedded SQLite; HBase).

Owns every byte at rest: per-user logs, snapshots, message bodies, search terms,
the user directory, the social graph and the address book. Calls nothing above it.

May import: pyserver.errors, pyserver.userid, pyserver.implementation (PYSERVER_PURE).
"""

from pyserver.store.base import LogAppend, Store, StoreUnavailable, WriteConflict

__all__ = ["LogAppend", "Store", "StoreUnavailable", "WriteConflict"]
