"""Pure-Python twin of the Cython wire-frame codec (`pyserver_framecodec`).

Same API, same bytes out and the same errors as the Cython module; the layout lives in
`pyserver.framedef`. Sans I/O: it is fed bytes and hands back `Frame`s.

The decoder keeps the unread part of one chunk (`bytes` plus a read position) and a
list of later chunks. The chunks are joined only once enough bytes have arrived to make
progress, so a large frame arriving in many small chunks is copied a bounded number of
times instead of once per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from struct import Struct
from typing import NoReturn

from pyserver.errors import BadFrameVersion, FrameError, FrameTooLarge
from pyserver.framedef import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    KIND_EVENT,
    LENGTH_PREFIX_SIZE,
    MAX_FRAME_LENGTH,
    MAX_OP,
    MAX_REQUEST_ID,
    MIN_FRAME_LENGTH,
    VERSION,
    Frame,
)

__all__ = ["Frame", "FrameDecoder", "encode_frame"]

_HEADER = Struct(">IBBHI")
_LENGTH = Struct(">I")
# Builds a Frame from a ready tuple without the keyword-handling `Frame.__new__`.
_new_tuple = tuple.__new__


def _check_field(value: object, name: str, limit: int, what: str) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{name} {value} is out of range: {what}")


def encode_frame(kind: int, op: int, request_id: int, payload: bytes) -> bytes:
    """The wire bytes of one frame; ValueError if a field does not fit its slot."""
    _check_field(kind, "kind", KIND_EVENT, "must be 0 (request), 1 (reply), 2 (error) or 3 (event)")
    _check_field(op, "op", MAX_OP, "must fit in an unsigned 16-bit field")
    _check_field(request_id, "request_id", MAX_REQUEST_ID, "must fit in an unsigned 32-bit field")
    if isinstance(payload, memoryview):
        size = payload.nbytes
        if not payload.c_contiguous:
            payload = payload.tobytes()
    elif isinstance(payload, (bytes, bytearray)):
        size = len(payload)
    else:
        raise TypeError(
            f"payload must be bytes, bytearray or memoryview, not {type(payload).__name__}"
        )
    length = MIN_FRAME_LENGTH + size
    if length > MAX_FRAME_LENGTH:
        raise ValueError(
            f"payload of {size} bytes is too large: the frame length must fit in 32 bits"
        )
    return _HEADER.pack(length, VERSION, kind, op, request_id) + payload


class FrameDecoder:
    """Incremental frame decoder: `feed()` chunks as they arrive, then drain `next_frame()`.

    After a malformed frame the decoder is broken: the stream can no longer be trusted,
    so every later `next_frame()` raises the same error again. Frames before the bad one
    are returned normally.
    """

    __slots__ = ("_buf", "_error", "_limit", "_max_frame_size", "_pending", "_pending_size", "_pos")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not isinstance(max_frame_size, int):
            raise TypeError(f"max_frame_size must be an int, not {type(max_frame_size).__name__}")
        if max_frame_size < MIN_FRAME_LENGTH:
            raise ValueError(
                f"max_frame_size {max_frame_size} is below {MIN_FRAME_LENGTH}, "
                "the length of a frame with an empty payload"
            )
        self._max_frame_size = max_frame_size
        # The length field is 32 bits, so a larger limit is no limit at all.
        self._limit = min(max_frame_size, MAX_FRAME_LENGTH)
        self._buf = b""  # the current chunk; bytes before _pos are consumed
        self._pos = 0
        self._pending: list[bytes] = []  # chunks fed after _buf, not yet joined
        self._pending_size = 0  # bytes in _pending
        # Once broken: the error's class and message, raised afresh on every later call.
        self._error: tuple[type[FrameError], str] | None = None

    @property
    def max_frame_size(self) -> int:
        """The largest length field accepted (the frame minus its 4-byte length prefix)."""
        return self._max_frame_size

    @property
    def buffered(self) -> int:
        """The number of bytes held: fed but not yet returned in a frame."""
        return len(self._buf) - self._pos + self._pending_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer a chunk of the stream; a frame may be split anywhere."""
        if type(data) is not bytes:
            # Copy: the caller may reuse a mutable buffer once feed() returns.
            if isinstance(data, (bytes, bytearray, memoryview)):
                data = bytes(data)
            else:
                raise TypeError(
                    f"feed() takes bytes, bytearray or memoryview, not {type(data).__name__}"
                )
        if not data:
            return
        if self._error is not None:
            return  # the stream is already untrusted; holding more of it helps no one
        if not self._pending and self._pos == len(self._buf):
            self._buf = data
            self._pos = 0
        else:
            self._pending.append(data)
            self._pending_size += len(data)

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None if more bytes are needed."""
        buf = self._buf
        pos = self._pos
        # Fast path: a whole, well-formed frame at the front of the current chunk.
        if len(buf) - pos >= HEADER_SIZE and self._error is None:
            length, version, kind, op, request_id = _HEADER.unpack_from(buf, pos)
            end = pos + LENGTH_PREFIX_SIZE + length
            if (
                end <= len(buf)
                and MIN_FRAME_LENGTH <= length <= self._limit
                and version == VERSION
                and kind <= KIND_EVENT
            ):
                self._pos = end
                return _new_tuple(Frame, (kind, op, request_id, buf[pos + HEADER_SIZE : end]))
        return self._next_frame_slow()

    def _next_frame_slow(self) -> Frame | None:
        if self._error is not None:
            error_class, message = self._error
            raise error_class(message)
        if self._gather(LENGTH_PREFIX_SIZE) < LENGTH_PREFIX_SIZE:
            return None
        (length,) = _LENGTH.unpack_from(self._buf, self._pos)
        if length > self._limit:
            self._fail(
                FrameTooLarge,
                f"frame length {length} is over the limit of {self._max_frame_size} bytes",
            )
        if length < MIN_FRAME_LENGTH:
            self._fail(
                FrameError,
                f"frame length {length} is under {MIN_FRAME_LENGTH}, the size of the header",
            )
        if self._gather(HEADER_SIZE) < HEADER_SIZE:
            return None
        _, version, kind, op, request_id = _HEADER.unpack_from(self._buf, self._pos)
        if version != VERSION:
            self._fail(
                BadFrameVersion, f"frame version {version} is not supported (expected {VERSION})"
            )
        if kind > KIND_EVENT:
            self._fail(FrameError, f"frame kind {kind} is unknown (expected 0 to {KIND_EVENT})")
        total = LENGTH_PREFIX_SIZE + length
        if self._gather(total) < total:
            return None
        pos = self._pos
        self._pos = pos + total
        payload = self._buf[pos + HEADER_SIZE : pos + total]
        return _new_tuple(Frame, (kind, op, request_id, payload))

    def _gather(self, needed: int) -> int:
        """Join the pending chunks onto the current one if that yields `needed` bytes.

        Returns the unread bytes now in the current chunk. Joining only when it lets the
        decoder progress keeps the copying linear in the bytes fed.
        """
        available = len(self._buf) - self._pos
        if available < needed and self._pending and available + self._pending_size >= needed:
            self._buf = b"".join([self._buf[self._pos :], *self._pending])
            self._pos = 0
            self._pending.clear()
            self._pending_size = 0
            available = len(self._buf)
        return available

    def _fail(self, error_class: type[FrameError], message: str) -> NoReturn:
        self._error = (error_class, message)
        raise error_class(message)

    def __iter__(self) -> Iterator[Frame]:
        """Yield the whole frames buffered, stopping when more bytes are needed."""
        while (frame := self.next_frame()) is not None:
            yield frame
