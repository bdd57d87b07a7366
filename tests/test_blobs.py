"""The blob store and GET_BLOB: content addressing, deduplication, ranges, corruption, streaming,
and who may read a blob.

The store contract runs against every engine: the embedded one on disk always, the
HBase one where HBase runs (the `hbase_thrift` fixture). GET_BLOB runs through the
mailbox, and end to end through a real app server and client for both implementations.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import os
import random
import tracemalloc
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyserver import implementation
from pyserver.app.auth import make_user_token
from pyserver.app.dispatcher import Dispatcher
from pyserver.app.server import AppServer
from pyserver.blobs import CHUNK_SIZE, BlobCorrupt, BlobNotFound, BlobStore, DiskBlobStore
from pyserver.blobs.access import MAX_RANGE
from pyserver.client import Client
from pyserver.errors import BadRequest, Forbidden, NotFound, Unavailable
from pyserver.pure import frame as pure_frame
from pyserver.wire.ops import Op
from tests import support
from tests.conftest import implementation_params
from tests.support.cells import InProcessCell

KEY = "blob-test-service-key-0123456789"


run = partial(support.run, timeout=30.0, new_loop=asyncio.new_event_loop)


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def pieces(data: bytes, step: int) -> AsyncIterator[bytes]:
    for low in range(0, len(data), step):
        yield data[low : low + step]


async def collect(store: BlobStore, ref: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([piece async for piece in store.read(ref, offset, length)])


# ---- the engines ----


def _disk(tmp_path: Path) -> BlobStore:
    return DiskBlobStore(tmp_path / "blobs", durable=False)


def _hbase(request: pytest.FixtureRequest) -> BlobStore:
    host, port = request.getfixturevalue("hbase_thrift")
    from pyserver.blobs.hbase import HBaseBlobStore

    return HBaseBlobStore(host, port, namespace="pyservertest")


@pytest.fixture(params=["disk", "hbase"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], BlobStore]:
    """A factory of (not yet opened) stores of one engine, all over the same data."""
    if request.param == "disk":
        return lambda: _disk(tmp_path)
    store = _hbase(request)
    return lambda: store


async def opened(make: Callable[[], BlobStore]) -> BlobStore:
    store = make()
    await store.open()
    return store


def test_put_names_a_blob_by_its_sha256_and_reads_it_back(make_store: Any) -> None:
    async def scenario() -> None:
        store = await opened(make_store)
        try:
            data = data_of(CHUNK_SIZE * 2 + 12345)
            info = await store.put(data)
            assert info.ref == hashlib.sha256(data).hexdigest()
            assert info.size == len(data)
            assert await store.stat(info.ref) == info
            assert await collect(store, info.ref) == data
            assert await store.get(info.ref, 10, 20) == data[10:30]
        finally:
            await store.close()

    run(scenario)


def test_the_same_bytes_are_stored_once_however_they_arrive(make_store: Any) -> None:
    async def scenario() -> None:
        store = await opened(make_store)
        try:
            data = data_of(CHUNK_SIZE + 999, seed=2)
            whole = await store.put(data)
            streamed = await store.put(pieces(data, 7777))
            listed = await store.put([data[:100], data[100:]])
            racing = await asyncio.gather(*(store.put(pieces(data, 50_000)) for _ in range(5)))
            assert whole == streamed == listed == racing[0] == racing[-1]
            assert await collect(store, whole.ref) == data
            if isinstance(store, DiskBlobStore):
                files = [p for p in store.root.rglob("*") if p.is_file()]
                assert [p.name for p in files] == [whole.ref], "one file, no temporary left"
        finally:
            await store.close()

    run(scenario)


def test_the_empty_blob(make_store: Any) -> None:
    async def scenario() -> None:
        store = await opened(make_store)
        try:
            info = await store.put(b"")
            assert (info.ref, info.size) == (hashlib.sha256(b"").hexdigest(), 0)
            assert await collect(store, info.ref) == b""
            assert await store.get(info.ref, 0, 10) == b""
        finally:
            await store.close()

    run(scenario)


def test_a_missing_blob_and_a_bad_ref(make_store: Any) -> None:
    async def scenario() -> None:
        store = await opened(make_store)
        try:
            missing = "ab" * 32
            assert await store.stat(missing) is None
            with pytest.raises(BlobNotFound):
                await collect(store, missing)
            for bad in ("AB" * 32, "ab" * 31, "../../etc/passwd", ""):
                with pytest.raises(BadRequest):
                    await store.stat(bad)
                with pytest.raises(BadRequest):
                    await collect(store, bad)
            info = await store.put(b"abc")
            with pytest.raises(BadRequest):
                await collect(store, info.ref, -1)
        finally:
            await store.close()

    run(scenario)


def test_a_failed_stream_stores_nothing(make_store: Any) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise OSError("the sender went away")

    async def scenario() -> None:
        store = await opened(make_store)
        try:
            with pytest.raises(OSError, match="went away"):
                await store.put(broken())
            assert await store.stat(hashlib.sha256(b"x" * 100_000).hexdigest()) is None
            if isinstance(store, DiskBlobStore):
                assert not [p for p in store.root.rglob("*") if p.is_file()]
        finally:
            await store.close()

    run(scenario)


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed-linked", "named-renamed"])
def test_whole_bytes_that_could_not_be_written_leave_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    """A write of whole bytes that fails (the disk full) leaves nothing under the blob's
    name and nothing in the temporary folder, and a later put stores the blob whole;
    both ways of writing them (unnamed then linked, or named then renamed)."""
    from pyserver.blobs import disk

    data = data_of(900, seed=11)
    real_write_out = disk._write_out

    def disk_full(fd: int, pieces: list[bytes]) -> None:
        os.write(fd, pieces[0][:100])  # torn: part of the bytes, then no space
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "blobs", durable=True)
        await store.open()
        assert store._link_unnamed, "this machine's file system has O_TMPFILE"
        store._link_unnamed = unnamed
        try:
            path = store.path_of(hashlib.sha256(data).hexdigest())
            monkeypatch.setattr(disk, "_write_out", disk_full)
            with pytest.raises(Unavailable, match="disk is full"):
                await store.put(data)
            assert not path.exists() and not store.is_unsynced(path)
            assert not list(store.tmp_dir.iterdir())
            monkeypatch.setattr(disk, "_write_out", real_write_out)
            assert (await store.put(data)).ref == path.name
            assert await collect(store, path.name) == data
            assert not list(store.tmp_dir.iterdir())
        finally:
            await store.close()

    run(scenario)


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed-linked", "named-renamed"])
def test_whole_bytes_put_again_find_their_file_or_mend_it(tmp_path: Path, unnamed: bool) -> None:
    """A put of whole bytes already stored keeps the file (its time refreshed); one whose
    file is damaged, or torn under its name by a crash, writes it whole again."""

    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "blobs", durable=True)
        await store.open()
        store._link_unnamed = unnamed
        try:
            data = data_of(900, seed=13)
            info = await store.put(data)
            path = store.path_of(info.ref)
            inode = path.stat().st_ino
            os.utime(path, (1, 1))
            assert await store.put(data) == info
            assert path.stat().st_ino == inode and path.stat().st_mtime > 1
            for damaged in (path.read_bytes()[:100], b""):
                path.write_bytes(damaged)
                assert await store.put(data) == info
                assert await collect(store, info.ref) == data
            assert not list(store.tmp_dir.iterdir())
        finally:
            await store.close()

    run(scenario)


# One blob of a bit over three chunks, read in random ranges against the bytes themselves.
_RANGED = data_of(CHUNK_SIZE * 3 + 4321, seed=3)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    offset=st.integers(0, len(_RANGED) + 10),
    length=st.one_of(st.none(), st.integers(0, len(_RANGED) + 10)),
)
def test_any_range_reads_the_bytes_of_that_range(tmp_path: Path, offset: int, length: int | None):
    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "ranged", durable=False)
        await store.open()
        try:
            info = await store.put(_RANGED)
            expected = _RANGED[offset:] if length is None else _RANGED[offset : offset + length]
            got = [piece async for piece in store.read(info.ref, offset, length)]
            assert b"".join(got) == expected
            assert all(len(piece) <= CHUNK_SIZE for piece in got)
        finally:
            await store.close()

    run(scenario)


# ---- corruption (the embedded engine's files) ----


async def _stored(tmp_path: Path, data: bytes) -> tuple[DiskBlobStore, str, Path]:
    store = DiskBlobStore(tmp_path / "blobs", durable=False)
    await store.open()
    info = await store.put(data)
    return store, info.ref, store.path_of(info.ref)


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_is_an_error_never_the_bytes(tmp_path: Path) -> None:
    data = data_of(CHUNK_SIZE * 3, seed=4)

    async def scenario() -> None:
        store, ref, path = await _stored(tmp_path, data)
        try:
            _flip(path, CHUNK_SIZE + 5)  # in the second chunk
            with pytest.raises(BlobCorrupt, match="chunk 1"):
                await collect(store, ref)
            with pytest.raises(BlobCorrupt):
                await collect(store, ref, CHUNK_SIZE + 1, 10)
            # the chunks that are sound still read
            assert await collect(store, ref, 0, 100) == data[:100]
            assert await collect(store, ref, 2 * CHUNK_SIZE, 100) == data[2 * CHUNK_SIZE :][:100]
            # a whole read yields nothing from the damaged chunk on
            got = []
            with pytest.raises(BlobCorrupt):
                async for piece in store.read(ref):
                    got.append(piece)
            assert b"".join(got) == data[: len(b"".join(got))]
            assert len(b"".join(got)) < CHUNK_SIZE + 5
        finally:
            await store.close()

    run(scenario)


@pytest.mark.parametrize("damage", ["trailer", "table", "truncated", "empty file"])
def test_a_damaged_file_is_an_error(tmp_path: Path, damage: str) -> None:
    data = data_of(CHUNK_SIZE + 10, seed=5)

    async def scenario() -> None:
        store, ref, path = await _stored(tmp_path, data)
        try:
            raw = path.read_bytes()
            if damage == "trailer":
                _flip(path, len(raw) - 10)
            elif damage == "table":
                _flip(path, len(data) + 1)
            elif damage == "truncated":
                path.write_bytes(raw[:-100])
            else:
                path.write_bytes(b"")
            with pytest.raises(BlobCorrupt):
                await collect(store, ref)
            with pytest.raises(BlobCorrupt):
                await store.stat(ref)
            # storing the bytes again repairs it
            assert (await store.put(data)).ref == ref
            assert await collect(store, ref) == data
        finally:
            await store.close()

    run(scenario)


def test_bytes_that_do_not_hash_to_the_ref_are_an_error(tmp_path: Path) -> None:
    data = data_of(CHUNK_SIZE * 2 + 1, seed=6)

    async def scenario() -> None:
        store, ref, path = await _stored(tmp_path, data)
        try:
            other = await store.put(data_of(CHUNK_SIZE * 2 + 1, seed=7))
            # a sound blob file under the wrong name: every chunk checks out, the whole does not
            path.write_bytes(store.path_of(other.ref).read_bytes())
            got = []
            with pytest.raises(BlobCorrupt, match="hash"):
                async for piece in store.read(ref):
                    got.append(piece)
            assert len(b"".join(got)) < len(data), "the last piece is held back"
        finally:
            await store.close()

    run(scenario)


def test_a_50_mb_blob_never_sits_whole_in_memory(tmp_path: Path) -> None:
    size, step = 50 << 20, 64 << 10
    block = data_of(step, seed=8)

    async def source() -> AsyncIterator[bytes]:
        for n in range(size // step):
            yield block[n % 7 :] + block[: n % 7]

    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "big", durable=False)
        await store.open()
        try:
            tracemalloc.start()
            info = await store.put(source())
            _, put_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            digest, total = hashlib.sha256(), 0
            async for piece in store.read(info.ref):
                digest.update(piece)
                total += len(piece)
            _, read_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert total == size == info.size
            assert digest.hexdigest() == info.ref
            assert put_peak < 8 << 20, f"put peaked at {put_peak} bytes"
            assert read_peak < 8 << 20, f"read peaked at {read_peak} bytes"
        finally:
            tracemalloc.stop()
            await store.close()

    run(scenario, timeout=60)


def test_durable_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "durable")
        await store.open()
        try:
            infos = await asyncio.gather(*(store.put(data_of(1000, seed=n)) for n in range(20)))
            assert not list(store.tmp_dir.iterdir())
            for n, info in enumerate(infos):
                assert await collect(store, info.ref) == data_of(1000, seed=n)
        finally:
            await store.close()

    run(scenario)


# ---- GET_BLOB through the mailbox ----


class BlobCell(InProcessCell):
    """A mailbox over SQLite with a blob store, and one mail for user 2 referencing a blob."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, blobs=True)

    async def __aenter__(self) -> BlobCell:
        await super().__aenter__()
        assert self.blobs is not None
        self.data = data_of(CHUNK_SIZE * 4 + 777, seed=9)
        self.info = await self.blobs.put(self.data)
        self.stranger_blob = await self.blobs.put(b"nobody's attachment")
        extra = {"attachments": [{"ref": self.info.ref, "name": "a.bin", "size": self.info.size}]}
        reply = await self.mailbox.execute(
            Op.DELIVER,
            {"user": 2, "sender": 0, "from": "alice@example.org", "text": "see attached",
             "channel": "email", "key": "<m1@example.org>", "extra": extra},
        )  # fmt: skip
        self.message_id = reply["message_id"]
        self.thread_id = reply["thread_id"]
        return self

    async def get(self, **payload: Any) -> dict[str, Any]:
        return await self.mailbox.execute(Op.GET_BLOB, payload)


