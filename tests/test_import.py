"""`pyserver import`: real mbox, Maildir, tree and JSON-lines files into a cell's data folder,
then the image a served cell shows of them (LIST_THREADS, GET_THREAD, COUNTS, GET_BLOB);
running an import twice adds nothing; bad input is rejected with a reason and skipped; an
import killed mid-way (SIGKILL) resumes with nothing missing or doubled."""

from __future__ import annotations

import asyncio
import json
import mailbox
import os
import signal
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from pyserver.client import Client
from pyserver.cluster.state import read_state
from pyserver.discovery.client import connect_to_cluster
from pyserver.importer.checkpoint import default_path
from pyserver.servicekey import read_service_key
from pyserver.store.spec import open_store as open_store_spec
from pyserver.store.spec import parse_store_spec
from tests.support import cli, run, run_cli, serve_cell

ATTACHMENT = bytes(range(256)) * 16


def _mail(
    sender: str,
    to: str,
    subject: str,
    message_id: str,
    text: str,
    date: str,
    reply_to: str | None = None,
    attachment: bytes | None = None,
    charset: str = "utf-8",
) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = to
    mail["Subject"] = subject
    mail["Message-ID"] = message_id
    mail["Date"] = date
    if reply_to:
        mail["In-Reply-To"] = reply_to
        mail["References"] = reply_to
    mail.set_content(text, charset=charset)
    if attachment is not None:
        mail.add_attachment(attachment, maintype="application", subtype="octet-stream",
                            filename="figures.bin")  # fmt: skip
    return mail


