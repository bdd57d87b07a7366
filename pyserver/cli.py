"""The `pyserver` command line: run a cell, use it from a terminal, administer it.

`run` serves; the person-facing commands (`send`, `threads`, `thread`, ...)
talk to a running cell through `pyserver.client`, finding its address and
service key in its data folder; `admin` works on the store directly.

May import: any of pyserver.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pyserver import admin, doctor, endpoints, implementation
from pyserver.blobs import command as blob_command
from pyserver.blobs.command import attachment_lines, with_extras
from pyserver.client import Client
from pyserver.cluster import darklaunch
from pyserver.cluster.state import add_cluster_folder_argument
from pyserver.config import load_config
from pyserver.discovery import cellcommand
from pyserver.discovery.client import connect_to_cluster
from pyserver.errors import PyserverError
from pyserver.importer import command as import_command
from pyserver.ops import profiler
from pyserver.ops import terminal as ops_terminal
from pyserver.processes import dirty as dirty_process
from pyserver.processes import discovery as discovery_process
from pyserver.processes import imap as imap_process
from pyserver.processes import launcher, rollout
from pyserver.processes import mta as mta_process
from pyserver.processes import node as node_process
from pyserver.processes import sms as sms_process
from pyserver.processes import userindex as userindex_process
from pyserver.processes import web as web_process
from pyserver.processes.cell import serve
from pyserver.processes.runtime import add_ready_file_argument
from pyserver.servicekey import read_service_key
from pyserver.userid import user_id_argument

DEFAULT_DATA = Path("pyserver-data")


# ---- formatting for a person at a terminal ----


def _when(ts_us: int) -> str:
    return datetime.datetime.fromtimestamp(ts_us / 1e6).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _print_threads(reply: dict[str, Any]) -> None:
    threads = reply["threads"]
    if not threads:
        print("(no threads)")
    for thread in threads:
        people = ",".join(str(p) for p in thread["participants"])
        print(
            f"{thread['thread_id']}  {_when(thread['last_ts'])}  {thread['folder']:<8} "
            f"unread {thread['unread']:<3} [{people}] {thread['snippet'][:60]}"
        )
    if reply.get("next"):
        print(f"(more: --before {reply['next']})")


def _print_message(message: dict[str, Any]) -> None:
    sender = message.get("from") or message["sender"]
    flag = "*" if message.get("unread") else " "
    subject = f" [{message['subject']}]" if message.get("subject") else ""
    print(f"{flag} {_when(message['ts'])}  {sender} via {message['channel']}{subject}")
    print(f"  id {message['message_id']}")
    for line in message.get("text", "").splitlines() or [""]:
        print(f"  {line}")

    for line in attachment_lines(message):
        print(f"  {line}")


async def _thread_with_extras(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    """GET_THREAD, with each mail's `extra` (its attachments) from GET_MESSAGE."""
    reply = await client.get_thread(args.user, args.thread_id, limit=args.limit, before=args.before)
    return await with_extras(client, args.user, reply)


def _print_thread(reply: dict[str, Any]) -> None:
    people = ",".join(str(p) for p in reply["participants"])
    print(f"thread {reply['thread_id']}  folder {reply['folder']}  participants [{people}]")
    for message in reply["messages"]:
        _print_message(message)
    if reply.get("next"):
        print(f"(older: --before {reply['next']})")


def _print_counts(reply: dict[str, Any]) -> None:
    for folder, counts in reply["folders"].items():
        print(f"{folder:<9} unread {counts['unread']:<5} unseen {counts['unseen']}")


# ---- commands that talk to a running cell ----


async def _with_client(args: argparse.Namespace, work: Callable[[Any], Awaitable[Any]]) -> Any:
    if getattr(args, "cluster", None):  # a cluster: route through its discovery
        cluster = await connect_to_cluster(args.cluster)
        try:
            return await work(cluster)
        finally:
            await cluster.close()
    host, port = endpoints.server_address(args.data, args.server)
    client = await Client.connect(
        host, port, service_key=read_service_key(args.data), tls=load_config().client_tls()
    )
    try:
        return await work(client)
    finally:
        await client.close()


