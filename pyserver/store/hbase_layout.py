"""The HBase store's bytes at rest: table names, row keys, column qualifiers, the head cell.

Pure data, no I/O (docs/storage.md, "The HBase store", describes the layout).
The users table follows DESIGN.md "Storage schema": row key = one salt byte
(`user_id % 256`) + the user id as 8 bytes big-endian; families `l` (log, one
cell per sequence number), `s` (latest snapshot), `m` (message bodies by id),
`x` (search terms: a postings cell per term and index flush).

Thrift1's checkAndPut compares one cell and puts one cell, so a user's append
is committed by swapping one cell, the *head* `l:last`: it holds the log's
last sequence number, a commit counter (`version`) and the batches (records,
messages, terms) of the latest commits, which readers overlay on the other
cells. Every few commits the writer copies ("materializes") those batches into
their `l`/`m`/`x` cells, with the head's version as the HBase cell timestamp,
so a late copy never hides a newer one; a big batch waits in staging cells.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pyserver.errors import BadRequest

U64_MAX = (1 << 64) - 1
# Cell timestamps are signed 64-bit, and Long.MAX_VALUE means "now" to HBase.
MAX_TIMESTAMP = (1 << 63) - 2
# HBase refuses row keys longer than Short.MAX_VALUE bytes.
MAX_ROW_KEY = 32767

# table -> its column families (single letters keep every cell's key short)
TABLES: dict[str, tuple[str, ...]] = {
    "users": ("l", "s", "m", "x"),
    "directory": ("c",),  # c:cell = the user's cell name
    "social": ("f",),  # f:<friend, 8 bytes BE> = 1 (friends) or 0 (no longer)
    "addresses": ("u",),  # u:user = the user id, 8 bytes BE; row = the address, case-folded
    "revocations": ("r",),  # r:<token id> = revoked at (Unix µs, 8 bytes BE); row = the user
}
# Names other parts of pyserver keep in the same namespace (the blob store).
RESERVED_TABLES = ("blobs",)

_NAMESPACE = re.compile(r"([A-Za-z0-9_.-]+:)?[A-Za-z0-9_.-]+")

# users: the head cell, the latest snapshot
HEAD = b"l:last"
SNAPSHOT_SEQ = b"s:seq"
# The search index's mark (how far the log is indexed): an `x` qualifier no term cell
# can have, since a term's qualifier starts with its length and terms are short.
INDEX_MARK = b"x:\xff\xff\xff\xffindexed"
# A term's postings from one index flush, its message ids in one cell (another part
# per POSTINGS_CELL_BYTES): x:<FFFFFFFE><term length, 4 bytes BE><term><the flush's
# mark, 8 bytes BE><part, 4 bytes BE>. A term cell (`term_column`, one per term and
# message) is what a batch in the head carries; the index flushes write postings.
_POSTINGS = b"\xff\xff\xff\xfe"
POSTINGS_CELL_BYTES = 64 << 10
SNAPSHOT_PARTS = b"s:parts"
_SNAPSHOT_PART = b"s:image"
# staging cells of a big batch: l:stage<token, 16 bytes><part, 4 bytes BE>
_STAGE = b"l:stage"
STAGE_TOKEN_BYTES = 16

DIRECTORY_CELL = b"c:cell"
ADDRESS_USER = b"u:user"
REVOCATION_FAMILY = b"r"
FRIEND_FAMILY = b"f"
FRIEND_YES = b"\x01"
FRIEND_NO = b"\x00"

# A value bigger than this is split over several cells: HBase refuses a cell
# over hbase.client.keyvalue.maxsize (10 MiB by default).
PART_BYTES = 4 << 20

_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">QQ")
_STAGED = struct.Struct(">16sIQ")
_TAIL, _STAGED_KIND, _EPOCH = 1, 2, 3
_EPOCH_VALUE = struct.Struct(">Q")


def table_name(namespace: str, table: str) -> bytes:
    """`<namespace>_<table>`: Thrift1 cannot create HBase namespaces, so ours is a name prefix.

    A namespace an operator created in HBase can be used as `hbase_ns:prefix`.
    """
    check_namespace(namespace)
    return f"{namespace}_{table}".encode()


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise BadRequest(
            f"HBase namespace {namespace!r}: use letters, digits, '_', '-', '.'"
            " (optionally behind 'hbase_namespace:')"
        )
    return namespace


# ---- validation, as SQLiteStore does it ----


def u64(value: Any, what: str = "user id") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= U64_MAX:
        raise BadRequest(f"{what} {value} is outside the unsigned 64-bit range")
    return value


def blob(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    return value


def address_key(address: Any) -> bytes:
    """The row key of an address: case-folded, UTF-8 (addresses match case-insensitively)."""
    key = text(address, "address").casefold().encode()
    if not key:
        raise BadRequest("an address cannot be empty")
    if len(key) > MAX_ROW_KEY:
        raise BadRequest(f"an address is at most {MAX_ROW_KEY} bytes (UTF-8, case-folded)")
    return key


# ---- row keys and qualifiers ----


def user_row(user_id: int) -> bytes:
    """Salt byte (`user_id % 256`, spreads writes over regions) + the id, 8 bytes big-endian."""
    return bytes((user_id & 0xFF,)) + user_id.to_bytes(8, "big")


def user_of_row(row: bytes) -> int:
    return int.from_bytes(row[1:9], "big")


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def log_column(seq: int) -> bytes:
    return b"l:" + seq_bytes(seq)


def message_column(message_id: bytes) -> bytes:
    return b"m:" + message_id


def term_prefix(term: bytes) -> bytes:
    """The qualifier prefix of a term's index cells: its length, then the term (unambiguous)."""
    return _U32.pack(len(term)) + term


