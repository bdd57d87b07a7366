"""An import planned as units of work, one per user, and run many users at once.

A plan lists the units (a user and the sources of that user's mailbox: mbox
files, Maildirs, the user's lines of a JSON-lines file), what was rejected while
planning (a tree entry no address maps, a line that names no user) and the
addresses to register in the cell's address book. `run_import` registers the
addresses, then runs `jobs` units at a time (reading and parsing one user's
mail while another's batch is being committed: the store groups the commits of
concurrent appends), each unit read whole, written as one batch per user
(`pyserver.importer.writer`) and then marked in the checkpoint. Units the
checkpoint names are skipped: that is how an interrupted import resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyserver.blobs.base import BlobStore
from pyserver.importer import jsonl
from pyserver.importer.attachments import Attachments
from pyserver.importer.checkpoint import Checkpoint
from pyserver.importer.mail import AddressBook, MailSource, mail_record
from pyserver.importer.maildir import maildir_items
from pyserver.importer.mbox import MailItem, mbox_items
from pyserver.importer.records import ImportRecord, Rejected
from pyserver.importer.report import ImportReport
from pyserver.importer.throttle import CellProbe, Pace
from pyserver.importer.writer import UserWriter, Written
from pyserver.mta.intake import MtaSettings
from pyserver.store.base import LogStore, Store
from pyserver.userid import is_user_id

__all__ = ["ImportPlan", "Unit", "plan_jsonl", "plan_mailbox", "plan_tree", "run_import"]

# (messages read so far, messages in all) after each unit; for progress bars
Progress = Callable[[int], None]

# A group of users read and then written together closes at this many records (or at
# `jobs` users); while one group is written, the next is read.
GROUP_RECORDS = 8_000
GROUPS_AT_ONCE = 2


@dataclass(frozen=True, slots=True)
class Unit:
    """One user's share of the import: the sources of the user's mailbox."""

    user: int
    # (kind, path): kind is mbox, maildir or jsonl
    sources: tuple[tuple[str, str], ...]
    # jsonl: the (line number, byte offset) of the user's lines
    places: tuple[tuple[int, int], ...] = ()

    @property
    def key(self) -> str:
        """The unit's name in the checkpoint."""
        return f"{self.user}\t" + "\t".join(f"{kind}:{path}" for kind, path in self.sources)


@dataclass(slots=True)
class ImportPlan:
    """What an import will do (see the module docstring)."""

    units: list[Unit]
    rejected: list[Rejected] = field(default_factory=list)
    # address -> user, registered in the address book before anything is read
    addresses: dict[str, int] = field(default_factory=dict)
    # the messages to read, if known (a progress bar's total)
    total: int | None = None


def plan_mailbox(kind: str, path: Path, user: int, addresses: list[str]) -> ImportPlan:
    """One user's mbox file or Maildir; `addresses` are the user's own."""
    return ImportPlan(
        [Unit(user, ((kind, str(path.resolve())),))],
        addresses={address: user for address in addresses},
    )


def plan_tree(folder: Path, map_file: Path) -> ImportPlan:
    """A folder of mailboxes, each an mbox file or a Maildir named by its owner's address
    (an mbox may end in `.mbox`), and a CSV file of `address,user` rows saying whose."""
    addresses, rejected = _read_map(map_file)
    folded = {address.casefold(): user for address, user in addresses.items()}
    by_user: dict[int, list[tuple[str, str]]] = {}
    for entry in sorted(folder.iterdir()):
        name = entry.name.removesuffix(".mbox")
        user = folded.get(name.casefold())
        if entry.name.startswith("."):
            continue
        if user is None:
            rejected.append(Rejected(str(entry), f"no user: {name!r} is not in {map_file}"))
            continue
        kind = "maildir" if entry.is_dir() else "mbox"
        by_user.setdefault(user, []).append((kind, str(entry.resolve())))
    units = [Unit(user, tuple(sources)) for user, sources in sorted(by_user.items())]
    return ImportPlan(units, rejected, addresses)