def _client_command(
    call: Callable[[argparse.Namespace, Any], Awaitable[Any]],
    show: Callable[[Any], None],
) -> Callable[[argparse.Namespace], int]:
    """A handler that runs `call(args, client)` and prints the reply (as JSON with --json)."""

    def handler(args: argparse.Namespace) -> int:
        reply = asyncio.run(_with_client(args, lambda client: call(args, client)))
        (_print_json if args.json else show)(reply)
        return 0

    return handler


async def _tail(args: argparse.Namespace, client: Any) -> None:
    async for event in client.subscribe(args.user):
        if args.json:
            print(json.dumps(event, ensure_ascii=False), flush=True)
        elif event.get("event") == "message_added" and "message" in event:
            _print_message(event["message"])
        else:
            print(json.dumps(event, ensure_ascii=False), flush=True)


def _tail_handler(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_with_client(args, lambda client: _tail(args, client)))
    return 0


# ---- serving ----


def _run(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        overrides={
            "data_dir": args.data,
            "host": args.host,
            "port": args.port,
            "http_port": args.http_port,
            "node_id": args.node_id,
            "smtp_port": args.smtp_port,
            "relay_addr": args.relay,
            "submission_port": args.submission_port,
            "tls_cert_file": args.tls_cert,
            "tls_key_file": args.tls_key,
            "mail_domain": args.mail_domain,
            "web_port": args.web_port,
            "imap_port": args.imap_port,
            "smsc": args.smsc,
            "sms_short_codes": args.short_codes,
        },
    )
    return serve(config, args.ready_file, tuple(args.sign_in_links or ()))


def _doctor(args: argparse.Namespace) -> int:
    report = doctor.report()
    if args.json:
        print(json.dumps(report))
        return 0
    for part in ("ring", "log_codec", "lru", "frame_codec", "reply_table"):
        print(f"{part:<22}{report[part]}")
    print(f"{'native_release_build':<22}{str(report['native_release_build']).lower()}")
    if implementation.PURE_FORCED:
        print("(PYSERVER_PURE=1: the pure-Python twins are forced)")
    return 0


