"""The wire-frame codec the server uses: the Cython one if built, else its pure twin.

`pyserver.implementation` makes the choice; this module only re-exports the chosen
`encode_frame` and `FrameDecoder` next to the layout from `pyserver.framedef`.
`IMPLEMENTATION` says which one is in use ("native" or "pure").
"""

from __future__ import annotations

from pyserver import implementation
from pyserver.framedef import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    KIND_ERROR,
    KIND_EVENT,
    KIND_REPLY,
    KIND_REQUEST,
    LENGTH_PREFIX_SIZE,
    MAX_FRAME_LENGTH,
    MAX_OP,
    MAX_REQUEST_ID,
    MIN_FRAME_LENGTH,
    VERSION,
    Frame,
)

if implementation.framecodec is not None:
    FrameDecoder = implementation.framecodec.FrameDecoder
    encode_frame = implementation.framecodec.encode_frame
    IMPLEMENTATION = "native"
else:
    from pyserver.pure.frame import FrameDecoder, encode_frame

    IMPLEMENTATION = "pure"

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "KIND_ERROR",
    "KIND_EVENT",
    "KIND_REPLY",
    "KIND_REQUEST",
    "LENGTH_PREFIX_SIZE",
    "MAX_FRAME_LENGTH",
    "MAX_OP",
    "MAX_REQUEST_ID",
    "MIN_FRAME_LENGTH",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "encode_frame",
]
