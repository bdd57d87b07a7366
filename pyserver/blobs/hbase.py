"""The HBase blob store: the `<namespace>_blobs` table, one row per chunk, through Thrift1.

Row keys: the blob's SHA-256 (32 bytes) for its head row, the SHA-256 and the
chunk index (4 bytes big-endian) for each chunk row, so a blob's rows sort
together. Family `b`: a chunk row holds `b:d` (the chunk, at most CHUNK_SIZE
bytes) and `b:c` (its CRC32C, 4 bytes big-endian); the head row holds `b:size`
(8 bytes big-endian) and `b:chunk` (the chunk size, 4 bytes big-endian). The
head is written last, so a blob without its head is not there (a put that
died half-way is invisible and the next put of the same bytes rewrites it).

A blob's rows need its ref, which a stream only gives at its end: a streamed
put spools to a temporary local file first (memory stays bounded), then
uploads. Connections come from `pyserver.store.hbase_pool.ThriftPool`, the
tables are created as the HBase store creates its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, BinaryIO, TypeVar

import aiohappybase  # noqa: F401  (loads the Hbase_thrift module below)
import google_crc32c
from Hbase_thrift import BatchMutation, Mutation

from pyserver.blobs.base import (
    CHUNK_SIZE,
    BlobCorrupt,
    BlobInfo,
    BlobNotFound,
    BlobSource,
    BlobStore,
    check_range,
    check_ref,
    pieces_of,
)
from pyserver.errors import PyserverError, Unavailable
from pyserver.store.hbase import (
    ADMIN_TIMEOUT_S,
    column_descriptors,
    ensure_tables,
    unavailable_error,
)
from pyserver.store.hbase_layout import table_name
from pyserver.store.hbase_pool import ThriftPool

__all__ = ["HBaseBlobStore"]

T = TypeVar("T")

_SIZE = b"b:size"
_CHUNK = b"b:chunk"
_DATA = b"b:d"
_CRC = b"b:c"
# Chunks written or read per Thrift call.
_CHUNKS_PER_CALL = 8


def _chunk_row(ref: bytes, index: int) -> bytes:
    return ref + struct.pack(">I", index)


class HBaseBlobStore(BlobStore):
    """Blobs in HBase (see the module docstring); `timeout_s` bounds each Thrift call."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9090,
        *,
        namespace: str = "pyserver",
        pool_size: int = 8,
        timeout_s: float = 30.0,
    ) -> None:
        self._host, self._port = host, int(port)
        self.table = table_name(namespace, "blobs")
        self._pool_size = pool_size
        self._timeout_s = timeout_s
        self._pool: ThriftPool | None = None

    # ---- lifecycle ----

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = ThriftPool(self._host, self._port, self._pool_size, ADMIN_TIMEOUT_S)
        try:
            async with asyncio.timeout(ADMIN_TIMEOUT_S):
                await ensure_tables(
                    pool, {self.table: column_descriptors("b")}, answer_within_s=self._timeout_s
                )
        except PyserverError:
            pool.close()
            raise
        except Exception as exc:
            pool.close()
            raise unavailable_error(
                f"open the blobs table at {self._host}:{self._port}", exc
            ) from exc
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    async def drop(self) -> None:
        """Disable and delete the blobs table (tests, tools)."""
        table = self.table

        async def drop(client: Any) -> None:
            if table in await client.getTableNames():
                if await client.isTableEnabled(table):
                    await client.disableTable(table)
                await client.deleteTable(table)

        await self._call("drop the blobs table", drop)

    async def _call(self, action: str, query: Callable[[Any], Awaitable[T]]) -> T:
        pool = self._pool
        if pool is None:
            raise Unavailable("the HBase blob store is not open")
        try:
            async with asyncio.timeout(self._timeout_s):
                async with pool.borrow() as connection:
                    return await query(connection.client)
        except PyserverError:
            raise
        except TimeoutError as exc:
            raise Unavailable(f"HBase blobs: {action}: no answer in {self._timeout_s:g} s") from exc
        except Exception as exc:
            raise unavailable_error(f"blobs: {action}", exc) from exc

    # ---- writing ----

    async def put(self, source: BlobSource) -> BlobInfo:
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            ref = hashlib.sha256(data).hexdigest()
            if await self.stat(ref) is None:
                await self._upload(ref, len(data), _memory_chunks(data))
            return BlobInfo(ref, len(data))
        spool = tempfile.TemporaryFile(prefix="pyserver-blob-")  # noqa: SIM115 (closed below)
        try:
            digest, size = hashlib.sha256(), 0
            async for piece in pieces_of(source):
                digest.update(piece)
                size += len(piece)
                await asyncio.to_thread(spool.write, piece)
            ref = digest.hexdigest()
            if await self.stat(ref) is None:
                spool.seek(0)
                await self._upload(ref, size, _file_chunks(spool))
            return BlobInfo(ref, size)
        finally:
            spool.close()

    async def _upload(self, ref: str, size: int, chunks: AsyncIterator[bytes]) -> None:
        key = bytes.fromhex(ref)
        batch: list[Any] = []
        index = 0

        async def flush() -> None:
            rows = list(batch)
            batch.clear()
            await self._call("write chunks", lambda client: client.mutateRows(self.table, rows, {}))

        async for chunk in chunks:
            crc = struct.pack(">I", google_crc32c.value(chunk))
            mutations = [Mutation(column=_DATA, value=chunk), Mutation(column=_CRC, value=crc)]
            batch.append(BatchMutation(row=_chunk_row(key, index), mutations=mutations))
            index += 1
            if len(batch) >= _CHUNKS_PER_CALL:
                await flush()
        if batch:
            await flush()
        head = [
            Mutation(column=_SIZE, value=struct.pack(">Q", size)),
            Mutation(column=_CHUNK, value=struct.pack(">I", CHUNK_SIZE)),
        ]
        await self._call(
            "write the head", lambda client: client.mutateRow(self.table, key, head, {})
        )

    # ---- reading ----

    async def _head(self, ref: str) -> tuple[int, int] | None:
        key = bytes.fromhex(ref)
        rows = await self._call(
            "read a head",
            lambda client: client.getRowWithColumns(self.table, key, [_SIZE, _CHUNK], {}),
        )
        if not rows or not rows[0].columns:
            return None
        cells = {column: cell.value for column, cell in rows[0].columns.items()}
        try:
            (size,) = struct.unpack(">Q", cells[_SIZE])
            (chunk_size,) = struct.unpack(">I", cells[_CHUNK])
        except (KeyError, struct.error):
            raise BlobCorrupt(f"blob {ref}: bad head row") from None
        if chunk_size == 0:
            raise BlobCorrupt(f"blob {ref}: bad head row")
        return size, chunk_size

    async def stat(self, ref: str) -> BlobInfo | None:
        check_ref(ref)
        head = await self._head(ref)
        return None if head is None else BlobInfo(ref, head[0])

    async def read(
        self, ref: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        check_ref(ref)
        check_range(offset, length)
        head = await self._head(ref)
        if head is None:
            raise BlobNotFound(f"no blob {ref}")
        size, chunk_size = head
        end = size if length is None else min(size, offset + length)
        if size == 0 and ref != hashlib.sha256(b"").hexdigest():
            raise BlobCorrupt(f"blob {ref}: empty, but its ref is not the empty one")
        if offset >= end:
            return
        digest = hashlib.sha256() if offset == 0 and end == size else None
        first, last = offset // chunk_size, (end - 1) // chunk_size
        key = bytes.fromhex(ref)
        held: bytes | None = None
        for low in range(first, last + 1, _CHUNKS_PER_CALL):
            indexes = list(range(low, min(last, low + _CHUNKS_PER_CALL - 1) + 1))
            chunks = await self._chunks(ref, key, indexes, chunk_size, size)
            for index, chunk in zip(indexes, chunks, strict=True):
                if digest is not None:
                    digest.update(chunk)
                base = index * chunk_size
                piece = chunk[max(offset - base, 0) : min(end - base, len(chunk))]
                if held is not None:
                    yield held
                held = piece
        if digest is not None and digest.hexdigest() != ref:
            raise BlobCorrupt(f"blob {ref}: its bytes do not hash to its ref")
        if held is not None:
            yield held

    async def _chunks(
        self, ref: str, key: bytes, indexes: list[int], chunk_size: int, size: int
    ) -> list[bytes]:
        rows = [_chunk_row(key, index) for index in indexes]
        found = await self._call(
            "read chunks",
            lambda client: client.getRowsWithColumns(self.table, rows, [_DATA, _CRC], {}),
        )
        by_row = {r.row: {c: cell.value for c, cell in r.columns.items()} for r in found}
        chunks = []
        for index, row in zip(indexes, rows, strict=True):
            cells = by_row.get(row, {})
            chunk, crc = cells.get(_DATA, b""), cells.get(_CRC)
            expected = min(chunk_size, size - index * chunk_size)
            if crc is None or len(chunk) != expected:
                raise BlobCorrupt(f"blob {ref}: chunk {index} is missing or cut short")
            if struct.pack(">I", google_crc32c.value(chunk)) != crc:
                raise BlobCorrupt(f"blob {ref}: chunk {index} does not match its checksum")
            chunks.append(chunk)
        return chunks


async def _memory_chunks(data: bytes) -> AsyncIterator[bytes]:
    for low in range(0, len(data), CHUNK_SIZE):
        yield data[low : low + CHUNK_SIZE]


async def _file_chunks(spool: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(spool.read, CHUNK_SIZE):
        yield chunk
