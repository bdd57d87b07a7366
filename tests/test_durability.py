"""kill -9 of a running cell under load loses no acknowledged write and duplicates none.

The cell runs as `pyserver run` in its own process. Many clients SEND with
idempotency keys; the server is killed with SIGKILL mid-load, started again on
the same data, and every SEND that was acknowledged must be in both the
sender's and the recipient's mailbox exactly once. Unacknowledged SENDs are
then retried with the same keys: each lands at most once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from pyserver.client import Client
from pyserver.errors import PyserverError
from tests.support import start_serving

SENDERS = range(1, 9)
RECIPIENT_OFFSET = 100  # sender s writes to user s + 100


def _start_cell(data: Path) -> subprocess.Popen[bytes]:
    proc, _ = start_serving(
        ["run", "--data", str(data), "--port", "0", "--http-port", "0", "--smtp-port", "0",
         "--web-port", "-1", "--imap-port", "-1"],
        data.parent / f"{data.name}.ready.json", stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return proc


def _address(data: Path) -> tuple[str, int]:
    server = json.loads((data / "endpoints.json").read_text())["server"]
    return server["host"], server["port"]


def _key(data: Path) -> str:
    return (data / "service.key").read_text().strip()


async def _load(data: Path, acked: dict[str, str], attempted: list[tuple[int, str]]) -> None:
    """SEND as fast as 8 concurrent senders can until the server dies."""
    host, port = _address(data)
    client = await Client.connect(host, port, service_key=_key(data))

    async def sender(user: int) -> None:
        n = 0
        while True:
            key = f"s{user}-{n}"
            n += 1
            attempted.append((user, key))
            try:
                reply = await client.send(user, [user + RECIPIENT_OFFSET], f"msg {key}", key=key)
            except (PyserverError, ConnectionError, OSError):
                return
            acked[key] = reply["message_id"]

    try:
        await asyncio.wait_for(asyncio.gather(*(sender(u) for u in SENDERS)), timeout=60)
    finally:
        await client.close()


async def _messages_by_key(client: Client, user: int) -> Counter[str]:
    """How many times each message text of the user's threads appears."""
    seen: Counter[str] = Counter()
    for folder in ("inbox", "other", "sent", "archived", "spam"):
        cursor = None
        while True:
            page = await client.list_threads(user, folder=folder, limit=200, before=cursor)
            for thread in page["threads"]:
                before = None
                while True:
                    got = await client.get_thread(user, thread["thread_id"], limit=200,
                                                  before=before)  # fmt: skip
                    seen.update(m["text"].removeprefix("msg ") for m in got["messages"])
                    before = got.get("next")
                    if not before:
                        break
            cursor = page.get("next")
            if not cursor:
                break
    return seen


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_send(tmp_path: Path) -> None:
    data = tmp_path / "cell"
    proc = _start_cell(data)
    acked: dict[str, str] = {}
    attempted: list[tuple[int, str]] = []

    async def load_then_kill() -> None:
        load = asyncio.create_task(_load(data, acked, attempted))
        # Kill once a good number of writes were acknowledged, in the middle of the stream.
        deadline = time.monotonic() + 30
        while len(acked) < 300 and time.monotonic() < deadline and not load.done():
            await asyncio.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        await load

    asyncio.run(load_then_kill())
    proc.wait(timeout=10)
    assert len(acked) >= 300, f"only {len(acked)} SENDs acknowledged before the kill"

    proc = _start_cell(data)
    try:

        async def verify() -> None:
            host, port = _address(data)
            async with await Client.connect(host, port, service_key=_key(data)) as client:
                for sender in SENDERS:
                    sent = await _messages_by_key(client, sender)
                    received = await _messages_by_key(client, sender + RECIPIENT_OFFSET)
                    mine = [k for k in acked if k.startswith(f"s{sender}-")]
                    for key in mine:
                        assert sent[key] == 1, f"sender {sender}: {key} x{sent[key]}"
                        assert received[key] == 1, f"recipient of {sender}: {key} x{received[key]}"
                    assert all(n == 1 for n in sent.values()), "a duplicate in a sender's log"
                    assert all(n == 1 for n in received.values()), "a duplicate delivered"
                    # ...and searchable: the index is derived from the log, so terms that
                    # were not yet written when the server died are indexed from it.
                    for key in mine:
                        query = key.replace("-", " ")  # "s3-17": the words s3 and 17
                        for user in (sender, sender + RECIPIENT_OFFSET):
                            found = await client.search(user, query)
                            texts = [m["text"] for m in found["messages"]]
                            assert f"msg {key}" in texts, f"user {user}: {key} not found"

                # Retrying every attempted SEND with its key stores nothing twice, and
                # returns the first message id for those that were acknowledged.
                for user, key in attempted:
                    reply = await client.send(
                        user, [user + RECIPIENT_OFFSET], f"msg {key}", key=key
                    )
                    if key in acked:
                        assert reply["duplicate"] is True
                        assert reply["message_id"] == acked[key]
                for sender in SENDERS:
                    received = await _messages_by_key(client, sender + RECIPIENT_OFFSET)
                    assert all(n == 1 for n in received.values())

        asyncio.run(verify())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
