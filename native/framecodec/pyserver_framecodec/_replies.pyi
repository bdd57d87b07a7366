"""Type stubs for `pyserver_framecodec._replies`, the Cython table of cached-read replies.

The pure-Python twin `pyserver.pure.replies` has exactly this API.
"""

class ReplyTable:
    """Reply payloads of cached reads keyed by (op, request payload bytes), per user."""

    def __init__(self, max_bytes: int = ..., per_user: int = 32) -> None:
        """ValueError unless both are positive ints."""
    def put(self, user: int, op: int, payload: bytes, reply: bytes, read: bool = True) -> None:
        """Remember a reply (`read`: it answers a read just made, not a write's refresh);
        ValueError for a user outside 1..2**64-1 or an op outside 0..255."""
    def held(self, user: int, read_only: bool = False) -> list[tuple[int, bytes]]:
        """The (op, request payload) keys of the replies held for `user`, oldest first
        (`read_only`: only those asked for since they were put)."""
    def forget(self, user: int) -> None:
        """Drop every reply held for `user`."""
    def clear(self) -> None:
        """Drop every reply."""
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def hits(self) -> dict[int, int]:
        """Requests answered by `answer`, by op."""
    def answer(self, decoder: object, scope: int = 0) -> bytes | None:
        """Reply frames to the leading buffered requests held (consumed), or None (also
        for a decoder that is not this twin's FrameDecoder)."""