def test_get_blob_reads_ranges_of_a_blob_the_user_received(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with BlobCell(tmp_path) as cell:
            ref, data = cell.info.ref, cell.data
            first = await cell.get(user=2, ref=ref)
            assert first["size"] == len(data) and first["offset"] == 0
            assert first["message_id"] == cell.message_id
            assert base64.b64decode(first["data"]) == data[: 256 << 10]
            assert first["eof"] is False
            tail = await cell.get(user=2, ref=ref, offset=len(data) - 5, length=100)
            assert base64.b64decode(tail["data"]) == data[-5:] and tail["eof"] is True
            hinted = await cell.get(user=2, ref=ref, offset=3, length=MAX_RANGE,
                                    message_id=cell.message_id)  # fmt: skip
            assert base64.b64decode(hinted["data"]) == data[3 : 3 + MAX_RANGE]
            end = await cell.get(user=2, ref=ref, offset=len(data))
            assert (end["data"], end["eof"]) == ("", True)

    run(scenario)


def test_get_blob_refuses_whoever_has_no_message_with_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with BlobCell(tmp_path) as cell:
            ref = cell.info.ref
            with pytest.raises(NotFound):
                await cell.get(user=3, ref=ref)  # another user
            with pytest.raises(NotFound):
                await cell.get(user=2, ref=cell.stranger_blob.ref)  # stored, not referenced
            with pytest.raises(NotFound):
                await cell.get(user=2, ref="cd" * 32)  # not stored at all
            with pytest.raises(NotFound):
                await cell.get(user=2, ref=ref, message_id="m-not-this-one")
            await cell.mailbox.execute(Op.DELETE, {"user": 2, "thread_id": cell.thread_id})
            with pytest.raises(NotFound):
                await cell.get(user=2, ref=ref)  # the message is gone, and the access with it

    run(scenario)


@pytest.mark.parametrize(
    "payload",
    [
        {"ref": "not-a-ref"},
        {"ref": None},
        {"offset": -1},
        {"offset": "0"},
        {"length": 0},
        {"length": MAX_RANGE + 1},
        {"offset": 10**9},
        {"message_id": 5},
    ],
)
def test_get_blob_bad_requests(tmp_path: Path, payload: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with BlobCell(tmp_path) as cell:
            request = {"user": 2, "ref": cell.info.ref, **payload}
            if request["ref"] is None:
                del request["ref"]
            with pytest.raises(BadRequest):
                await cell.mailbox.execute(Op.GET_BLOB, request)

    run(scenario)


# ---- GET_BLOB end to end: app server and client, both implementations ----


@pytest.fixture(params=implementation_params())
def impl(request: pytest.FixtureRequest) -> tuple[Callable[[], asyncio.AbstractEventLoop], Any]:
    if request.param == "native":
        import uvloop

        assert implementation.framecodec is not None, "the Cython frame codec is not built"
        return uvloop.new_event_loop, implementation.framecodec
    return asyncio.new_event_loop, pure_frame


def test_client_get_blob_streams_a_large_blob_over_the_wire(tmp_path: Path, impl: Any) -> None:
    new_loop, codec = impl

    async def scenario() -> None:
        async with BlobCell(tmp_path) as cell:
            server = AppServer(Dispatcher(cell.mailbox, KEY, "blob-node"), codec=codec)
            _, port = await server.start("127.0.0.1", 0)
            try:
                async with await Client.connect("127.0.0.1", port, service_key=KEY) as client:
                    got = [piece async for piece in client.get_blob(2, cell.info.ref)]
                    assert b"".join(got) == cell.data
                    assert len(got) > 2, "fetched in ranges"
                    with pytest.raises(NotFound):
                        [piece async for piece in client.get_blob(3, cell.info.ref)]
                token = make_user_token(2, 2**40, KEY)
                async with await Client.connect("127.0.0.1", port, user_token=token) as own:
                    reply = await own.get_blob_range(2, cell.info.ref, 0, 10)
                    assert base64.b64decode(reply["data"]) == cell.data[:10]
                    with pytest.raises(Forbidden):
                        await own.get_blob_range(3, cell.info.ref, 0, 10)
            finally:
                await server.stop(1.0)

    loop = new_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), 30))
    finally:
        loop.close()


