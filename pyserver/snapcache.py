"""The LRU snapshot cache of recent users' images: `from pyserver.snapcache import SnapshotCache`.

The Rust class (`pyserver._native.SnapshotCache`) when the native module is
built, else its pure-Python twin (`pyserver.pure.snapcache`); both have the
same API and behaviour. `IMPLEMENTATION` says which one is in use.

May import: pyserver.implementation, pyserver.pure, pyserver.errors.
"""

from __future__ import annotations

from pyserver import implementation

if implementation.native is not None:
    SnapshotCache = implementation.native.SnapshotCache
    IMPLEMENTATION = "native"
else:
    from pyserver.pure.snapcache import SnapshotCache

    IMPLEMENTATION = "pure"

__all__ = ["IMPLEMENTATION", "SnapshotCache"]
