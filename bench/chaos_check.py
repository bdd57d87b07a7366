"""The chaos soak's checker, in the style of Jepsen's: what the clients saw against the logs.

Pure logic, no I/O: `check(history, logs, counts)` takes the history the soak's
clients recorded (`History`), every user's final log as the store holds it
once the run has quiesced (decoded entries by user, in stored order), and the
counts each user's owner answered after quiescing, and returns the report:

* `lost_writes`: an acknowledged SEND or mail missing from the log of one of its
  participants (each copy counts);
* `doubled_writes`: a write stored more than once in one log (the same sender
  and idempotency key, or the same message id, twice), acknowledged or not;
* `gaps`: a log whose sequence numbers are not 1, 2, 3, ... in order;
* `forks`: a position two histories disagree on: a MOVE acknowledged at log
  position n (its reply names it) when the log's entry n is not that move and
  the thread was not in that folder there already (a MOVE that changes nothing
  answers the position it read), or a read at position n listing a message the
  final log does not hold at or before n;
* `monotonic_violations`: a client that read a user at position n, then the
  same user at a position below n (reads are per client, in the order it made
  them);
* `stale_owner_writes`: writes acknowledged by an owner after its session had
  expired (the soak sends them straight to a stopped owner; every one must be
  refused);
* `count_mismatches`: users whose counts, as their owner answered them after
  quiescing, differ from the counts their log replays to;
* `max_unavailable_s`: per fault kind, the longest any probed user waited
  after the end of a fault before a read was served again (None: never, within
  the probe's limit).

It may import `pyserver.app.image` (replaying a log is the product's own
logic) and nothing that does I/O.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyserver.app.image import UserImage
from pyserver.errors import LogCorrupt

__all__ = [
    "AckedWrite",
    "History",
    "PositionedWrite",
    "Read",
    "Recovery",
    "check",
    "replayed_counts",
]

# How a problem is listed in the report (the first few of each kind).
_EXAMPLES = 10


@dataclass(frozen=True, slots=True)
class AckedWrite:
    """A message the system acknowledged: a SEND (`sender` a user) or a mail (`sender` 0,
    `key` its Message-ID); each participant's log must hold it exactly once."""

    sender: int
    key: str
    participants: tuple[int, ...]
    kind: str = "send"


@dataclass(frozen=True, slots=True)
class PositionedWrite:
    """A MOVE whose reply named the log position it took (`{"seq": n}`); a MOVE that
    changed nothing answers the position it read, where the thread was in `folder`."""

    user: int
    seq: int
    action: str
    thread_id: str
    folder: str


@dataclass(frozen=True, slots=True)
class Read:
    """One read by one client: the user's log position it reflected and the messages it
    listed. `order` is the client's own count of its reads."""

    client: str
    user: int
    order: int
    seq: int
    message_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Recovery:
    """After one fault ended: how long each probed user took to be served again (None:
    not within the probe's limit)."""

    fault: str
    waits_s: Mapping[int, float | None]


@dataclass(slots=True)
class History:
    writes: list[AckedWrite] = field(default_factory=list)
    positioned: list[PositionedWrite] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    # writes a stale owner acknowledged after waking (should never happen), and how many
    # such writes were tried
    stale_owner_acks: int = 0
    stale_owner_tries: int = 0
    recoveries: list[Recovery] = field(default_factory=list)


def check(
    history: History,
    logs: Mapping[int, Sequence[dict[str, Any]]],
    counts: Mapping[int, Mapping[str, Mapping[str, int]]] | None = None,
) -> dict[str, Any]:
    """The report of the module docstring; every figure is 0 (or [] ) in a correct run,
    but `max_unavailable_s`."""
    lost, doubled = _lost_and_doubled(history.writes, logs)
    gaps = _gaps(logs)
    forks = _forks(history.positioned, history.reads, logs)
    regressions = _monotonic_violations(history.reads)
    mismatches = _count_mismatches(logs, counts or {})
    unavailable = _max_unavailable(history.recoveries)
    return {
        "acknowledged_writes": len(history.writes),
        "positioned_writes": len(history.positioned),
        "reads": len(history.reads),
        "users": len(logs),
        "log_entries": sum(len(entries) for entries in logs.values()),
        "lost_writes": len(lost),
        "doubled_writes": len(doubled),
        "gaps": len(gaps),
        "forks": len(forks),
        "monotonic_violations": len(regressions),
        "stale_owner_writes": history.stale_owner_acks,
        "stale_owner_tries": history.stale_owner_tries,
        "count_mismatches": len(mismatches),
        "counts_checked": len(counts or {}),
        "max_unavailable_s": unavailable,
        "examples": {
            name: items[:_EXAMPLES]
            for name, items in (
                ("lost", lost),
                ("doubled", doubled),
                ("gaps", gaps),
                ("forks", forks),
                ("monotonic", regressions),
                ("counts", mismatches),
            )
            if items
        },
    }


def _lost_and_doubled(
    writes: Iterable[AckedWrite], logs: Mapping[int, Sequence[dict[str, Any]]]
) -> tuple[list[str], list[str]]:
    held: dict[int, Counter[tuple[int, str]]] = {}
    doubled: list[str] = []
    for user, entries in logs.items():
        added = [entry for entry in entries if entry.get("action") == "message_added"]
        by_key = Counter(
            (int(entry.get("sender", 0)), str(entry["key"])) for entry in added if entry.get("key")
        )
        by_id = Counter(str(entry.get("message_id")) for entry in added)
        held[user] = by_key
        doubled += [f"user {user}: key {k} stored {n} times" for k, n in by_key.items() if n > 1]
        doubled += [f"user {user}: message {m} stored {n} times" for m, n in by_id.items() if n > 1]
    lost: list[str] = []
    for write in writes:
        for user in write.participants:
            if held.get(user, Counter())[(write.sender, write.key)] == 0:
                lost.append(f"{write.kind} {write.sender}:{write.key} missing from user {user}")
    return lost, doubled