def term_column(term: bytes, message_id: bytes) -> bytes:
    return b"x:" + term_prefix(term) + message_id


def split_term_qualifier(qualifier: bytes) -> tuple[bytes, bytes]:
    """(term, message id) of an `x` qualifier (without the family)."""
    (length,) = _U32.unpack_from(qualifier)
    return qualifier[4 : 4 + length], qualifier[4 + length :]


def postings_prefix(term: bytes) -> bytes:
    """The qualifier prefix of a term's postings cells (without the family)."""
    return _POSTINGS + term_prefix(term)


def postings_column(term: bytes, mark: int, part: int) -> bytes:
    """One part of a term's postings written by the index flush that ends at `mark`."""
    return b"x:" + postings_prefix(term) + seq_bytes(mark) + _U32.pack(part)


def postings_cells(
    term: bytes, mark: int, message_ids: Iterable[bytes]
) -> list[tuple[bytes, bytes]]:
    """(column, value) of a term's postings from the flush that ends at `mark`: the
    message ids, each after its length (4 bytes BE), in parts of at most
    POSTINGS_CELL_BYTES (or one id)."""
    entries = [(mid, _U32.pack(len(mid)) + mid) for mid in message_ids]
    return [
        (postings_column(term, mark, part), b"".join(entry for _, entry in group))
        for part, group in enumerate(group_by_size(entries, POSTINGS_CELL_BYTES))
    ]


