"""The embedded blob store: one file per blob on local disk, under the cell's data folder.

Layout: `<root>/<ref[:2]>/<ref>`. Whole bytes are written to an unnamed file in the
store's own folder under `<root>/tmp` (Linux's O_TMPFILE) and linked under their name,
which fails if the name is taken; a stream (its hash known only at its end), a copy
replacing a damaged file, or any blob where the file system has no O_TMPFILE is written
as a named temporary file there and renamed into place. Puts that finish writing at the
same moment share one durability barrier (group commit: one syncfs of the store's file
system where Linux has it, else an fsync of each file and its folder); a put returns
only once the barrier after its write has passed, so a blob a caller was told of is
whole and durable. A crash before the barrier may leave a blob file torn under its
name: its checksums show it damaged, no caller was told it was stored, and the next put
of the same bytes replaces it. A put that finds its blob already there, written but not
yet behind a barrier, waits for one too. A blob file is the blob's bytes followed by its
chunk checksums and a trailer:

    data (size bytes) | CRC32C of each CHUNK_SIZE chunk (4 bytes big-endian each) | trailer

    trailer (24 bytes): magic b"PYBLOB\\x00\\x01" | size (u64 BE) | chunk size (u32 BE)
                        | CRC32C of (checksums + magic + size + chunk size) (u32 BE)

A put of bytes already stored writes nothing but refreshes the file's time, which
garbage collection (`pyserver.blobs.gc`) reads as "in use": `remove_if_stale` renames
a blob into `<root>/gc` and checks its time again before removing it.

File work runs on the store's own thread pool (hashing and I/O release the
GIL), so the event loop never waits on the disk, and concurrent puts share the
file system's journal commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import os
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import google_crc32c

from pyserver.blobs.base import (
    CHUNK_SIZE,
    BlobCorrupt,
    BlobInfo,
    BlobNotFound,
    BlobSource,
    BlobStore,
    check_range,
    check_ref,
    is_ref,
    pieces_of,
)
from pyserver.errors import Unavailable

__all__ = ["DiskBlobStore"]

T = TypeVar("T")

_MAGIC = b"PYBLOB\x00\x01"
_TRAILER = struct.Struct(">8sQII")
# Pieces handed to a writer thread at once: small pieces of a stream are gathered first.
_WRITE_BATCH = 1 << 20
# Whole blobs at most this big are written on the event loop's thread (no fsync there:
# the group barrier runs in the pool); a trip to a thread costs more than the write.
_WRITE_HERE = 64 << 10
# Chunks read per trip to a thread.
_READ_CHUNKS = 4
# Temporary files older than this are leftovers of a crash (another process may be writing).
_STALE_TMP_S = 3600.0


def _chunks_of(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


class _BlobFile:
    """An open blob file whose trailer and checksum table have been checked."""

    __slots__ = ("chunk_size", "crcs", "fd", "ref", "size")

    def __init__(self, ref: str, fd: int, size: int, chunk_size: int, crcs: list[int]) -> None:
        self.ref = ref
        self.fd = fd
        self.size = size
        self.chunk_size = chunk_size
        self.crcs = crcs

    @classmethod
    def open(cls, path: Path, ref: str) -> _BlobFile:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {ref}") from None
        try:
            length = os.fstat(fd).st_size
            if length < _TRAILER.size:
                raise BlobCorrupt(f"blob {ref}: file of {length} bytes has no trailer")
            trailer = os.pread(fd, _TRAILER.size, length - _TRAILER.size)
            magic, size, chunk_size, table_crc = _TRAILER.unpack(trailer)
            if magic != _MAGIC or chunk_size == 0:
                raise BlobCorrupt(f"blob {ref}: bad trailer")
            count = _chunks_of(size, chunk_size)
            if length != size + 4 * count + _TRAILER.size:
                raise BlobCorrupt(f"blob {ref}: file is {length} bytes, its trailer says otherwise")
            table = os.pread(fd, 4 * count, size)
            if google_crc32c.value(table + trailer[:-4]) != table_crc:
                raise BlobCorrupt(f"blob {ref}: checksum table does not match its checksum")
            crcs = list(struct.unpack(f">{count}I", table))
        except BaseException:
            os.close(fd)
            raise
        return cls(ref, fd, size, chunk_size, crcs)

    def read_chunks(self, first: int, count: int, digest: Any | None) -> list[bytes]:
        """Chunks first .. first+count-1, each checked against its CRC32C."""
        start = first * self.chunk_size
        end = min(self.size, (first + count) * self.chunk_size)
        data = os.pread(self.fd, end - start, start)
        if len(data) != end - start:
            raise BlobCorrupt(f"blob {self.ref}: short read at offset {start}")
        chunks = []
        for index in range(first, first + count):
            low = (index - first) * self.chunk_size
            chunk = data[low : low + self.chunk_size] if count > 1 else data
            if google_crc32c.value(chunk) != self.crcs[index]:
                raise BlobCorrupt(f"blob {self.ref}: chunk {index} does not match its checksum")
            if digest is not None:
                digest.update(chunk)
            chunks.append(chunk)
        return chunks

    def close(self) -> None:
        os.close(self.fd)


class _Writer:
    """A blob being written to a temporary file (used from one thread at a time)."""

    def __init__(self, store: DiskBlobStore) -> None:
        self._store = store
        fd, name = _mkstemp(store.tmp_dir)
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self._crcs: list[int] = []
        self._chunk_crc = 0
        self._chunk_fill = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self._digest.update(data)
        self._file.write(data)
        self.size += len(data)
        chunk_size = CHUNK_SIZE
        pos = 0
        while pos < len(data):
            take = min(chunk_size - self._chunk_fill, len(data) - pos)
            piece = data if take == len(data) else data[pos : pos + take]
            self._chunk_crc = google_crc32c.extend(self._chunk_crc, piece)
            self._chunk_fill += take
            pos += take
            if self._chunk_fill == chunk_size:
                self._crcs.append(self._chunk_crc)
                self._chunk_crc = self._chunk_fill = 0

    def finish(self, sync: bool = True) -> BlobInfo:
        """Make the blob durable under its ref (or drop it if that ref is stored already).
        `sync=False`: renamed into place without an fsync; the caller makes it durable."""
        if self._chunk_fill:
            self._crcs.append(self._chunk_crc)
        ref = self._digest.hexdigest()
        info = BlobInfo(ref, self.size)
        final = self._store.path_of(ref)
        if self._store.holds(final, self.size) and self._store.refresh(final):
            self.abort()
            return info
        self._file.write(_checksums(self._crcs, self.size))
        self._file.flush()
        if self._store.durable and sync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._store.ensure_dir(final.parent)
        if not sync:
            self._store.mark_unsynced(final)  # before the name shows: see `is_unsynced`
        os.replace(self._path, final)
        if self._store.durable and sync:
            _fsync_dir(final.parent)
        return info

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._path.unlink()


def _checksums(crcs: list[int], size: int) -> bytes:
    """What follows a blob's bytes in its file: its chunks' checksums and the trailer."""
    table = struct.pack(f">{len(crcs)}I", *crcs)
    head = _TRAILER.pack(_MAGIC, size, CHUNK_SIZE, 0)[:-4]
    return table + head + struct.pack(">I", google_crc32c.value(table + head))


def _crcs_of(data: bytes) -> list[int]:
    """The CRC32C of each CHUNK_SIZE chunk of `data`."""
    if len(data) <= CHUNK_SIZE:
        return [google_crc32c.value(data)] if data else []
    return [google_crc32c.value(data[low : low + CHUNK_SIZE])
            for low in range(0, len(data), CHUNK_SIZE)]  # fmt: skip


def _write_out(fd: int, pieces: list[bytes]) -> None:
    """Write `pieces` to `fd` in order, all of them (one writev, as a rule)."""
    left = sum(len(piece) for piece in pieces)
    while left:
        written = os.writev(fd, pieces)
        left -= written
        while pieces and written >= len(pieces[0]):
            written -= len(pieces[0])
            pieces = pieces[1:]
        if written:
            pieces = [pieces[0][written:], *pieces[1:]]


def _settle(waiters: list[tuple[Path, asyncio.Future[None]]], error: Exception | None) -> None:
    """Wake the puts waiting for a barrier: with `error` if it failed."""
    for _, future in waiters:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


_tmp_names = itertools.count()


def _mkstemp(folder: Path) -> tuple[int, str]:
    """A new temporary file of this process (tempfile.mkstemp's random names cost more)."""
    while True:
        name = str(folder / f"blob-{next(_tmp_names)}.tmp")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), name
        except FileExistsError:
            continue
        except FileNotFoundError:  # removed as a leftover after an hour unused
            folder.mkdir(parents=True, exist_ok=True)


