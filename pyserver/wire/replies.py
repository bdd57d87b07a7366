"""The table of cached-read replies the server uses: the Cython one if built, else its twin.

It reads the buffer of the frame decoder chosen by `pyserver.wire.frame`, so both come
from the same implementation. `IMPLEMENTATION` says which ("native" or "pure").
"""

from __future__ import annotations

from pyserver import implementation

if implementation.framecodec is not None:
    ReplyTable = implementation.framecodec.ReplyTable
    IMPLEMENTATION = "native"
else:
    from pyserver.pure.replies import ReplyTable

    IMPLEMENTATION = "pure"

__all__ = ["IMPLEMENTATION", "ReplyTable"]
