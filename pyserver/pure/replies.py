"""The pure-Python twin of `pyserver_framecodec.ReplyTable`: same API, same bytes out.

Replies to cached reads keyed by (op, request payload bytes), each tagged with its user;
`answer()` replies to the leading run of buffered request frames that hit, straight out
of a `pyserver.pure.frame.FrameDecoder`'s current chunk (the two are twins of one
package, so this reads the decoder's fields). Frames it cannot answer stay buffered for
the Python dispatcher.
"""

from __future__ import annotations

import struct

from pyserver.framedef import (
    HEADER_SIZE,
    KIND_REPLY,
    KIND_REQUEST,
    LENGTH_PREFIX_SIZE,
    MIN_FRAME_LENGTH,
    VERSION,
)
from pyserver.pure.frame import FrameDecoder
from pyserver.userid import MAX_USER_ID

__all__ = ["ReplyTable"]

_HEADER = struct.Struct(">IBBHI")
# Ops the table may hold: every cached read of the protocol is below this.
_OP_LIMIT = 256
# Bytes counted for an entry beyond its payload and reply (the native twin's figure).
_ENTRY_OVERHEAD = 160


class ReplyTable:
    """Reply payloads of cached reads, bounded by `max_bytes` in all and `per_user` entries."""

    def __init__(self, max_bytes: int = 64 << 20, per_user: int = 32) -> None:
        if type(max_bytes) is not int or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, not {max_bytes!r}")
        if type(per_user) is not int or per_user < 1:
            raise ValueError(f"per_user must be a positive int, not {per_user!r}")
        self._max_bytes = max_bytes
        self._per_user = per_user
        # (op, payload) -> (user, reply)
        self._entries: dict[tuple[int, bytes], tuple[int, bytes]] = {}
        self._by_user: dict[int, list[tuple[int, bytes]]] = {}
        # keys put with read=False and not asked for since (see `held`)
        self._unread: set[tuple[int, bytes]] = set()
        self._nbytes = 0
        self._hits: dict[int, int] = {}

    def put(self, user: int, op: int, payload: bytes, reply: bytes, read: bool = True) -> None:
        """Remember `reply` as the answer to `payload` of `op`, for `user` and services.
        `read`: it answers a read just made (False: it was answered again after a write,
        and nobody has asked for it since; see `held`)."""
        if type(user) is not int or not 1 <= user <= MAX_USER_ID:
            raise ValueError(f"user must be a user id in 1..2**64-1, not {user!r}")
        if type(op) is not int or not 0 <= op < _OP_LIMIT:
            raise ValueError(f"op must be an int in 0..{_OP_LIMIT - 1}, not {op!r}")
        if type(payload) is not bytes or type(reply) is not bytes:
            raise TypeError("payload and reply must be bytes")
        size = len(payload) + len(reply) + _ENTRY_OVERHEAD
        if size > self._max_bytes:
            return  # larger than the whole table: not worth holding
        key = (op, payload)
        held = self._entries.get(key)
        if held is not None:
            self._drop(key, held)
            keys = self._by_user.get(held[0])
            if keys is not None:
                keys.remove(key)
                if not keys:
                    del self._by_user[held[0]]
        keys = self._by_user.get(user)
        if keys is not None and len(keys) >= self._per_user:
            self.forget(user)
        if self._nbytes + size > self._max_bytes:
            self.clear()
        self._entries[key] = (user, reply)
        self._nbytes += size
        self._by_user.setdefault(user, []).append(key)
        if not read:
            self._unread.add(key)

    def _drop(self, key: tuple[int, bytes], held: tuple[int, bytes]) -> None:
        del self._entries[key]
        self._unread.discard(key)
        self._nbytes -= len(key[1]) + len(held[1]) + _ENTRY_OVERHEAD

    def held(self, user: int, read_only: bool = False) -> list[tuple[int, bytes]]:
        """The (op, request payload) keys of the replies held for `user`, oldest first;
        with `read_only`, only those asked for since they were put."""
        keys = self._by_user.get(user, ())
        if read_only:
            return [key for key in keys if key not in self._unread]
        return list(keys)

    def forget(self, user: int) -> None:
        """Drop every reply held for `user` (its image changed or left the cache)."""
        for key in self._by_user.pop(user, ()):
            held = self._entries.get(key)
            if held is not None:
                self._drop(key, held)

    def clear(self) -> None:
        """Drop every reply (the server stopped serving, or the table is full)."""
        self._entries.clear()
        self._by_user.clear()
        self._unread.clear()
        self._nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held, counted as payload + reply + a fixed overhead per entry."""
        return self._nbytes

    def hits(self) -> dict[int, int]:
        """Requests answered by `answer`, by op, since the table was made."""
        return dict(self._hits)

    def answer(self, decoder: FrameDecoder, scope: int = 0) -> bytes | None:
        """The reply frames to the leading buffered requests held, consumed; else None.

        `scope` is the user a user-token connection may read (0: a service connection).
        """
        if type(decoder) is not FrameDecoder or decoder._error is not None:
            return None  # the native twin's decoder is not read here
        buf, pos = decoder._buf, decoder._pos
        out: list[bytes] = []
        while len(buf) - pos >= HEADER_SIZE:
            length, version, kind, op, request_id = _HEADER.unpack_from(buf, pos)
            end = pos + LENGTH_PREFIX_SIZE + length
            if (
                not MIN_FRAME_LENGTH <= length <= decoder._limit
                or end > len(buf)
                or version != VERSION
                or kind != KIND_REQUEST
                or request_id == 0
            ):
                break
            key = (op, buf[pos + HEADER_SIZE : end])
            held = self._entries.get(key)
            if held is None or (scope != 0 and held[0] != scope):
                break
            self._unread.discard(key)
            reply = held[1]
            out.append(_HEADER.pack(MIN_FRAME_LENGTH + len(reply), VERSION, KIND_REPLY, op,
                                    request_id))  # fmt: skip
            out.append(reply)
            self._hits[op] = self._hits.get(op, 0) + 1
            pos = end
        if not out:
            return None
        decoder._pos = pos
        return b"".join(out)