def _recipient(text: str) -> int | str:
    """A SEND recipient on the command line: a user id, or an email address (with an @)."""
    return text.strip() if "@" in text else user_id_argument(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyserver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a whole single-node cell")
    run.add_argument("--config", help="a TOML configuration file (docs/configuration.md)")
    run.add_argument("--data", type=Path, help="data folder (default ./pyserver-data)")
    run.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="binary protocol port (default 7400; 0: any)")
    run.add_argument("--http-port", type=int, help="/metrics and /health port (default 7480)")
    run.add_argument("--node-id", help="this server's node id")
    run.add_argument("--smtp-port", type=int, help="the MTA proxy's SMTP port (default 2525)")
    run.add_argument("--relay", help="the smart host mail to outside addresses goes through")
    run.add_argument("--mail-domain", help="users' mail goes out from u<user>@DOMAIN")
    run.add_argument("--submission-port", type=int, help="SMTP submission for mail clients")
    run.add_argument("--tls-cert", help="PEM certificate of the submission port's STARTTLS")
    run.add_argument("--tls-key", help="PEM key of that certificate")
    run.add_argument("--web-port", type=int, help="the web inbox's port (default 7488; -1: none)")
    run.add_argument(
        "--imap-port", type=int, help="the IMAP gateway's port (default 1143; -1: none)"
    )
    run.add_argument("--smsc", help="SMSCs to bind to for SMS, host:port[,host:port...]")
    run.add_argument("--short-codes", help="the SMS short codes and their owners, CODE=USER,...")
    run.add_argument(
        "--sign-in-links",
        type=lambda text: [user_id_argument(part) for part in text.split(",") if part],
        help="print a web sign-in link (valid a day) for each of these users, e.g. 1,2",
    )
    add_ready_file_argument(run)
    run.set_defaults(handler=_run)

    doctor_command = commands.add_parser("doctor", help="which implementation each core part uses")
    doctor_command.add_argument("--json", action="store_true", help="print one JSON object")
    doctor_command.set_defaults(handler=_doctor)

    def client_parser(name: str, help_text: str, user: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the cell's data folder")
        sub.add_argument("--server", help="HOST:PORT (default: from the data folder)")
        add_cluster_folder_argument(sub)
        sub.add_argument("--json", action="store_true", help="print the raw reply")
        if user:
            sub.add_argument("--user", type=user_id_argument, required=True, help="the user id")
        return sub

    send = client_parser("send", "send a message")
    send.add_argument(
        "--to",
        type=_recipient,
        action="append",
        required=True,
        help="a recipient: a user id or an email address (repeat for several)",
    )
    send.add_argument("--channel", default="chat", choices=("chat", "email", "sms", "web"))
    send.add_argument("--subject", default="")
    send.add_argument("--key", help="idempotency key: a retry with it sends nothing twice")
    send.add_argument("text")
    send.set_defaults(
        handler=_client_command(
            lambda a, c: c.send(
                a.user, a.to, a.text, channel=a.channel, subject=a.subject, key=a.key
            ),
            lambda reply: print(f"sent {reply['message_id']} in thread {reply['thread_id']}"),
        )
    )

    threads = client_parser("threads", "list a folder's threads")
    threads.add_argument("--folder", default="inbox")
    threads.add_argument("--limit", type=int, default=20)
    threads.add_argument("--before", help="paging cursor")
    threads.set_defaults(
        handler=_client_command(
            lambda a, c: c.list_threads(a.user, folder=a.folder, limit=a.limit, before=a.before),
            _print_threads,
        )
    )

    thread = client_parser("thread", "show a thread's messages")
    thread.add_argument("thread_id")
    thread.add_argument("--limit", type=int, default=50)
    thread.add_argument("--before", help="paging cursor")
    thread.set_defaults(
        handler=_client_command(
            lambda a, c: _thread_with_extras(a, c),
            _print_thread,
        )
    )

    message = client_parser("message", "show one message")
    message.add_argument("message_id")
    message.set_defaults(
        handler=_client_command(lambda a, c: c.get_message(a.user, a.message_id), _print_message)
    )

    counts = client_parser("counts", "unread and unseen counts per folder")
    counts.set_defaults(handler=_client_command(lambda a, c: c.counts(a.user), _print_counts))

    search = client_parser("search", "search the user's messages")
    search.add_argument("words", nargs="+")
    search.add_argument("--limit", type=int, default=20)
    search.set_defaults(
        handler=_client_command(
            lambda a, c: c.search(a.user, " ".join(a.words), limit=a.limit),
            lambda reply: [_print_message(m) for m in reply["messages"]] or print("(no match)"),
        )
    )

    read = client_parser("mark-read", "mark a thread read")
    read.add_argument("thread_id")
    read.set_defaults(
        handler=_client_command(
            lambda a, c: c.mark_read(a.user, a.thread_id), lambda r: print(f"seq {r['seq']}")
        )
    )

    move = client_parser("move", "move a thread to a folder (archive: --folder archived)")
    move.add_argument("thread_id")
    move.add_argument("--folder", required=True)
    move.set_defaults(
        handler=_client_command(
            lambda a, c: c.move(a.user, a.thread_id, a.folder), lambda r: print(f"seq {r['seq']}")
        )
    )

    friend = client_parser("friend", "make two users friends (mail between them goes to Inbox)")
    friend.add_argument("friend", type=user_id_argument)
    friend.set_defaults(
        handler=_client_command(
            lambda a, c: c.friend_add(a.user, a.friend), lambda r: print("friends")
        )
    )

    tail = client_parser("tail", "print the user's new events as they happen")
    tail.set_defaults(handler=_tail_handler)

    admin.add_parser(commands, DEFAULT_DATA, user_id_argument)
    import_command.add_parser(commands, DEFAULT_DATA)
    mta_process.add_parser(commands, DEFAULT_DATA)
    blob_command.add_parser(commands, DEFAULT_DATA, user_id_argument)
    node_process.add_parser(commands)
    userindex_process.add_parser(commands, DEFAULT_DATA)
    dirty_process.add_parser(commands, DEFAULT_DATA)
    discovery_process.add_parser(commands, DEFAULT_DATA)
    web_process.add_parser(commands, DEFAULT_DATA)
    imap_process.add_parser(commands, DEFAULT_DATA)
    sms_process.add_parser(commands, DEFAULT_DATA)
    launcher.add_parser(commands, rollout.add_actions)
    cellcommand.add_parser(commands)
    ops_terminal.add_parser(commands)
    profiler.add_parser(commands)
    darklaunch.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PyserverError as exc:
        print(f"pyserver: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (ConnectionError, OSError) as exc:
        print(f"pyserver: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
