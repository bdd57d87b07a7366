"""Type stubs for `pyserver_framecodec._codec`, the Cython wire-frame codec.

The pure-Python twin `pyserver.pure.frame` has exactly this API.
"""

from collections.abc import Iterator

from pyserver.framedef import Frame

def encode_frame(
    kind: int, op: int, request_id: int, payload: bytes | bytearray | memoryview
) -> bytes:
    """The wire bytes of one frame. TypeError for a non-int field or a payload that is not
    bytes-like; ValueError for a kind outside 0..3, op outside u16, request id outside u32,
    or a payload too large for the 32-bit length field."""

class FrameDecoder:
    """Incremental (sans-I/O) frame decoder. After a malformed frame every later
    next_frame() raises the same FrameError subclass again."""

    def __init__(self, max_frame_size: int = ...) -> None:
        """TypeError if not an int; ValueError if under 8 (the smallest frame length)."""
    @property
    def max_frame_size(self) -> int: ...
    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned in a frame."""
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer a chunk (a frame may be split anywhere). TypeError for other types.
        Ignored once the decoder is broken."""
    def next_frame(self) -> Frame | None:
        """The next whole frame, or None if more bytes are needed. FrameTooLarge as soon as
        a length over max_frame_size is seen; FrameError for a length under 8 or a kind
        outside 0..3; BadFrameVersion for a version other than 1."""
    def __iter__(self) -> Iterator[Frame]:
        """Yield frames until more bytes are needed."""