def index_pairs(qualifier: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    """The (term, message id) pairs one `x` cell holds: a postings cell's, or a term cell's."""
    if not qualifier.startswith(_POSTINGS):
        return [split_term_qualifier(qualifier)]
    term, _ = split_term_qualifier(qualifier[len(_POSTINGS) :])
    return [(term, mid) for mid in _length_prefixed(value, "a postings cell")]


def friend_column(friend_id: int) -> bytes:
    return FRIEND_FAMILY + b":" + friend_id.to_bytes(8, "big")


def snapshot_part_column(part: int) -> bytes:
    return _SNAPSHOT_PART + str(part).encode()


def snapshot_timestamp(seq: int) -> int:
    """The cell timestamp of a snapshot: its log position, so the newest one wins every read.

    Positions beyond 2**63 - 2 (unreachable in practice) share the last timestamp.
    """
    return min(seq, MAX_TIMESTAMP)


def stage_column(token: bytes, part: int) -> bytes:
    return _STAGE + token + _U32.pack(part)


def split_parts(value: bytes, size: int = PART_BYTES) -> list[bytes]:
    """`value` in pieces of at most `size` bytes (one empty piece for an empty value)."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [b""]


# ---- a batch: what one append writes besides the head ----


@dataclass(frozen=True, slots=True)
class Batch:
    """The records, messages and terms of one append, already as bytes."""

    records: tuple[bytes, ...] = ()
    messages: tuple[tuple[bytes, bytes], ...] = ()  # (message id UTF-8, body)
    terms: tuple[tuple[bytes, bytes], ...] = ()  # (term UTF-8, message id UTF-8)

    def __bool__(self) -> bool:
        return bool(self.records or self.messages or self.terms)

    def encode(self) -> bytes:
        out = bytearray()
        out += _U32.pack(len(self.records))
        for record in self.records:
            out += _U32.pack(len(record)) + record
        for pairs in (self.messages, self.terms):
            out += _U32.pack(len(pairs))
            for first, second in pairs:
                out += _U32.pack(len(first)) + first + _U32.pack(len(second)) + second
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Batch:
        view = memoryview(data)
        pos = 0

        def chunk() -> bytes:
            nonlocal pos
            (length,) = _U32.unpack_from(view, pos)
            start = pos + 4
            pos = start + length
            if pos > len(view):
                raise ValueError("a batch is cut short")
            return bytes(view[start:pos])

        def count() -> int:
            nonlocal pos
            (n,) = _U32.unpack_from(view, pos)
            pos += 4
            return n

        try:
            records = tuple(chunk() for _ in range(count()))
            messages = tuple((chunk(), chunk()) for _ in range(count()))
            terms = tuple((chunk(), chunk()) for _ in range(count()))
        except struct.error:
            raise ValueError("a batch is cut short") from None
        if pos != len(view):
            raise ValueError("trailing bytes after a batch")
        return cls(records, messages, terms)

    def mutations(self, last_seq: int) -> Iterator[tuple[bytes, bytes]]:
        """(column, value) of every cell the batch materializes; its records end at `last_seq`."""
        first = last_seq - len(self.records) + 1
        for offset, record in enumerate(self.records):
            yield log_column(first + offset), record
        for message_id, body in self.messages:
            yield message_column(message_id), body
        for term, message_id in self.terms:
            yield term_column(term, message_id), b""


# ---- the head cell, `l:last` ----


@dataclass(frozen=True, slots=True)
class Staged:
    """Where a big batch waits: `parts` staging cells named by `token`, `size` bytes in all."""

    token: bytes
    parts: int
    size: int

    def columns(self) -> list[bytes]:
        return [stage_column(self.token, part) for part in range(self.parts)]


@dataclass(frozen=True, slots=True)
class Head:
    """The decoded head: the log's last seq, the commit counter, what is not materialized yet.

    `tail` holds the encoded batches of the latest commits, oldest first: a
    contiguous run of commits ending with the last one, none of which may be
    materialized yet (their records are the log's last entries). Or `staged`
    refers to one big batch in staging cells. A *compact* head has neither:
    every commit is materialized. `version` counts commits (0: none yet); a
    head's batches are materialized stamped with its version, which no other
    head of the user has, so a later head's copy always wins. `epoch` is the
    owner epoch (the fencing token of `HBaseStore.claim`), kept in the head so
    that the append's compare-and-set on the head checks it too; 0 (never
    claimed) is not written, so heads from before epochs read as epoch 0.
    """

    seq: int = 0
    version: int = 0
    tail: tuple[bytes, ...] = ()
    staged: Staged | None = None
    epoch: int = 0

    @property
    def compact(self) -> bool:
        return not self.tail and self.staged is None

    def pending(self) -> Batch | None:
        """The tail's batches as one, or None without a tail (staged batches are read apart)."""
        return merge([Batch.decode(encoded) for encoded in self.tail]) if self.tail else None

    def encode(self) -> bytes:
        head = _HEAD.pack(self.seq, self.version)
        if self.epoch:
            head += bytes((_EPOCH,)) + _EPOCH_VALUE.pack(self.epoch)
        if self.staged is not None:
            staged = self.staged
            return (
                head
                + bytes((_STAGED_KIND,))
                + _STAGED.pack(staged.token, staged.parts, staged.size)
            )
        if self.tail:
            parts = [head, bytes((_TAIL,)), _U32.pack(len(self.tail))]
            for encoded in self.tail:
                parts += (_U32.pack(len(encoded)), encoded)
            return b"".join(parts)
        return head

    @classmethod
    def decode(cls, raw: bytes) -> Head:
        """The head stored as `raw`; b"" (no cell) is the head of a user with no commit."""
        if not raw:
            return cls()
        if len(raw) < _HEAD.size:
            raise ValueError(f"a head cell of {len(raw)} bytes")
        seq, version = _HEAD.unpack_from(raw)
        at, epoch = _HEAD.size, 0
        if len(raw) > at and raw[at] == _EPOCH:
            if len(raw) < at + 1 + _EPOCH_VALUE.size:
                raise ValueError(f"a head cell of {len(raw)} bytes")
            (epoch,) = _EPOCH_VALUE.unpack_from(raw, at + 1)
            at += 1 + _EPOCH_VALUE.size
        if len(raw) == at:
            return cls(seq, version, epoch=epoch)
        kind, rest = raw[at], memoryview(raw)[at + 1 :]
        if kind == _TAIL:
            return cls(seq, version, tail=_split_tail(rest), epoch=epoch)
        if kind == _STAGED_KIND and len(rest) == _STAGED.size:
            token, parts, size = _STAGED.unpack(rest)
            return cls(seq, version, staged=Staged(token, parts, size), epoch=epoch)
        raise ValueError(f"a head cell of kind {kind}")

    def compacted(self) -> Head:
        return Head(self.seq, self.version, epoch=self.epoch)


def _split_tail(view: memoryview) -> tuple[bytes, ...]:
    if len(view) < 4:
        raise ValueError("a head's tail is cut short")
    (count,) = _U32.unpack_from(view)
    tail = _length_prefixed(view[4:], "a head's tail")
    if len(tail) != count or any(len(t) < 12 for t in tail):
        raise ValueError("a head's tail does not add up")
    return tuple(tail)


def _length_prefixed(data: bytes | memoryview, what: str) -> list[bytes]:
    """The items of `data`, each after its length (4 bytes BE), to its end; ValueError
    naming `what` if the last is cut short."""
    items, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError(f"{what} is cut short")
        (length,) = _U32.unpack_from(data, pos)
        end = pos + 4 + length
        if end > len(data):
            raise ValueError(f"{what} is cut short")
        items.append(bytes(data[pos + 4 : end]))
        pos = end
    return items


def merge(batches: Sequence[Batch]) -> Batch:
    """One batch that writes what `batches`, applied in order, write.

    Records in order; each message's last body; each (term, message) once.
    """
    if len(batches) == 1:
        return batches[0]
    messages: dict[bytes, bytes] = {}
    for batch in batches:
        messages.update(batch.messages)
    terms = dict.fromkeys(term for batch in batches for term in batch.terms)
    return Batch(
        tuple(record for batch in batches for record in batch.records),
        tuple(messages.items()),
        tuple(terms),
    )


def join_staged(staged: Staged, cells: dict[bytes, bytes]) -> Batch:
    """The batch a `Staged` head refers to, from its staging cells."""
    try:
        data = b"".join(cells[column] for column in staged.columns())
    except KeyError as missing:
        raise ValueError(f"staging cell {missing} of a committed batch is missing") from None
    if len(data) != staged.size:
        raise ValueError(f"staged batch of {len(data)} bytes, the head says {staged.size}")
    return Batch.decode(data)


def group_by_size(
    cells: Sequence[tuple[bytes, bytes]], limit: int, max_cells: int | None = None
) -> Iterator[list[tuple[bytes, bytes]]]:
    """Consecutive groups of (column, value), values adding up to at most `limit` (or one
    cell), and of at most `max_cells` cells if given."""
    group: list[tuple[bytes, bytes]] = []
    size = 0
    for cell in cells:
        if group and (size + len(cell[1]) > limit or len(group) == max_cells):
            yield group
            group, size = [], 0
        group.append(cell)
        size += len(cell[1])
    if group:
        yield group