def test_blob_files_live_under_the_data_folder(tmp_path: Path) -> None:
    from pyserver.blobs import blob_store_for
    from pyserver.config import Config

    store = blob_store_for(Config(data_dir=tmp_path / "cell"))
    assert isinstance(store, DiskBlobStore)
    assert store.root == tmp_path / "cell" / "blobs"
    assert os.fspath(store.tmp_dir).startswith(os.fspath(store.root))


def test_whole_bytes_and_a_stream_make_the_same_blob_file(tmp_path: Path) -> None:
    """A put of whole bytes (written in one go) and a put of the same bytes as a stream
    (through the chunked writer) leave byte-identical files, read back whole."""

    async def pieces_of_data(data: bytes) -> AsyncIterator[bytes]:
        for low in range(0, len(data), 10_000):
            yield data[low : low + 10_000]

    async def scenario() -> None:
        whole, streamed = DiskBlobStore(tmp_path / "whole"), DiskBlobStore(tmp_path / "stream")
        await whole.open()
        await streamed.open()
        try:
            for size in (0, 1, 300, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 5, 300_000):
                data = data_of(size, seed=size)
                one = await whole.put(data)
                other = await streamed.put(pieces_of_data(data))
                assert one == other
                assert whole.path_of(one.ref).read_bytes() == (
                    streamed.path_of(other.ref).read_bytes()
                )
                assert await collect(whole, one.ref) == data
        finally:
            await whole.close()
            await streamed.close()

    asyncio.run(scenario())


