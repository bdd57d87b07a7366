"""The blob store interface (the Haystack role): content-addressed, deduplicated, checksummed.

A blob is an immutable byte string named by its SHA-256 (lowercase hex, its
`ref`): storing the same bytes twice stores them once. Blobs are kept in
chunks of `CHUNK_SIZE` bytes, each with its own CRC32C, so any range can be
read and verified without reading the whole blob; a whole read also checks the
SHA-256. A blob that fails a check raises `BlobCorrupt`: corrupt bytes are
never handed out. Writes take an async iterator of chunks and reads give one,
so a big attachment never sits whole in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass

import google_crc32c

from pyserver.errors import BadRequest, NotFound, PyserverError

__all__ = [
    "CHUNK_SIZE",
    "BlobCorrupt",
    "BlobInfo",
    "BlobNotFound",
    "BlobSource",
    "BlobStore",
    "check_ref",
    "chunk_crc",
    "is_ref",
]

# Chunk size: the unit of checksums, of reads and of the HBase rows.
CHUNK_SIZE = 256 << 10

_REF = re.compile(r"[0-9a-f]{64}")

# What `put` accepts: the bytes, or the bytes in pieces (any sizes), sync or async.
BlobSource = bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes]


class BlobNotFound(NotFound):
    """No blob with this ref."""


class BlobCorrupt(PyserverError):
    """The stored bytes of a blob do not match their checksum; they are never returned."""

    code = "INTERNAL"


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob: its ref (SHA-256, lowercase hex) and its size in bytes."""

    ref: str
    size: int


def is_ref(value: object) -> bool:
    """Whether `value` is a blob ref: 64 lowercase hex digits."""
    return isinstance(value, str) and _REF.fullmatch(value) is not None


def check_ref(value: object, name: str = "ref") -> str:
    """`value` if it is a blob ref, else BadRequest naming the field."""
    if not is_ref(value):
        raise BadRequest(f"{name}: must be a blob ref (64 lowercase hex digits), not {value!r}")
    return value  # type: ignore[return-value]


def chunk_crc(data: bytes | memoryview) -> int:
    """The CRC32C of one chunk."""
    return google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)


def ref_of(data: bytes) -> str:
    """The ref of some bytes."""
    return hashlib.sha256(data).hexdigest()


class BlobStore(ABC):
    """Content-addressed blob storage. Every method is a coroutine or an async iterator.

    A `put` is durable when it returns. Engines raise `Unavailable` when they
    cannot serve, `BlobNotFound` for a ref they do not hold and `BlobCorrupt`
    for stored bytes that fail their checksum.
    """

    @abstractmethod
    async def open(self) -> None:
        """Create what is missing (safe to run twice)."""

    @abstractmethod
    async def close(self) -> None:
        """Release every resource."""

    @abstractmethod
    async def put(self, source: BlobSource) -> BlobInfo:
        """Store bytes (given whole or in pieces); the same bytes are stored once."""

    async def put_unsynced(self, source: BlobSource) -> tuple[BlobInfo, asyncio.Future[None]]:
        """Store bytes; the blob's info at once, and a future done once it is durable (it
        fails with the store's error if it cannot be made so). For a caller with other
        durable work to do meanwhile: it must wait for the future before telling anyone
        the blob is stored. An engine without group commit is durable at once."""
        info = await self.put(source)
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        durable.set_result(None)
        return info, durable

    @abstractmethod
    async def stat(self, ref: str) -> BlobInfo | None:
        """The blob's ref and size, or None if it is not stored."""

    @abstractmethod
    def read(self, ref: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """The bytes `offset .. offset+length` (to the end if `length` is None), in chunks.

        Each chunk is checked before it is yielded; reading a whole blob also
        checks its SHA-256 before the last piece is yielded. An offset past the
        end gives nothing.
        """

    async def get(self, ref: str, offset: int = 0, length: int | None = None) -> bytes:
        """The bytes of a range (or the whole blob) in one piece: for small ranges."""
        return b"".join([piece async for piece in self.read(ref, offset, length)])


def check_range(offset: int, length: int | None) -> None:
    """Reject a negative offset or length (BadRequest)."""
    if offset < 0 or (length is not None and length < 0):
        raise BadRequest(f"bad blob range: offset {offset}, length {length}")


async def pieces_of(source: BlobSource) -> AsyncIterator[bytes]:
    """The pieces of any BlobSource as an async iterator."""
    if isinstance(source, bytes | bytearray | memoryview):
        yield bytes(source) if not isinstance(source, bytes) else source
    elif isinstance(source, AsyncIterable):
        async for piece in source:
            yield piece
    else:
        for piece in source:
            yield piece
