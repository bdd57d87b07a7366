"""Attachment files of an import stored in the blob store a group of users at a time.

The import reads a group of users, then writes their batches; their
attachments need only be durable before those batches are. `Attachments.add`
gives an attachment's ref at once (`ref_of`: every blob store names a blob by
its SHA-256) and keeps its bytes; `flush`, called before a group is written,
stores what was kept: on the embedded store behind one durability barrier
(`DiskBlobStore.put_all`) instead of an fsync per file, on a cluster's (HBase)
many puts in flight at once instead of one after another while the group is
read. A file given again (every copy of a JSON line names the same file) is
read and stored once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pyserver.blobs.base import BlobInfo, BlobStore, ref_of
from pyserver.blobs.disk import DiskBlobStore

__all__ = ["Attachments"]

# bytes kept before they are stored anyway (a group with big attachments)
_MAX_KEPT_BYTES = 64 << 20
# files remembered as stored, at the most
_MAX_FILES = 100_000
# puts in flight at once into a blob store that is not the embedded one
_PUTS_AT_ONCE = 16


class Attachments:
    """See the module docstring."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._kept: dict[str, bytes] = {}
        self._kept_bytes = 0
        self._files: dict[str, BlobInfo] = {}
        # one flush at a time: a flush returns once everything kept before it is durable
        self._flushing = asyncio.Lock()

    async def add_file(self, file: Path) -> BlobInfo:
        """The blob of an attachment file (OSError if it cannot be read)."""
        key = str(file)
        info = self._files.get(key)
        if info is None:
            info = await self.add(file.read_bytes())
            if len(self._files) >= _MAX_FILES:
                self._files.clear()
            self._files[key] = info
        return info

    async def add(self, data: bytes) -> BlobInfo:
        """The blob of these bytes: stored now, or kept until the next `flush`."""
        ref = ref_of(data)
        if ref not in self._kept:
            self._kept[ref] = data
            self._kept_bytes += len(data)
            if self._kept_bytes >= _MAX_KEPT_BYTES:
                await self.flush()
        return BlobInfo(ref, len(data))

    async def flush(self) -> None:
        """Everything added so far durable in the blob store."""
        async with self._flushing:
            if not self._kept:
                return
            kept = list(self._kept.values())
            self._kept.clear()
            self._kept_bytes = 0
            if isinstance(self._blobs, DiskBlobStore):
                await self._blobs.put_all(kept)
                return
            for start in range(0, len(kept), _PUTS_AT_ONCE):
                await asyncio.gather(
                    *(self._blobs.put(data) for data in kept[start : start + _PUTS_AT_ONCE])
                )