def test_write_out_writes_every_piece_through_partial_writes() -> None:
    import threading

    from pyserver.blobs.disk import _write_out

    reader, writer = os.pipe()  # a pipe takes 64 KiB at a time: writev writes part
    received = bytearray()

    def drain() -> None:
        while block := os.read(reader, 1 << 16):
            received.extend(block)

    thread = threading.Thread(target=drain)
    thread.start()
    pieces = [data_of(300_000, 1), b"", data_of(70_000, 2), b"end"]
    try:
        _write_out(writer, list(pieces))
    finally:
        os.close(writer)
        thread.join(30)
        os.close(reader)
    assert bytes(received) == b"".join(pieces)


def _inode_flags(folder: Path) -> int:
    """A folder's inode flags (FS_IOC_GETFLAGS), 0 where the file system has none."""
    import fcntl
    import struct

    from pyserver.blobs import disk

    fd = os.open(folder, os.O_RDONLY)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, disk._FS_IOC_GETFLAGS, bytes(4)))[0]
    except OSError:
        return 0
    finally:
        os.close(fd)


def test_each_open_store_writes_in_a_temporary_folder_of_its_own(tmp_path: Path) -> None:
    """Two stores of one folder write in folders of their own under `tmp`, removed when
    each closes; a dead store's folder is cleared once its files are an hour old (a
    live one's is kept). On ext4 `tmp` is marked top of a hierarchy."""
    import time

    from pyserver.blobs import disk

    async def scenario() -> None:
        root = tmp_path / "blobs"
        dead = root / "tmp" / "12345-deadbeef"
        dead.mkdir(parents=True)
        (dead / "blob-7.tmp").write_bytes(b"half a blob")
        old = time.time() - 2 * 3600
        os.utime(dead / "blob-7.tmp", (old, old))
        os.utime(dead, (old, old))
        live = root / "tmp" / "12346-cafebabe"
        live.mkdir()
        (live / "blob-1.tmp").write_bytes(b"being written")
        first, second = DiskBlobStore(root), DiskBlobStore(root)
        await first.open()
        await second.open()
        try:
            assert first.tmp_dir != second.tmp_dir
            assert first.tmp_dir.parent == second.tmp_dir.parent == root / "tmp"
            assert first.tmp_dir.is_dir() and second.tmp_dir.is_dir()
            assert not dead.exists(), "a dead store's stale folder is cleared"
            assert (live / "blob-1.tmp").exists(), "a live store's file is kept"
            info = await first.put(data_of(500, 1))
            assert await collect(second, info.ref) == data_of(500, 1)
            assert not list(first.tmp_dir.iterdir())
            # where this file system keeps the flag at all (ext4 does, tmpfs does not),
            # the store's tmp has it
            probe = tmp_path / "probe"
            probe.mkdir()
            disk._mark_top_dir(probe)
            if _inode_flags(probe) & disk._FS_TOPDIR_FL:
                assert _inode_flags(root / "tmp") & disk._FS_TOPDIR_FL
        finally:
            await first.close()
            await second.close()
        assert not first.tmp_dir.exists() and not second.tmp_dir.exists()

    asyncio.run(scenario())


