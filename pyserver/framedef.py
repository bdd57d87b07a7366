"""The wire frame of DESIGN.md ("Wire protocol"): its layout, limits and the `Frame` tuple.

Defined once here so the Cython codec and its pure-Python twin return instances of the
same class and agree on every constant. Layout, all big-endian:

    length (u32) | version (u8) | kind (u8) | op (u16) | request id (u32) | payload

`length` counts everything after itself, so it is `8 + len(payload)`.

May import: pyserver.errors.
"""

from __future__ import annotations

from typing import Final, NamedTuple

VERSION: Final = 1

KIND_REQUEST: Final = 0
KIND_REPLY: Final = 1
KIND_ERROR: Final = 2
KIND_EVENT: Final = 3

# The length prefix, then version, kind, op and request id: everything before the payload.
LENGTH_PREFIX_SIZE: Final = 4
HEADER_SIZE: Final = 12
# The smallest value the length field can hold: a frame with an empty payload.
MIN_FRAME_LENGTH: Final = HEADER_SIZE - LENGTH_PREFIX_SIZE

MAX_OP: Final = 0xFFFF
MAX_REQUEST_ID: Final = 0xFFFF_FFFF
MAX_FRAME_LENGTH: Final = 0xFFFF_FFFF

# Limit on the length field a decoder accepts unless told otherwise (1 MiB).
DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20


class Frame(NamedTuple):
    """One decoded frame. `payload` is the raw JSON bytes; the codec never parses it."""

    kind: int
    op: int
    request_id: int
    payload: bytes
