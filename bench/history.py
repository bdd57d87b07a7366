"""`python -m bench history [--json] [--quick]`: a user's past from the log, against reading it.

One user's log on the embedded store: 20,000 entries (2,000 with --quick), messages
from 500 correspondents in as many threads, then 100 of the threads deleted. Measured
in one run:

* **the ceiling**: reading the whole log and the bodies it references, and decoding
  every record (`read_log` pages, `decode`, `get_messages`): what any replay pays
  before it applies a single entry;
* **show** (`image_at`, the mailbox rebuilt at a time just before the deletions):
  entries per second, and its ratio to the ceiling (`show_ratio`);
* **history** (`read_history`, every page of 1,000): entries per second, and its
  ratio to the ceiling;
* **restore** (RESTORE through `Mailbox.execute` to that time): seconds, and the
  messages it brought back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from pyserver import logcodec
from pyserver.app import history
from pyserver.app.image import thread_id_for
from pyserver.app.mailbox import Mailbox
from pyserver.store.base import LogAppend
from pyserver.store.sqlite import SQLiteStore
from pyserver.wire.ops import Op

USER = 2
CORRESPONDENTS = 500
DELETED_THREADS = 100
_BATCH = 500
_T0 = 1_700_000_000 * 1_000_000


def _entry(seq: int) -> tuple[dict[str, Any], bytes]:
    sender = 1_000 + seq % CORRESPONDENTS
    text = f"message {seq} about the quarterly plan and the figures we talked about"
    entry = {
        "seq": seq,
        "ts": _T0 + seq * 1_000_000,
        "action": "message_added",
        "message_id": f"m{seq:012d}",
        "thread_id": thread_id_for([USER, sender]),
        "sender": sender,
        "participants": [USER, sender],
        "channel": "chat",
        "folder": "inbox",
        "unread": seq % 3 == 0,
        "subject": "",
        "snippet": text,
        "body_ref": f"m{seq:012d}",
        "key": f"k{seq}",
    }
    body = orjson.dumps({"text": text, "from": None, "extra": {}})
    return entry, body


async def _fill(store: SQLiteStore, entries: int) -> None:
    for start in range(1, entries + 1, _BATCH):
        made = [_entry(seq) for seq in range(start, min(start + _BATCH, entries + 1))]
        await store.append(
            LogAppend(
                USER,
                start - 1,
                [logcodec.encode(entry) for entry, _ in made],
                messages={entry["message_id"]: body for entry, body in made},
            )
        )


async def _ceiling(store: SQLiteStore) -> int:
    """Read and decode the whole log and fetch every body it references; entries read."""
    after = read = 0
    while page := await store.read_log(USER, after, 1_000):
        entries = [logcodec.decode(record) for _, record in page]
        refs = [entry["body_ref"] for entry in entries if "body_ref" in entry]
        for raw in (await store.get_messages(USER, refs)).values():
            orjson.loads(raw)
        read += len(page)
        after = page[-1][0]
    return read


async def _run(entries: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        store = SQLiteStore(Path(folder) / "cell.sqlite", synchronous="OFF")
        await store.open()
        mailbox = Mailbox(store)
        try:
            await _fill(store, entries)
            at = _T0 + entries * 1_000_000  # after every message, before the deletions
            for n in range(DELETED_THREADS):
                thread = thread_id_for([USER, 1_000 + n])
                await mailbox.execute(Op.DELETE, {"user": USER, "thread_id": thread})
            total = await store.last_seq(USER)

            started = time.perf_counter()
            read = await _ceiling(store)
            ceiling_s = time.perf_counter() - started

            started = time.perf_counter()
            past = await history.image_at(store, USER, at)
            show_s = time.perf_counter() - started
            assert past.seq == entries and len(past.image.messages) == entries

            started = time.perf_counter()
            after: int | None = 0
            listed = 0
            while after is not None:
                page = await history.read_history(store, USER, after, history.HISTORY_PAGE[1])
                listed += len(page["entries"])
                after = page["next"]
            history_s = time.perf_counter() - started
            assert listed == total

            started = time.perf_counter()
            report = await mailbox.execute(Op.RESTORE, {"user": USER, "at": at / 1e6})
            restore_s = time.perf_counter() - started
        finally:
            await mailbox.close()
            await store.close()
    ceiling = read / ceiling_s
    return {
        "log_entries": total,
        "ceiling_read_decode_entries_per_s": round(ceiling),
        "show_entries_per_s": round(past.seq / show_s),
        "show_ratio": round(past.seq / show_s / ceiling, 3),
        "history_entries_per_s": round(listed / history_s),
        "history_ratio": round(listed / history_s / ceiling, 3),
        "restore_s": round(restore_s, 3),
        "restored_messages": len(report["messages_restored"]),
    }


def run(quick: bool = False) -> dict[str, object]:
    return {"history": asyncio.run(_run(2_000 if quick else 20_000))}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench history")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