def _import(*args: str, data: Path) -> dict[str, Any]:
    done = run_cli("import", *args, "--data", str(data), "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _served(data: Path, reads: Any) -> Any:
    """What `reads(client)` finds in the cell served on `data`."""
    proc, ready = serve_cell(data)
    try:
        key = read_service_key(data)

        async def scenario() -> Any:
            server = ready["server"]
            async with await Client.connect(server["host"], server["port"], service_key=key) as c:
                return await reads(c)

        return run(scenario, timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _write_mbox(path: Path) -> None:
    box = mailbox.mbox(str(path))
    first = _mail("Carol <carol@example.org>", "bob@example.org", "plans", "<a1@example.org>",
                  "shall we meet?", "Mon, 01 Jan 2024 10:00:00 +0000")  # fmt: skip
    first["Status"] = "RO"  # read
    box.add(first)
    box.add(_mail("Bob <bob@example.org>", "carol@example.org", "Re: plans", "<a2@example.org>",
                  "> shall we meet?\nyes, friday", "Mon, 01 Jan 2024 11:00:00 +0000",
                  reply_to="<a1@example.org>"))  # fmt: skip
    box.add(_mail("dave@example.org", "bob@example.org", "figures", "<a3@example.org>",
                  "attached, ça va?", "Tue, 02 Jan 2024 09:00:00 +0000",
                  attachment=ATTACHMENT, charset="iso-8859-1"))  # fmt: skip
    box.flush()
    box.close()
    with open(path, "ab") as out:  # a message with nothing in it
        out.write(b"From nobody Mon Jan  1 00:00:00 2024\n\n")


def _write_maildir(path: Path) -> None:
    for sub in ("", ".Sent", ".Archive"):
        for part in ("cur", "new", "tmp"):
            (path / sub / part).mkdir(parents=True, exist_ok=True)
    reply = _mail("erin@example.org", "frank@example.org", "Re: trip", "<b2@example.org>",
                  "> when?\nin may", "Wed, 03 Jan 2024 10:00:00 +0000",
                  reply_to="<b1@example.org>")  # fmt: skip
    (path / "new" / "1704276000.1.host").write_bytes(bytes(reply))  # unread
    sent = _mail("frank@example.org", "erin@example.org", "trip", "<b1@example.org>", "when?",
                 "Wed, 03 Jan 2024 09:00:00 +0000")  # fmt: skip
    (path / ".Sent" / "cur" / "1704272400.2.host:2,S").write_bytes(bytes(sent))
    old = _mail("grace@example.org", "frank@example.org", "old news", "<b3@example.org>",
                "archived long ago", "Mon, 01 Jan 2024 08:00:00 +0000")  # fmt: skip
    (path / ".Archive" / "cur" / "1704096000.3.host:2,S").write_bytes(bytes(old))


def _write_jsonl(path: Path) -> None:
    (path.parent / "files").mkdir(exist_ok=True)
    (path.parent / "files" / "photo.jpg").write_bytes(b"\xff\xd8\xff" + bytes(500))
    lines = [
        {"id": "c1", "channel": "chat", "from": 11, "to": [12], "ts": 1704100000,
         "text": "lunch?"},
        {"id": "c2", "channel": "chat", "from": 12, "to": [11], "ts": 1704100060,
         "text": "sure, noon", "attachments": [{"path": "files/photo.jpg"}]},
        {"id": "s1", "channel": "sms", "from": "+15550001111", "to": [11],
         "ts": "2024-01-02T08:00:00Z", "text": "your code is 1234", "read": False},
        "not an object",
        {"id": "c3", "channel": "pigeon", "from": 11, "to": [12], "ts": 1704100100, "text": "x"},
        {"id": "c4", "channel": "chat", "from": 11, "to": [12], "ts": 1704100100},
        {"id": "c5", "channel": "chat", "from": 11, "to": [12], "ts": 1704100120, "text": "pic",
         "attachments": [{"path": "files/missing.png"}]},
    ]  # fmt: skip
    with open(path, "w") as out:
        for line in lines:
            out.write(json.dumps(line) + "\n")
        out.write("{broken json\n")


def test_mbox_maildir_and_jsonl_make_the_image_a_cell_serves(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_mbox(tmp_path / "bob.mbox")
    _write_maildir(tmp_path / "frank")
    _write_jsonl(tmp_path / "chat.jsonl")

    mbox = _import("mbox", str(tmp_path / "bob.mbox"), "--user", "2", "--address",
                   "bob@example.org", data=data)  # fmt: skip
    assert mbox["messages"] == 3 and mbox["skipped_existing"] == 0 and mbox["users"] == 1
    assert [r["reason"] for r in mbox["rejected"]] == ["empty message"]
    maildir = _import("maildir", str(tmp_path / "frank"), "--user", "3", "--address",
                      "frank@example.org", data=data)  # fmt: skip
    assert maildir["messages"] == 3 and maildir["rejected"] == []
    chat = _import("jsonl", str(tmp_path / "chat.jsonl"), data=data)
    # c1 and c2 into both users' mailboxes, s1 into 11's
    assert chat["messages"] == 5 and chat["users"] == 2
    reasons = {r["item"].rsplit(":", 1)[1]: r["reason"] for r in chat["rejected"]}
    assert set(reasons) == {"4", "5", "6", "7", "8"}, reasons
    assert "channel" in reasons["5"] and "text" in reasons["6"]
    assert "missing.png" in reasons["7"] and "JSON" in reasons["8"]
    assert chat["bytes"] > 0 and mbox["bytes"] > 0

    # the same imports again add nothing
    again = _import("mbox", str(tmp_path / "bob.mbox"), "--user", "2", data=data)
    assert again["messages"] == 0 and again["skipped_existing"] == 3
    again = _import("jsonl", str(tmp_path / "chat.jsonl"), data=data)
    assert again["messages"] == 0 and again["skipped_existing"] == 5

    async def reads(client: Client) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for user in (2, 3, 11, 12):
            found[user] = {"counts": await client.counts(user)}
            for folder in ("inbox", "archived", "sent", "other"):
                listed = await client.list_threads(user, folder)
                found[user][folder] = [
                    {**t, "thread": await client.get_thread(user, t["thread_id"])}
                    for t in listed["threads"]
                ]
        attachment = found[2]["inbox"][0]["thread"]["messages"][0]["attachments"][0]
        found["blob"] = b"".join([piece async for piece in client.get_blob(2, attachment["ref"])])
        return found

    seen = _served(data, reads)
    # bob (2): the plans thread (carol's mail, read, and his reply) and dave's unread figures
    inbox = seen[2]["inbox"]
    assert [t["subject"] for t in inbox] == ["figures", "plans"]
    figures, plans = inbox
    assert figures["unread"] == 1 and plans["unread"] == 0 and plans["messages"] == 2
    texts = [m["text"] for m in plans["thread"]["messages"]]
    assert texts == ["shall we meet?", "> shall we meet?\nyes, friday"]
    assert figures["thread"]["messages"][0]["text"] == "attached, ça va?"
    assert seen["blob"] == ATTACHMENT
    assert seen[2]["counts"]["folders"]["inbox"]["unread"] == 1
    # frank (3): his sent "trip" and erin's unread reply in one thread, in the inbox;
    # grace's old mail stays archived and read
    [trip] = seen[3]["inbox"]
    assert trip["messages"] == 2 and trip["unread"] == 1
    assert [m["text"] for m in trip["thread"]["messages"]] == ["when?", "> when?\nin may"]
    assert trip["thread"]["messages"][0]["sender"] == 3
    [old] = seen[3]["archived"]
    assert old["subject"] == "old news" and old["unread"] == 0
    assert seen[3]["sent"] == []
    # 11 and 12: one chat thread each, with both messages and the photo; 11 has the text
    for user in (11, 12):
        chats = [t for t in seen[user]["inbox"] if t["channels"] == ["chat"]]
        assert len(chats) == 1 and chats[0]["messages"] == 2
        assert chats[0]["participants"] == [11, 12]
        assert chats[0]["thread"]["messages"][1]["attachments"][0]["size"] == 503
    sms = [t for t in seen[11]["inbox"] if t["channels"] == ["sms"]]
    assert len(sms) == 1 and sms[0]["unread"] == 1
    assert seen[11]["counts"]["folders"]["inbox"]["unread"] == 1


def test_a_running_cell_shows_an_import_at_once(tmp_path: Path) -> None:
    """The import tells the running server to drop its cached images of imported users:
    without that, a cached user showed the import only after its next write."""
    data = tmp_path / "data"
    _write_jsonl(tmp_path / "chat.jsonl")
    proc, ready = serve_cell(data)
    try:
        key = read_service_key(data)
        server = ready["server"]

        async def scenario() -> tuple[int, int, dict[str, Any]]:
            async with await Client.connect(server["host"], server["port"], service_key=key) as c:
                await c.send(11, [12], "before the import")  # 11 and 12 cached, one thread
                before = len((await c.list_threads(11, "inbox"))["threads"])
                report = await asyncio.to_thread(
                    _import, "jsonl", str(tmp_path / "chat.jsonl"), data=data
                )
                after = len((await c.list_threads(11, "inbox"))["threads"])
                return before, after, report

        before, after, report = run(scenario, timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert report["messages"] == 5 and "refresh_failures" not in report
    # 11's own message was in Sent only; the import brings the chat (joining that thread,
    # now with a reply from 12) and the SMS into the inbox of the image the server holds
    assert (before, after) == (0, 2)


def test_a_tree_with_a_map_imports_each_users_mailboxes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tree = tmp_path / "tree"
    tree.mkdir()
    _write_mbox(tree / "bob@example.org.mbox")
    _write_maildir(tree / "frank@example.org")
    (tree / "stranger@example.org.mbox").write_bytes(b"From x\n\nhello\n")
    (tmp_path / "map.csv").write_text(
        "address,user\nbob@example.org,2\nfrank@example.org,3\nnot a row\n"
    )
    report = _import("tree", str(tree), "--map", str(tmp_path / "map.csv"), data=data)
    assert report["messages"] == 6 and report["users"] == 2
    reasons = {r["item"]: r["reason"] for r in report["rejected"]}
    assert any("stranger@example.org" in item and "map" in why for item, why in reasons.items())
    assert any(item.endswith("map.csv:4") for item in reasons)

    async def reads(client: Client) -> dict[str, Any]:
        bob = await client.list_threads(2)
        frank = await client.list_threads(3)
        return {"bob": bob["threads"], "frank": frank["threads"]}

    seen = _served(data, reads)
    # the map made both users known: bob's reply went to carol, frank's trip to erin
    assert sorted(t["subject"] for t in seen["bob"]) == ["figures", "plans"]
    assert [t["messages"] for t in seen["frank"]] == [2]


def _chat_lines(path: Path, users: int, per_user: int) -> int:
    """A chat between neighbours: user u writes to u+1; every line is a copy for both."""
    count = 0
    with open(path, "w") as out:
        for user in range(1, users + 1):
            for n in range(per_user):
                line = {"id": f"u{user}-{n}", "channel": "chat", "from": user,
                        "to": [user % users + 1], "ts": 1704000000 + n,
                        "text": f"line {n}"}  # fmt: skip
                out.write(json.dumps(line) + "\n")
                count += 2
    return count


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have ignored it


@pytest.mark.parametrize(
    ("workers", "stop"),
    [
        pytest.param(1, signal.SIGKILL, id="crash"),
        pytest.param(2, signal.SIGKILL, id="crash-with-workers", marks=pytest.mark.slow),
        pytest.param(2, signal.SIGINT, id="ctrl-c-with-workers"),
    ],
)
def test_an_import_killed_mid_way_resumes_with_nothing_missing_or_doubled(
    tmp_path: Path, workers: int, stop: signal.Signals
) -> None:
    data = tmp_path / "data"
    source = tmp_path / "chat.jsonl"
    users, per_user = 300, 10
    expected = _chat_lines(source, users, per_user)
    checkpoint = default_path(data, ["jsonl", str(source.resolve())])
    command = [sys.executable, "-m", "pyserver.cli", "import", "jsonl", str(source),
               "--data", str(data), "--json", "--jobs", "2", "--workers", str(workers)]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + 60
    # stopped once some users are done and before all are
    while not (checkpoint.exists() and checkpoint.read_text().count("\n") >= 20):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the import made no progress"
        time.sleep(0.01)
    children = _children(proc.pid)
    assert workers == 1 or len(children) >= workers
    os.kill(proc.pid, stop)
    _, errors = proc.communicate(timeout=30)
    if stop == signal.SIGINT:  # Ctrl-C: the import stops itself, its workers with it
        assert proc.returncode == 130 and b"run the same command again" in errors
    # worker processes die with the import: nothing goes on writing behind the resumed run
    deadline = time.monotonic() + 30
    while not all(_gone(child) for child in children):
        assert time.monotonic() < deadline, "a worker outlived the killed import: " + repr(
            [Path(f"/proc/{child}/cmdline").read_bytes() for child in children if not _gone(child)]
        )
        time.sleep(0.05)
    done_before = checkpoint.read_text().count("\n")
    assert done_before < users, "the import finished before it was killed"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report["units_resumed"] >= 20
    assert not checkpoint.exists()  # completed: nothing left to resume
    # what the killed run wrote plus what the resumed one added is everything, once
    again = _import("jsonl", str(source), data=data)
    assert again["messages"] == 0 and again["skipped_existing"] == expected

    async def reads(client: Client) -> list[int]:
        totals = []
        for user in (1, 2, users // 2, users):
            threads = (await client.list_threads(user, "inbox", limit=10))["threads"]
            sent = (await client.list_threads(user, "sent", limit=10))["threads"]
            totals.append([t["messages"] for t in threads] + [t["messages"] for t in sent])
            thread = await client.get_thread(user, threads[0]["thread_id"])
            keys = [m["text"] for m in thread["messages"]]
            assert len(keys) == len(set(zip(keys, [m["sender"] for m in thread["messages"]],
                                            strict=True)))  # fmt: skip
        return totals

    # every user: the thread with the previous user in the inbox, the one with the next
    # (only the user's own lines) in Sent, 10 messages each
    assert _served(data, reads) == [[per_user, per_user]] * 4


@pytest.mark.parametrize("kind", ["mbox", "maildir"])
def test_a_missing_or_wrong_source_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    done = run_cli("import", kind, str(tmp_path / "nothing"), "--user", "2", "--data",
                   str(tmp_path / "data"))  # fmt: skip
    assert done.returncode == 2 and "no such file" in done.stderr
    (tmp_path / "plain").write_text("not a mailbox\n")
    wrong = tmp_path / ("plain" if kind == "mbox" else "")
    report = _import(kind, str(wrong), "--user", "2", data=tmp_path / "data")
    assert report["messages"] == 0 and len(report["rejected"]) == 1


@pytest.mark.slow
def test_an_import_into_a_cluster_writes_each_user_in_the_cell_discovery_names(
    tmp_path: Path, zookeeper: str
) -> None:
    """`--cluster DIR`: two cells; every user's batch goes to the store of the cell discovery
    places the user in, and the cluster serves the image (through discovery)."""
    folder = tmp_path / "cluster"
    source = tmp_path / "chat.jsonl"
    expected = _chat_lines(source, 12, 3)

    async def scenario() -> None:
        await asyncio.to_thread(
            cli, "cluster", "up", "--cluster", str(folder), "--engine", "sqlite", "--cells", "2",
            "--nodes", "1", "--session-timeout", "3",
        )  # fmt: skip
        try:
            done = await asyncio.to_thread(
                run_cli, "import", "jsonl", str(source), "--cluster", str(folder), "--json"
            )
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout.strip().splitlines()[-1])
            assert report["messages"] == expected and report["users"] == 12
            assert "refresh_failures" not in report  # every owner was told
            again = await asyncio.to_thread(
                run_cli, "import", "jsonl", str(source), "--cluster", str(folder), "--json"
            )
            assert json.loads(again.stdout.strip().splitlines()[-1])["skipped_existing"] == expected
            cluster = await connect_to_cluster(folder)
            try:
                # each user's log is in the store of the cell discovery names, only there
                state = read_state(folder)
                stores = {name: open_store_spec(parse_store_spec(spec, folder))
                          for name, spec in state["cells"].items()}  # fmt: skip
                for store in stores.values():
                    await store.open()
                try:
                    for user in range(1, 13):
                        cell = await cluster.cell_of(user)
                        for name, store in stores.items():
                            held = await store.last_seq(user)
                            assert (held == 6) if name == cell else (held == 0), (user, name)
                finally:
                    for store in stores.values():
                        await store.close()
                for user in (1, 6, 12):
                    inbox = (await cluster.list_threads(user, "inbox"))["threads"]
                    sent = (await cluster.list_threads(user, "sent"))["threads"]
                    assert [t["messages"] for t in inbox + sent] == [3, 3]
            finally:
                await cluster.close()
        finally:
            await asyncio.to_thread(
                cli, "cluster", "down", "--cluster", str(folder), "--grace", "10"
            )

    run(scenario, timeout=240)