def _read_map(map_file: Path) -> tuple[dict[str, int], list[Rejected]]:
    addresses: dict[str, int] = {}
    rejected: list[Rejected] = []
    with open(map_file, newline="", encoding="utf-8") as rows:
        for number, row in enumerate(csv.reader(rows), start=1):
            cells = [cell.strip() for cell in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if number == 1 and cells[0].lower() in ("address", "email"):
                continue  # a header row
            where = f"{map_file}:{number}"
            if len(cells) != 2 or not cells[1].isdigit() or not is_user_id(int(cells[1])):
                rejected.append(Rejected(where, "not an `address,user id` row"))
                continue
            if "@" not in cells[0] and not cells[0].startswith("+"):
                rejected.append(Rejected(where, f"{cells[0]!r} is not an address"))
                continue
            addresses[cells[0]] = int(cells[1])
    return addresses, rejected


def plan_jsonl(path: Path) -> ImportPlan:
    """A JSON-lines file of messages: a unit for every user whose mailbox it feeds."""
    owners, rejected = jsonl.scan(str(path))
    source = (("jsonl", str(path.resolve())),)
    units = [Unit(user, source, tuple(places)) for user, places in sorted(owners.items())]
    return ImportPlan(units, rejected, total=sum(len(u.places) for u in units))


class _Reader:
    """Reads units into records: what every unit's reading shares."""

    def __init__(self, store: Store, blobs: BlobStore, book: AddressBook, mta: MtaSettings) -> None:
        self.mail = MailSource(blobs, book, mta)
        self.blobs = blobs
        self.attachments = Attachments(blobs)
        self.book = book
        self._jsonl: dict[str, jsonl.JsonLinesSource] = {}

    async def read(self, unit: Unit) -> tuple[list[ImportRecord], list[Rejected]]:
        records: list[ImportRecord] = []
        rejected: list[Rejected] = []

        def keep(outcome: ImportRecord | Rejected) -> None:
            (rejected if isinstance(outcome, Rejected) else records).append(outcome)  # type: ignore[arg-type]

        for kind, path in unit.sources:
            if kind == "jsonl":
                source = self._jsonl.get(path)
                if source is None:
                    source = self._jsonl[path] = jsonl.JsonLinesSource(
                        path, self.attachments, self.book
                    )
                for where, line in source.lines(list(unit.places)):
                    keep(await source.record(unit.user, where, line))
                continue
            try:
                items = list(_mail_items(kind, path))
            except OSError as exc:
                rejected.append(Rejected(path, f"unreadable: {exc.strerror or exc}"))
                continue
            if not items and kind == "mbox" and Path(path).stat().st_size > 0:
                rejected.append(Rejected(path, "no messages: not an mbox file"))
            for item in items:
                if isinstance(item, Rejected):
                    rejected.append(item)
                    continue
                keep(
                    await mail_record(item.raw, user=unit.user, folder=item.folder,
                                      read=item.read, where=item.where,
                                      fallback_ts=item.fallback_ts, source=self.mail)
                )  # fmt: skip
        return records, rejected

    def close(self) -> None:
        for source in self._jsonl.values():
            source.close()


def _mail_items(kind: str, path: str) -> Iterator[MailItem | Rejected]:
    return mbox_items(path) if kind == "mbox" else maildir_items(path)


async def run_import(
    plan: ImportPlan,
    *,
    store: Store,
    blobs: BlobStore,
    checkpoint: Checkpoint,
    jobs: int = 8,
    mta: MtaSettings | None = None,
    progress: Progress | None = None,
    register: bool = True,
    pace: Pace | None = None,
    probe: Path | None = None,
    store_of: Callable[[int], Awaitable[LogStore]] | None = None,
) -> ImportReport:
    """Import the plan's units not yet done; the report of this run. `register`: put the
    plan's addresses in the address book first (done once, by whoever runs the plan).
    `pace`: the rate to keep, lowered while the cell serving `probe` (a data folder)
    answers slower than at rest (pyserver.importer.throttle). `store_of(user)`: the log
    store of the user's cell (a cluster, through discovery); else `store` holds every log.
    `store` is the address book either way."""
    report = ImportReport()
    for item in plan.rejected:
        report.reject(item)
    if register:
        for address, user in plan.addresses.items():
            await store.add_address(address, user)
    mta = mta or MtaSettings()
    reader = _Reader(store, blobs, AddressBook(store, mta.mail_domain, plan.addresses), mta)
    writers: dict[int, UserWriter] = {}

    async def writer_of(user: int) -> UserWriter:
        target: LogStore = store if store_of is None else await store_of(user)
        writer = writers.get(id(target))
        if writer is None:
            writer = writers[id(target)] = UserWriter(target)
        return writer

    todo = iter([unit for unit in plan.units if unit.key not in checkpoint.done])
    report.units_resumed = len(plan.units) - sum(
        1 for u in plan.units if u.key not in checkpoint.done
    )
    users = report.user_ids

    async def work() -> None:
        while True:
            group: list[tuple[Unit, list[ImportRecord], int]] = []
            count = 0
            for unit in todo:
                records, rejected = await reader.read(unit)
                for item in rejected:
                    report.reject(item)
                if pace is not None and (wait := pace.delay(len(records))) > 0:
                    await asyncio.sleep(wait)
                group.append((unit, records, len(rejected)))
                count += len(records)
                await asyncio.sleep(0)  # the group being written goes on meanwhile
                if len(group) >= jobs or count >= GROUP_RECORDS:
                    break
            if not group:
                return
            await write(group)

    async def write(group: list[tuple[Unit, list[ImportRecord], int]]) -> None:
        """The group's users written together (their attachments stored first), then each
        marked done."""
        await reader.attachments.flush()
        by_writer: dict[int, tuple[UserWriter, list[int]]] = {}
        # (in a cluster, each user's cell is asked of discovery: all at once)
        owners = await asyncio.gather(*(writer_of(unit.user) for unit, _, _ in group))
        for at, writer in enumerate(owners):
            by_writer.setdefault(id(writer), (writer, []))[1].append(at)
        written: list[Written | None] = [None] * len(group)
        outcomes = await asyncio.gather(
            *(
                writer.write_many([(group[at][0].user, group[at][1]) for at in places])
                for writer, places in by_writer.values()
            )
        )
        for (_, places), results in zip(by_writer.values(), outcomes, strict=True):
            for at, result in zip(places, results, strict=True):
                written[at] = result
        for (unit, records, rejected), result in zip(group, written, strict=True):
            assert result is not None
            checkpoint.mark(unit.key)
            users.add(unit.user)
            report.users = len(users)
            report.messages += result.added
            report.skipped_existing += result.skipped
            report.bytes += result.bytes
            if progress is not None:
                progress(len(records) + rejected)

    cell = CellProbe(probe, pace) if pace is not None and probe is not None else None
    if cell is not None and not cell.start():
        cell = None
    try:
        with _few_collections():
            async with asyncio.TaskGroup() as group:
                for _ in range(GROUPS_AT_ONCE):
                    group.create_task(work())
    except BaseExceptionGroup as failed:  # the first failure, as a plain exception
        raise failed.exceptions[0] from None
    finally:
        reader.close()
        if cell is not None:
            await cell.stop()
    if pace is not None:
        report.pace = pace.to_json()
    return report


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """The garbage collector kept from rescanning the plan: every record makes a few
    short-lived objects, and a full collection would walk every unit of a big plan."""
    gc.collect()
    gc.freeze()  # what exists now (the plan) is never scanned again
    threshold = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
