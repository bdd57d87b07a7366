"""An import's units shared among worker processes (`--workers N`): parallel across users
on every core, not only while one user's batch waits on the disk.

The parent plans and registers the addresses; each worker process gets every
N-th unit not yet done, opens the cell's store and blob store itself and runs
its share as `run_import` does in one process (`--jobs` users at once), marking
each finished unit in the same checkpoint file (appended line by line, so the
workers' lines never mix) and telling the parent, through a queue, how many
messages each unit read (the progress bar). The parent adds the workers'
reports up. A worker dies with its parent (Linux's parent-death signal), so a
killed import leaves no process behind writing; the next run resumes from the
checkpoint like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from queue import Empty
from typing import Any

from pyserver.importer.checkpoint import Checkpoint
from pyserver.importer.report import ImportReport
from pyserver.importer.run import ImportPlan, Progress, Unit, run_import
from pyserver.importer.throttle import Pace

__all__ = ["run_in_processes"]

_PR_SET_PDEATHSIG = 1
_progress_queue: Any = None


def _start_worker(queue: Any, parent: int) -> None:
    global _progress_queue
    _progress_queue = queue
    # die with the parent (Linux); elsewhere, a worker finishes its share
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died while this process was starting
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops them: Ctrl-C is its


def _share(
    units: list[Unit], data_dir: str, checkpoint_path: str, jobs: int, rate: float | None
) -> ImportReport:
    """One worker's units, run to their end: its report."""
    from pyserver.blobs import BLOB_FOLDER, DiskBlobStore
    from pyserver.store.sqlite import open_cell_store as open_store

    checkpoint = Checkpoint(Path(checkpoint_path))
    checkpoint.open()

    async def work() -> ImportReport:
        blobs = DiskBlobStore(Path(data_dir) / BLOB_FOLDER)
        await blobs.open()
        try:
            async with open_store(Path(data_dir)) as store:
                return await run_import(
                    ImportPlan(units), store=store, blobs=blobs, checkpoint=checkpoint,
                    jobs=jobs, progress=_progress_queue.put, register=False,
                    pace=Pace(rate), probe=Path(data_dir),
                )  # fmt: skip
        finally:
            await blobs.close()

    try:
        return asyncio.run(work())
    finally:
        checkpoint.close(completed=False)


def run_in_processes(
    plan: ImportPlan,
    *,
    data_dir: Path,
    checkpoint: Checkpoint,
    workers: int,
    jobs: int,
    progress: Progress | None = None,
    rate: float | None = None,
) -> ImportReport:
    """Run the plan's units not yet done in `workers` processes; the report of the whole.

    The plan's addresses must already be registered. Each worker keeps `rate / workers`
    (`rate`: messages per second, None for no limit) and backs off on its own.
    """
    report = ImportReport()
    for item in plan.rejected:
        report.reject(item)
    todo = [unit for unit in plan.units if unit.key not in checkpoint.done]
    report.units_resumed = len(plan.units) - len(todo)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    draining = True

    def drain() -> None:
        while draining or not queue.empty():
            try:
                count = queue.get(timeout=0.2)
            except Empty:
                continue
            except (OSError, ValueError):  # the queue closed under us: nothing more to count
                return
            if progress is not None:
                progress(count)

    drainer = threading.Thread(target=drain, name="import-progress", daemon=True)
    drainer.start()
    try:
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(queue, os.getpid())
        ) as pool:
            shares = [todo[start::workers] for start in range(workers)]
            futures = [
                pool.submit(
                    _share,
                    share,
                    str(data_dir),
                    str(checkpoint.path),
                    jobs,
                    rate / workers if rate else None,
                )
                for share in shares
                if share
            ]
            try:
                for future in futures:
                    report.add(future.result())
            except BaseException:  # Ctrl-C or a failed share: stop the others now
                for child in multiprocessing.active_children():
                    child.terminate()
                raise
    finally:
        draining = False
        drainer.join(timeout=5)
    return report
