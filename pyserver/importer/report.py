"""The final report of an import: users, messages added and already there, bytes, rejections.

`messages` counts what this run added, `skipped_existing` what the mailboxes
had already (a second run of the same import adds nothing and counts it all
here), `rejected` the items that could not be imported, each with its reason
(the first `MAX_LISTED`; `rejected_count` has them all).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pyserver.importer.records import Rejected

__all__ = ["ImportReport"]

MAX_LISTED = 1_000


@dataclass(slots=True)
class ImportReport:
    users: int = 0
    messages: int = 0
    skipped_existing: int = 0
    bytes: int = 0
    units_resumed: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    rejected_count: int = 0
    started: float = field(default_factory=time.monotonic)
    user_ids: set[int] = field(default_factory=set)
    # the pace kept (pyserver.importer.throttle), when one was
    pace: dict[str, Any] | None = None
    # the users whose server could not be told to drop its cached image (importer.live)
    refresh_failures: list[str] = field(default_factory=list)
    _rejected_where: set[str] = field(default_factory=set)

    def reject(self, item: Rejected) -> None:
        """Count a rejection (once per item: a line several mailboxes share is one item)."""
        if item.where in self._rejected_where:
            return
        self._rejected_where.add(item.where)
        self.rejected_count += 1
        if len(self.rejected) < MAX_LISTED:
            self.rejected.append(item)

    def add(self, other: ImportReport) -> None:
        """Count in what another part of the same import did (a worker process's share)."""
        self.user_ids |= other.user_ids
        self.users = len(self.user_ids)
        self.messages += other.messages
        self.skipped_existing += other.skipped_existing
        self.bytes += other.bytes
        for item in other.rejected:
            self.reject(item)
        self.rejected_count += other.rejected_count - len(other.rejected)
        if other.pace is not None:
            if self.pace is None:
                self.pace = dict(other.pace)
            else:  # the workers' limits and back-offs add up
                for name in ("rate_limit", "rate_now", "backoffs"):
                    if self.pace.get(name) is not None and other.pace.get(name) is not None:
                        self.pace[name] += other.pace[name]

    def to_json(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "users": self.users,
            "messages": self.messages,
            "skipped_existing": self.skipped_existing,
            "bytes": self.bytes,
            "rejected": [item.to_json() for item in self.rejected],
            "rejected_count": self.rejected_count,
            "units_resumed": self.units_resumed,
            "seconds": round(seconds, 3),
            "messages_per_s": round(self.messages / seconds, 1) if seconds > 0 else 0.0,
            **({"pace": self.pace} if self.pace is not None else {}),
            **({"refresh_failures": self.refresh_failures} if self.refresh_failures else {}),
        }

    def summary(self) -> str:
        """One line for people."""
        out = self.to_json()
        return (
            f"imported {out['messages']} messages ({out['bytes']} bytes) for {out['users']} users"
            f" in {out['seconds']} s; {out['skipped_existing']} already there,"
            f" {out['rejected_count']} rejected"
        )
