"""Blob garbage collection: remove the blobs no message references, safely while mail flows.

Blobs are content-addressed, so new mail may reuse a blob that no message references
any more; a collection must never remove a blob that a message references, or will
reference once its write commits. The rule that makes it safe:

- Every writer stores (`put`) the blobs of a message right before committing the
  message, and a `put` of bytes already stored refreshes the blob's time
  (`DiskBlobStore.refresh`). The grace period (`grace_s`, a day by default) must exceed
  the longest time between such a put and the commit of the message that references
  the blob (the MTA's delivery attempts, an upload's SEND: seconds).
- A collection started at time T treats as candidates only blobs whose time is before
  T - grace_s, then reads every reference committed in the store (`referenced`, called
  after T). A message committed before T is in that set. One committed after T had its
  blob put or refreshed after T - grace_s, so that blob's time is no longer before the
  cut-off: it is not a candidate, or its refresh is seen at removal.
- Removal re-checks the time atomically (`DiskBlobStore.remove_if_stale`: the file is
  renamed aside, then its time checked): a refresh before the rename keeps the blob,
  one after it finds no file and writes the blob anew.

A blob removed is gone for good; a `dry_run` reports what would be removed and removes
nothing. One collection runs at a time per blob folder (a lock file). The HBase blob
engine has no collection yet.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pyserver.blobs.disk import DiskBlobStore

__all__ = ["DEFAULT_GRACE_S", "GcReport", "collect_garbage"]

# Longer than any put-to-commit gap of a writer; see the module docstring.
DEFAULT_GRACE_S = 86_400.0

# Every blob ref a committed message references (read after the collection started).
Referenced = Callable[[], Awaitable[set[str]]]


@dataclass
class GcReport:
    """What one collection found and did."""

    dry_run: bool
    grace_s: float
    blobs: int = 0  # blobs stored when it started
    blob_bytes: int = 0  # their files' bytes on disk
    old: int = 0  # of those, untouched for longer than the grace period
    referenced: int = 0  # old ones still referenced by a message
    removed: int = 0  # unreferenced old ones removed (or, in a dry run, to remove)
    removed_bytes: int = 0
    refreshed: int = 0  # unreferenced old ones put again meanwhile: kept
    put_back: int = 0  # left renamed aside by a collection that died: put back
    removed_refs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def collect_garbage(
    store: DiskBlobStore,
    referenced: Referenced,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
) -> GcReport:
    """Remove the blobs of `store` older than `grace_s` that `referenced()` does not name."""
    if grace_s < 0:
        raise ValueError("grace_s must be >= 0")
    report = GcReport(dry_run=dry_run, grace_s=grace_s)
    with store.gc_lock():
        started = time.time()
        cutoff = started - grace_s
        if not dry_run:
            report.put_back = await store.put_back_aside()
        stored = await store.blob_times()
        report.blobs = len(stored)
        report.blob_bytes = sum(info.size for info, _ in stored)
        old = [info for info, mtime in stored if mtime < cutoff]
        report.old = len(old)
        refs = await referenced()  # every message committed before `started` is in it
        garbage = [info for info in old if info.ref not in refs]
        report.referenced = len(old) - len(garbage)
        for info in garbage:
            if dry_run or await store.remove_if_stale(info.ref, cutoff):
                report.removed += 1
                report.removed_bytes += info.size
                report.removed_refs.append(info.ref)
            else:
                report.refreshed += 1
    return report