def _gaps(logs: Mapping[int, Sequence[dict[str, Any]]]) -> list[str]:
    gaps = []
    for user, entries in logs.items():
        seqs = [entry.get("seq") for entry in entries]
        if seqs != list(range(1, len(seqs) + 1)):
            first = next(i for i, seq in enumerate(seqs, 1) if seq != i)
            gaps.append(f"user {user}: entry {first} is at seq {seqs[first - 1]}")
    return gaps


def _forks(
    positioned: Iterable[PositionedWrite],
    reads: Iterable[Read],
    logs: Mapping[int, Sequence[dict[str, Any]]],
) -> list[str]:
    forks: list[str] = []
    by_user: dict[int, list[PositionedWrite]] = defaultdict(list)
    for write in positioned:
        by_user[write.user].append(write)
    for user, writes in by_user.items():
        forks += _positioned_forks(writes, logs.get(user, ()))
    added_at: dict[int, dict[str, int]] = defaultdict(dict)
    for user, entries in logs.items():
        for position, entry in enumerate(entries, 1):
            if entry.get("action") == "message_added":
                added_at[user].setdefault(str(entry.get("message_id")), position)
    for read in reads:
        length = len(logs.get(read.user, ()))
        if read.seq > length:
            forks.append(
                f"client {read.client} read user {read.user} at {read.seq}, "
                f"the log ends at {length}"
            )
            continue
        known = added_at[read.user]
        phantom = [m for m in read.message_ids if known.get(m, read.seq + 1) > read.seq]
        if phantom:
            forks.append(
                f"client {read.client} read user {read.user} at {read.seq} listing "
                f"{phantom[:3]}, not in the log by then"
            )
    return forks


def _positioned_forks(
    writes: list[PositionedWrite], entries: Sequence[dict[str, Any]]
) -> list[str]:
    """Each write against the user's log replayed up to its position: there, the log holds
    that very write, or (a MOVE that changed nothing) the thread was in that folder."""
    forks = []
    image = UserImage()
    for write in sorted(writes, key=lambda w: w.seq):
        if not 0 < write.seq <= len(entries):
            forks.append(
                f"user {write.user}: {write.action} of {write.thread_id} acknowledged at "
                f"{write.seq}, the log ends at {len(entries)}"
            )
            continue
        try:
            while image.seq < write.seq:
                image.apply(entries[image.seq])
        except LogCorrupt as error:  # a gap: counted as such
            forks.append(f"user {write.user}: log not replayable: {error}")
            break
        entry = entries[write.seq - 1]
        if (
            entry.get("action") == write.action
            and entry.get("thread_id") == write.thread_id
            and entry.get("folder") == write.folder
        ):
            continue
        thread = image.threads.get(write.thread_id)
        if thread is not None and thread.folder == write.folder:
            continue
        forks.append(
            f"user {write.user}: {write.action} of {write.thread_id} to {write.folder} "
            f"acknowledged at {write.seq}, the log holds {_describe(entry)} there"
        )
    return forks


def _describe(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "nothing"
    return f"{entry.get('action')} of {entry.get('thread_id')}"


def _monotonic_violations(reads: Iterable[Read]) -> list[str]:
    last: dict[tuple[str, int], Read] = {}
    violations = []
    for read in sorted(reads, key=lambda r: (r.client, r.order)):
        before = last.get((read.client, read.user))
        if before is not None and read.seq < before.seq:
            violations.append(
                f"client {read.client} read user {read.user} at {before.seq}, then at {read.seq}"
            )
        if before is None or read.seq >= before.seq:
            last[(read.client, read.user)] = read
    return violations


def replayed_counts(entries: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The counts a user's log replays to (what COUNTS must answer once writes stop)."""
    image = UserImage()
    for entry in entries:
        image.apply(entry)
    return {folder: dict(values) for folder, values in image.counts().items()}


def _count_mismatches(
    logs: Mapping[int, Sequence[dict[str, Any]]],
    counts: Mapping[int, Mapping[str, Mapping[str, int]]],
) -> list[str]:
    mismatches = []
    for user, answered in counts.items():
        expected = replayed_counts(logs.get(user, ()))
        got = {folder: dict(values) for folder, values in answered.items()}
        if _nonzero(got) != _nonzero(expected):
            mismatches.append(f"user {user}: answered {got}, the log says {expected}")
    return mismatches


def _nonzero(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Folders with a non-zero figure (a folder listed with zeros equals one not listed)."""
    return {folder: dict(values) for folder, values in counts.items() if any(values.values())}


def _max_unavailable(recoveries: Iterable[Recovery]) -> dict[str, float | None]:
    worst: dict[str, float | None] = {}
    for recovery in recoveries:
        waits = list(recovery.waits_s.values())
        value: float | None = None if any(w is None for w in waits) else max(waits, default=0.0)
        if recovery.fault in worst and worst[recovery.fault] is None:
            continue
        previous = worst.get(recovery.fault, 0.0)
        worst[recovery.fault] = None if value is None else max(value, previous or 0.0)
    return {fault: (None if v is None else round(v, 2)) for fault, v in sorted(worst.items())}
