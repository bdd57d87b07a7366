"""What this installation runs: which twin, native or pure, each core part uses
(`pyserver doctor` prints it; every server prints it when it starts).

May import: pyserver.implementation and the facades that read it, pyserver.ring,
pyserver.logcodec, pyserver.snapcache and pyserver.wire.
"""

from __future__ import annotations

from pyserver import implementation, logcodec, ring, snapcache
from pyserver.wire import frame, replies

__all__ = ["report"]


def report() -> dict[str, str | bool]:
    """Which implementation each part is using, and whether the Rust build is optimised."""
    native = implementation.native
    return {
        "ring": ring.IMPLEMENTATION,
        "log_codec": logcodec.IMPLEMENTATION,
        "lru": snapcache.IMPLEMENTATION,
        "frame_codec": frame.IMPLEMENTATION,
        "reply_table": replies.IMPLEMENTATION,
        "native_release_build": bool(native is not None and native.RELEASE_BUILD),
    }