def _open_unnamed(folder: Path) -> int:
    """A new file without a name, its inode placed by `folder` (Linux's O_TMPFILE): it
    vanishes when closed unless linked under a name (`/proc/self/fd/<fd>`)."""
    while True:
        try:
            return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600)
        except FileNotFoundError:  # removed as a leftover after an hour unused
            folder.mkdir(parents=True, exist_ok=True)


_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def _link_unnamed(fd: int, path: Path) -> None:
    """Give the unnamed file open as `fd` the name `path`; FileExistsError if it is taken.
    (linkat of /proc/self/fd/<fd>, following that link: Python's os.link calls link(),
    which does not.)"""
    if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD,
                    os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:  # fmt: skip
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))


def _links_unnamed(folder: Path) -> bool:
    """Whether this system makes unnamed files in `folder` and links them under a name
    (Linux, O_TMPFILE on this file system, /proc mounted)."""
    if _libc is None or not hasattr(os, "O_TMPFILE"):
        return False
    try:
        fd = _open_unnamed(folder)
    except OSError:
        return False
    probe = folder / f"probe-{secrets.token_hex(4)}"
    try:
        _link_unnamed(fd, probe)
    except OSError:
        return False
    finally:
        os.close(fd)
    probe.unlink()
    return True


def _sync_file_system(folder: Path, files: list[Path]) -> None:
    """Make `files` (and their names in their folders) durable: one syncfs of the file
    system holding `folder` where Linux has it, else an fsync of each and its folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _libc is not None and _libc.syncfs(fd) == 0:
            return
    finally:
        os.close(fd)
    for file in files:
        with open(file, "rb") as written:
            os.fsync(written.fileno())
    for parent in {file.parent for file in files}:
        _fsync_dir(parent)


# ext4's inode flag "top of a directory hierarchy" (chattr +T), and its ioctls
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def _mark_top_dir(folder: Path) -> None:
    """Mark `folder` as the top of a directory hierarchy (ext4's chattr +T), so folders
    made in it later (each store's temporary folder) are placed among the file system's
    block groups like top-level ones, and the files made in them get their inodes
    there. (The fan-out folders stay beside the root: spread, a barrier's syncfs
    wrote more scattered metadata.) Else they share the block group of the folder
    above the store, and on an ext4 without a journal, creating a file skips every
    inode freed in the last minutes near it (the kernel's `recently_deleted`): where
    other programs create and delete many files (a shared /tmp), one blob file's
    creation cost 0.6-0.8 ms of CPU, against 0.03 ms in a quieter group. Best effort:
    other file systems lack the flag."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(4)))[0]
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
    except OSError:
        pass  # not ext2/3/4, or not allowed: the folders are placed as usual
    finally:
        os.close(fd)


def _load_libc() -> Any:
    """The C library, if it has syncfs (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "syncfs") else None


_libc = _load_libc()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskBlobStore(BlobStore):
    """Blobs as files under `root` (see the module docstring).

    `durable=False` skips the fsyncs (tests, bulk loads); `workers` sizes the
    thread pool doing the file work.
    """

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = True, workers: int = 16):
        self.root = Path(root)
        # This store's own temporary folder, made at open (see `_mark_top_dir`)
        self.tmp_dir = self.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.durable = durable
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._dirs: set[Path] = set()
        # Blob files renamed into place but not yet behind a durability barrier.
        self._unsynced: set[Path] = set()
        self._unsynced_lock = threading.Lock()
        # The group commit: puts waiting for the next barrier, and whether one runs.
        self._waiting: list[tuple[Path, asyncio.Future[None]]] = []
        self._syncer: asyncio.Task[None] | None = None
        # whole bytes are written unnamed and linked into place (`_put_bytes`); else
        # as a named temporary file renamed into place (found at open)
        self._link_unnamed = False

    # ---- lifecycle ----

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="blob-disk")
        await self._run(self._prepare)

    def _prepare(self) -> None:
        temporary = self.tmp_dir.parent
        temporary.mkdir(parents=True, exist_ok=True)
        _mark_top_dir(temporary)  # before the store's folder is made in it
        cutoff = time.time() - _STALE_TMP_S
        for leftover in temporary.iterdir():  # other stores' folders, and files of old
            with contextlib.suppress(OSError):
                if leftover.is_dir():
                    idle = leftover.stat().st_mtime < cutoff  # nothing made in it for long
                    for file in leftover.iterdir():
                        if file.stat().st_mtime < cutoff:
                            file.unlink()
                    if idle:  # only if empty; an open store's next write makes it anew
                        leftover.rmdir()
                elif leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
        self.tmp_dir.mkdir(exist_ok=True)
        self._link_unnamed = _links_unnamed(self.tmp_dir)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True)
            with contextlib.suppress(OSError):  # empty unless a write was cut short
                self.tmp_dir.rmdir()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise Unavailable(f"the blob store {self.root} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except OSError as exc:
            raise self._unavailable(exc) from exc

    def _run_here(self, fn: Callable[..., T], *args: Any) -> T:
        """`_run` on the event loop's own thread: for file work too small to be worth a
        trip to the pool (no fsync: the page cache takes it at once)."""
        if self._pool is None:
            raise Unavailable(f"the blob store {self.root} is not open")
        try:
            return fn(*args)
        except OSError as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: OSError) -> Unavailable:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # The half-written blob was removed; puts work again once space is freed.
            return Unavailable(
                f"blob store {self.root}: the disk is full (no space left); "
                "writes are refused until space is freed"
            )
        return Unavailable(f"blob store {self.root}: {exc}")

    # ---- paths (called from the pool's threads too) ----

    def path_of(self, ref: str) -> Path:
        return self.root / ref[:2] / ref

    def ensure_dir(self, folder: Path) -> None:
        if folder in self._dirs:
            return
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            if self.durable:
                _fsync_dir(folder.parent)
        self._dirs.add(folder)

    def mark_unsynced(self, path: Path) -> None:
        """`path` is about to be renamed into place without a barrier of its own."""
        if self.durable:
            with self._unsynced_lock:
                self._unsynced.add(path)

    def is_unsynced(self, path: Path) -> bool:
        """Whether the blob file at `path` may not be durable yet. A writer marks a path
        before renaming it into place and unmarks it after a barrier, so a put that found
        the file there and then sees it unmarked knows it is durable."""
        with self._unsynced_lock:
            return path in self._unsynced

    def _sync(self, paths: list[Path]) -> None:
        """The durability barrier for `paths` (renamed into place): then they are unmarked."""
        _sync_file_system(self.root, paths)
        with self._unsynced_lock:
            self._unsynced.difference_update(paths)

    def _made_durable(self, path: Path) -> asyncio.Future[None]:
        """A future done once the blob file at `path` is durable: at once if it is
        already, else after the next group barrier (puts arriving while one runs share
        the next)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.is_unsynced(path):
            future.set_result(None)
            return future
        self._waiting.append((path, future))
        if self._syncer is None:
            self._syncer = asyncio.ensure_future(self._sync_waiting())
        return future

    async def _sync_waiting(self) -> None:
        """Run barriers while puts wait for one; each barrier serves all that waited."""
        batch: list[tuple[Path, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                paths = list(dict.fromkeys(path for path, _ in batch))
                try:
                    await self._run(self._sync, paths)
                except Unavailable as exc:  # every waiter of this barrier is told
                    _settle(batch, exc)
                else:
                    _settle(batch, None)
        finally:
            self._syncer = None
            _settle(batch + self._waiting, Unavailable(f"blob store {self.root}: closed"))
            self._waiting = []

    def holds(self, path: Path, size: int) -> bool:
        """Whether a sound-looking blob file of `size` bytes is at `path` (deduplication)."""
        try:
            blob = _BlobFile.open(path, path.name)
        except (BlobNotFound, BlobCorrupt):
            return False  # absent, or damaged: the new copy replaces it
        blob.close()
        return blob.size == size

    def refresh(self, path: Path) -> bool:
        """Mark a stored blob as just written (its file's time is now), so a garbage
        collection running now keeps it; False if it is gone (then it is written anew)."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    # ---- garbage collection (pyserver.blobs.gc runs it) ----

    @property
    def gc_dir(self) -> Path:
        """Where a blob being removed waits for its last check."""
        return self.root / "gc"

    @contextlib.contextmanager
    def gc_lock(self) -> Iterator[None]:
        """Held by one garbage collection of this folder at a time (any process)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "gc.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Unavailable(
                    f"another blob garbage collection of {self.root} is running"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    async def blob_times(self) -> list[tuple[BlobInfo, float]]:
        """Every stored blob (its ref and file size) with its file's time (seconds)."""
        return await self._run(self._blob_times)

    def _blob_times(self) -> list[tuple[BlobInfo, float]]:
        found = []
        for folder in self.root.iterdir():
            if len(folder.name) != 2 or not folder.is_dir():
                continue  # tmp, gc, gc.lock
            for path in folder.iterdir():
                if not is_ref(path.name) or path.name[:2] != folder.name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    status = path.stat()
                    found.append((BlobInfo(path.name, status.st_size), status.st_mtime))
        return found

    async def remove_if_stale(self, ref: str, before: float) -> bool:
        """Remove the blob if its time is still before `before` (seconds); whether it was.

        A put of the same bytes refreshes the time (`refresh`). The blob is first renamed
        aside, then its time checked again: a refresh that came before the rename shows
        and the blob is put back; one after it finds no file and writes the blob anew.
        So a blob refreshed at any moment is never lost.
        """
        check_ref(ref)
        return await self._run(self._remove_if_stale, ref, before)

    def _remove_if_stale(self, ref: str, before: float) -> bool:
        path = self.path_of(ref)
        try:
            if path.stat().st_mtime >= before:
                return False
        except FileNotFoundError:
            return False
        self.gc_dir.mkdir(exist_ok=True)
        aside = self.gc_dir / f"{ref}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        if aside.stat().st_mtime >= before:  # refreshed just before the rename
            self._put_back(aside, path)
            return False
        # No fsync: a removal a crash undoes leaves garbage for the next collection.
        aside.unlink()
        return True

    def _put_back(self, aside: Path, path: Path) -> None:
        with contextlib.suppress(FileExistsError):  # written anew meanwhile: same bytes
            os.link(aside, path)
        if self.durable:  # the blob is back for good before its other name goes
            _fsync_dir(path.parent)
        aside.unlink()

    async def put_back_aside(self) -> int:
        """Put back blobs a collection that died left renamed aside; how many."""
        return await self._run(self._put_back_aside)

    def _put_back_aside(self) -> int:
        if not self.gc_dir.is_dir():
            return 0
        count = 0
        for aside in self.gc_dir.iterdir():
            ref = aside.name.split(".", 1)[0]
            if is_ref(ref):
                self.ensure_dir(self.path_of(ref).parent)
                self._put_back(aside, self.path_of(ref))
                count += 1
        return count

    # ---- writing ----

    async def put(self, source: BlobSource) -> BlobInfo:
        info, durable = await self.put_unsynced(source)
        await durable
        return info

    async def put_unsynced(self, source: BlobSource) -> tuple[BlobInfo, asyncio.Future[None]]:
        """The blob renamed into place; its future is done after the next group barrier
        (joined at once)."""
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            if len(data) <= _WRITE_HERE:
                info = self._run_here(self._put_bytes, data)
            else:
                info = await self._run(self._put_bytes, data)
        else:
            info = await self._put_stream(source)
        return info, self._made_durable(self.path_of(info.ref))

    async def _put_stream(self, source: BlobSource) -> BlobInfo:
        writer = await self._run(_Writer, self)
        try:
            batch: list[bytes] = []
            batched = 0
            async for piece in _pieces(source):
                batch.append(piece)
                batched += len(piece)
                if batched >= _WRITE_BATCH:
                    await self._run(_write_all, writer, batch)
                    batch, batched = [], 0
            if batch:
                await self._run(_write_all, writer, batch)
            return await self._run(writer.finish, False)
        except BaseException:
            writer.abort()
            raise

    async def put_all(self, blobs: Sequence[bytes]) -> list[BlobInfo]:
        """Store many whole blobs behind one durability barrier (a bulk load: an import).

        Each is written as `put` writes whole bytes, without a barrier of its own, then
        one syncfs of the store's file system makes them all durable (and any of them
        another put wrote and left waiting for a barrier) before this returns (an fsync
        of each where there is no syncfs). A crash before
        that may leave a blob torn: its checksums show it damaged, the next put of it
        replaces it, and no caller was told it was stored."""
        return await self._run(self._put_all, [bytes(blob) for blob in blobs])

    def _put_all(self, blobs: list[bytes]) -> list[BlobInfo]:
        infos: list[BlobInfo] = []
        waiting: dict[Path, None] = {}
        for data in blobs:
            info = self._put_bytes(data)
            infos.append(info)
            path = self.path_of(info.ref)
            if self.is_unsynced(path):  # written now, or by another put not yet synced
                waiting[path] = None
        if waiting and self.durable:
            self._sync(list(waiting))
        return infos

    def _put_bytes(self, data: bytes) -> BlobInfo:
        # Whole bytes: hashed first, written to an unnamed file in the store's temporary
        # folder, then linked under their name, which shows only a whole file and fails
        # if the name is taken (no look first, no rename: for a small mail's raw, those
        # were a third of the proxy's event loop). Not behind a barrier: `put` waits for
        # the group's.
        digest = hashlib.sha256(data)
        ref = digest.hexdigest()
        info = BlobInfo(ref, len(data))
        path = self.path_of(ref)
        written = [data, _checksums(_crcs_of(data), len(data))]
        if not self._link_unnamed:
            if not (self.holds(path, len(data)) and self.refresh(path)):
                self._write_named(path, written)
            return info
        fd = _open_unnamed(self.tmp_dir)
        try:
            _write_out(fd, written)
            self.ensure_dir(path.parent)
            linked = self._link_marked(fd, path)
            # not linked: the name holds the blob already, or a damaged copy to replace
            if not linked and not (self.holds(path, len(data)) and self.refresh(path)):
                self._write_named(path, written)
        finally:
            os.close(fd)
        return info

    def _link_marked(self, fd: int, path: Path) -> bool:
        """Link the unnamed file `fd` as `path`, marked unsynced before the name shows (see
        `is_unsynced`); False, and the mark as it was, if the name is taken. Under the
        mark's lock: a put of the same bytes on another thread sees mark and name agree."""
        if not self.durable:
            try:
                _link_unnamed(fd, path)
            except FileExistsError:
                return False
            return True
        with self._unsynced_lock:
            marked_before = path in self._unsynced
            self._unsynced.add(path)
            try:
                _link_unnamed(fd, path)
            except BaseException as exc:
                if not marked_before:
                    self._unsynced.discard(path)
                if isinstance(exc, FileExistsError):
                    return False
                raise
        return True

    def _write_named(self, path: Path, pieces: list[bytes]) -> None:
        """A blob file of `pieces` at `path`: a temporary file renamed into place (over a
        damaged copy, if one is there), so the name never shows less than a whole file."""
        fd, name = _mkstemp(self.tmp_dir)
        try:
            try:
                _write_out(fd, pieces)
            finally:
                os.close(fd)
            self.ensure_dir(path.parent)
            self.mark_unsynced(path)
            os.replace(name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise

    # ---- reading ----

    async def stat(self, ref: str) -> BlobInfo | None:
        check_ref(ref)
        try:
            blob = await self._run(_BlobFile.open, self.path_of(ref), ref)
        except BlobNotFound:
            return None
        blob.close()
        return BlobInfo(ref, blob.size)

    async def read(
        self, ref: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        check_ref(ref)
        check_range(offset, length)
        blob = await self._run(_BlobFile.open, self.path_of(ref), ref)
        try:
            end = blob.size if length is None else min(blob.size, offset + length)
            if blob.size == 0 and ref != _EMPTY_REF:
                raise BlobCorrupt(f"blob {ref}: empty, but its ref is not the empty one")
            if offset >= end:
                return
            whole = offset == 0 and end == blob.size
            digest = hashlib.sha256() if whole else None
            first, last = offset // blob.chunk_size, (end - 1) // blob.chunk_size
            held: bytes | None = None  # a whole read holds its last piece until the hash matches
            index = first
            while index <= last:
                count = min(_READ_CHUNKS, last - index + 1)
                chunks = await self._run(blob.read_chunks, index, count, digest)
                for n, chunk in enumerate(chunks, start=index):
                    base = n * blob.chunk_size
                    low, high = max(offset - base, 0), min(end - base, len(chunk))
                    piece = chunk if (low, high) == (0, len(chunk)) else chunk[low:high]
                    if held is not None:
                        yield held
                    held = piece
                index += count
            if digest is not None and digest.hexdigest() != ref:
                raise BlobCorrupt(f"blob {ref}: its bytes do not hash to its ref")
            if held is not None:
                yield held
        finally:
            blob.close()


_EMPTY_REF = hashlib.sha256(b"").hexdigest()


def _write_all(writer: _Writer, pieces: list[bytes]) -> None:
    for piece in pieces:
        writer.write(piece)


async def _pieces(source: BlobSource) -> AsyncIterator[bytes]:
    async for piece in pieces_of(source):
        if piece:
            yield bytes(piece) if not isinstance(piece, bytes) else piece
