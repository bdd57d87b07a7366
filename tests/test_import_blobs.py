"""Attachments of an import stored a group at a time: `DiskBlobStore.put_all` (many blobs
behind one durability barrier) and `pyserver.importer.attachments.Attachments`."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from pyserver.blobs import DiskBlobStore
from pyserver.importer.attachments import Attachments


async def _read(store: DiskBlobStore, ref: str) -> bytes:
    return b"".join([piece async for piece in store.read(ref)])


def test_put_all_stores_each_blob_once_and_in_order(tmp_path: Path) -> None:
    blobs = [os.urandom(n * 997 + 1) for n in range(25)]
    given = [*blobs, blobs[3], blobs[0]]  # the same bytes twice in one call

    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "blobs")
        await store.open()
        try:
            before = await store.put(blobs[7])  # one is stored already
            infos = await store.put_all(given)
            assert [info.ref for info in infos] == [hashlib.sha256(b).hexdigest() for b in given]
            assert [info.size for info in infos] == [len(b) for b in given]
            assert infos[7] == before
            for data, info in zip(given, infos, strict=True):
                assert await _read(store, info.ref) == data
            assert not list(store.tmp_dir.iterdir())
            assert await store.put_all([]) == []
        finally:
            await store.close()

    asyncio.run(scenario())


def test_put_all_replaces_a_torn_blob(tmp_path: Path) -> None:
    data = os.urandom(50_000)

    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "blobs")
        await store.open()
        try:
            info = await store.put(data)
            path = store.path_of(info.ref)
            path.write_bytes(path.read_bytes()[:1000])  # what a crash before the barrier leaves
            assert (await store.put_all([data]))[0] == info
            assert await _read(store, info.ref) == data
        finally:
            await store.close()

    asyncio.run(scenario())


def test_attachments_are_kept_until_a_flush_and_each_file_is_read_once(tmp_path: Path) -> None:
    file = tmp_path / "a.pdf"
    file.write_bytes(b"%PDF attachment " * 100)

    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "blobs")
        await store.open()
        try:
            attachments = Attachments(store)
            first = await attachments.add_file(file)
            assert await store.stat(first.ref) is None  # kept, not yet stored
            file.unlink()  # a second copy of the line does not read the file again
            assert await attachments.add_file(file) == first
            other = await attachments.add(b"inline bytes")
            await attachments.flush()
            assert await _read(store, first.ref) == b"%PDF attachment " * 100
            assert await _read(store, other.ref) == b"inline bytes"
        finally:
            await store.close()

    asyncio.run(scenario())


def test_concurrent_flushes_return_only_once_everything_before_them_is_stored(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "blobs")
        await store.open()
        try:
            attachments = Attachments(store)
            infos = [await attachments.add(os.urandom(20_000)) for _ in range(30)]
            first = asyncio.create_task(attachments.flush())  # takes all 30
            await asyncio.sleep(0)
            await attachments.flush()  # nothing left to take, yet it waits for the first
            for info in infos:
                assert await store.stat(info.ref) is not None
            await first
        finally:
            await store.close()

    asyncio.run(scenario())