def test_durable_puts_at_the_same_moment_share_one_barrier(tmp_path: Path) -> None:
    """Group commit: many puts waiting at once pass one barrier (not one each), none
    returns before the barrier after its rename, and a put that finds its blob renamed
    but not yet durable waits for a barrier too."""

    async def scenario() -> None:
        store = DiskBlobStore(tmp_path / "blobs", durable=True)
        await store.open()
        barriers: list[list[Path]] = []
        real_sync = store._sync

        def counting_sync(paths: list[Path]) -> None:
            # every path of this barrier is still marked unsynced until it has passed
            assert all(store.is_unsynced(path) for path in paths)
            real_sync(paths)
            barriers.append(paths)

        store._sync = counting_sync  # type: ignore[method-assign]
        try:
            blobs = [data_of(900, seed) for seed in range(40)]
            infos = await asyncio.gather(*(store.put(blob) for blob in blobs))
            assert 1 <= len(barriers) < len(blobs)
            synced = {path for paths in barriers for path in paths}
            for info, blob in zip(infos, blobs, strict=True):
                assert store.path_of(info.ref) in synced
                assert not store.is_unsynced(store.path_of(info.ref))
                assert await collect(store, info.ref) == blob
            # a blob renamed into place without a barrier (a crash-window copy): the put
            # of the same bytes finds it and still waits for a barrier before returning
            barriers.clear()
            again = data_of(700, 99)
            writer_store_path = store.path_of(hashlib.sha256(again).hexdigest())
            await store._run(partial(_write_unsynced, store, again))
            assert store.is_unsynced(writer_store_path)
            await store.put(again)
            assert barriers == [[writer_store_path]]
            assert not store.is_unsynced(writer_store_path)
            # a stored, durable blob put again passes no barrier
            await store.put(again)
            await store.put(pieces(blobs[0], 100))
            assert len(barriers) == 1
        finally:
            await store.close()

    asyncio.run(scenario())


def _write_unsynced(store: DiskBlobStore, data: bytes) -> None:
    from pyserver.blobs.disk import _Writer

    writer = _Writer(store)
    writer.write(data)
    writer.finish(sync=False)
