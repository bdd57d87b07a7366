"""`pyserver admin ...`: operations tools that work on a cell's data folder.

`token` signs a user token with the cell's service key; `revoke` revokes one
token or every token of a user (every app server refuses them within seconds);
`keys` rotates the service keys (docs/security.md). `rebuild`, `export`,
`import` and `add-address` open the cell's store directly; they are safe while
the cell runs, because every log append is a compare-and-set: the running
server notices a newer log, reloads the user and carries on. `create-tables`
makes a cell's tables on HBase (through its Thrift gateway).

May import: any of pyserver but pyserver.cli.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pyserver import admin_history
from pyserver.app.auth import make_user_token, read_user_token, token_id
from pyserver.cluster import tools as cluster_tools
from pyserver.cluster.state import add_cluster_folder_argument, read_state
from pyserver.cluster.zk import digest_id
from pyserver.discovery import move as discovery_move
from pyserver.discovery.client import connect_to_cluster
from pyserver.errors import Unauthenticated
from pyserver.processes import blob_gc
from pyserver.processes.cell import open_mailbox, open_store
from pyserver.servicekey import (
    SERVICE_KEY_FILE,
    ServiceKeys,
    generate_service_key,
    key_id,
    read_service_key,
    write_service_keys,
)
from pyserver.sms.gateway import normalise_phone
from pyserver.store.base import ALL_TOKENS, Revocation
from pyserver.store.spec import open_store as open_store_spec
from pyserver.store.spec import parse_store_spec
from pyserver.wire.ops import Op


async def _token(args: argparse.Namespace) -> int:
    expires_at = int(time.time()) + args.ttl
    print(make_user_token(args.user, expires_at, read_service_key(args.data)))
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    """Record the revocation in every store whose app servers (or web tier) check tokens:
    the cell's, or each cell's of a cluster and its directory store."""
    revoked = ALL_TOKENS
    if args.token:
        try:  # a token of another user, or not ours at all, is a mistake worth saying
            token = read_user_token(args.token, _key_file_keys(args), time.time())
        except Unauthenticated as error:
            if "expired" not in str(error):
                print(f"pyserver: not a token of this cell: {error}", file=sys.stderr)
                return 2
        else:
            if token.user != args.user:
                print(f"pyserver: that token is user {token.user}'s", file=sys.stderr)
                return 2
        revoked = token_id(args.token)
    revocation = Revocation(args.user, revoked, time.time())
    if args.cluster is None:
        async with open_store(args.data) as store:
            await store.revoke(revocation)
    else:
        state = read_state(args.cluster)
        for spec in [state["directory_store"], *state["cells"].values()]:
            store = open_store_spec(parse_store_spec(spec, args.cluster))
            await store.open()
            try:
                await store.revoke(revocation)
            finally:
                await store.close()
    what = f"token {revoked}" if args.token else "every token issued until now"
    print(f"user {args.user}: {what} revoked")
    return 0


def _key_file(args: argparse.Namespace) -> Path:
    if getattr(args, "cluster", None) is not None:
        return Path(read_state(args.cluster)["service_key_file"])
    return args.data / SERVICE_KEY_FILE


def _key_file_keys(args: argparse.Namespace) -> ServiceKeys:
    return ServiceKeys.from_file(_key_file(args))


def _keys(args: argparse.Namespace) -> int:
    """List, add, promote or retire service keys; the processes re-read the file."""
    path = _key_file(args)
    keys = ServiceKeys.from_file(path).all()
    ids = [key_id(key) for key in keys]
    if args.step == "add":
        keys.append(generate_service_key())
        print(f"added key {key_id(keys[-1])}: accepted everywhere within a few seconds;")
        print("promote it once every process has it (about two seconds later)")
    elif args.step in ("promote", "retire"):
        if args.id not in ids:
            print(
                f"pyserver: no key {args.id!r} in {path} (keys: {', '.join(ids)})", file=sys.stderr
            )
            return 2
        chosen = keys[ids.index(args.id)]
        keys.remove(chosen)
        if args.step == "promote":
            keys.insert(0, chosen)
            print(f"key {args.id} is current: new connections and tokens use it")
        elif not keys:
            print("pyserver: the last key cannot be retired: add another first", file=sys.stderr)
            return 2
        else:
            print(f"retired key {args.id}: its tokens and connections are refused from now on")
    if args.step != "list":
        write_service_keys(path, keys)
    for number, key in enumerate(keys):
        print(f"{key_id(key)}  {'current' if number == 0 else 'accepted'}")
    return 0


def _zk_digest(args: argparse.Namespace) -> int:
    try:
        print(digest_id(args.credentials))
    except ValueError as error:
        print(f"pyserver: {error}", file=sys.stderr)
        return 2
    return 0


async def _rebuild(args: argparse.Namespace) -> int:
    async with open_mailbox(args.data) as mailbox:
        report = await mailbox.rebuild(args.user)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


async def _export(args: argparse.Namespace) -> int:
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (closed below)
    try:
        async with open_mailbox(args.data) as mailbox:
            entries = await mailbox.export_log(args.user)
        for entry in entries:
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {len(entries)} log entries of user {args.user}", file=sys.stderr)
    return 0


async def _import(args: argparse.Namespace) -> int:
    source = open(args.input) if args.input else sys.stdin  # noqa: SIM115 (closed below)
    try:
        entries = [json.loads(line) for line in source if line.strip()]
    finally:
        if source is not sys.stdin:
            source.close()
    async with open_mailbox(args.data) as mailbox:
        imported = await mailbox.import_log(args.user, entries)
    print(f"imported {imported} log entries into user {args.user}", file=sys.stderr)
    return 0


@asynccontextmanager
async def _address_book(args: argparse.Namespace) -> AsyncIterator[Any]:
    """Where addresses live: a cluster's directory store (`--cluster`), else the cell's."""
    if args.cluster is None:
        async with open_store(args.data) as store:
            yield store
        return
    state = read_state(args.cluster)
    store = open_store_spec(parse_store_spec(state["directory_store"], args.cluster))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _add_address(args: argparse.Namespace) -> int:
    async with _address_book(args) as store:
        await store.add_address(args.address, args.user)
    print(f"{args.address} -> user {args.user}")
    return 0


async def _add_phone(args: argparse.Namespace) -> int:
    phone = normalise_phone(args.phone)
    if phone is None:
        print(
            f"pyserver: {args.phone!r} is not a phone number (+ and 8-15 digits)", file=sys.stderr
        )
        return 2
    async with _address_book(args) as store:
        await store.add_address(phone, args.user)
    print(f"{phone} -> user {args.user}")
    if args.sms is not None:  # the user's setting, in the user's log (at its owner's)
        setting = {"user": args.user, "phone": phone, "mode": args.sms}
        if args.cluster is not None:
            async with await connect_to_cluster(args.cluster) as cluster:
                await cluster.request(Op.SET_SMS, setting)
        else:
            async with open_mailbox(args.data) as mailbox:
                await mailbox.execute(Op.SET_SMS, setting)
        print(f"texts to {phone}: {args.sms}")
    return 0


async def _create_tables(args: argparse.Namespace) -> int:
    # the HBase client libraries load slowly: only the command that needs them imports them
    from pyserver.store.hbase import HBaseStore, parse_thrift_address

    host, port = parse_thrift_address(args.thrift)
    store = HBaseStore(host, port, namespace=args.namespace)
    made = await store.create_tables()
    for table in made:
        print(f"created {table}")
    print(f"the tables of namespace {args.namespace} are in place", file=sys.stderr)
    return 0


def add_parser(
    commands: Any, default_data: Path, user_id: Callable[[str], int]
) -> argparse.ArgumentParser:
    """Add `admin` and its sub-commands to the `pyserver` command line."""
    admin = commands.add_parser("admin", help="operations tools on a cell's data folder")
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, run: Callable[..., Any]) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("--data", type=Path, default=default_data, help="the cell's data folder")
        sub.add_argument("--user", type=user_id, required=True, help="the user id")
        sub.set_defaults(handler=lambda args: asyncio.run(run(args)))
        return sub

    token = action("token", "print a signed user token", _token)
    token.add_argument("--ttl", type=int, default=86_400, help="seconds it stays valid")
    revoke = action("revoke", "revoke a user token, or every token of the user", _revoke)
    revoke.add_argument("--token", help="the token (default: every token issued until now)")
    add_cluster_folder_argument(revoke)
    keys = actions.add_parser("keys", help="list and rotate the service keys")
    keys.add_argument("step", choices=("list", "add", "promote", "retire"))
    keys.add_argument("id", nargs="?", help="the key id (promote, retire)")
    keys.add_argument("--data", type=Path, default=default_data, help="the cell's data folder")
    add_cluster_folder_argument(keys)
    keys.set_defaults(handler=_keys)
    digest = actions.add_parser(
        "zk-digest", help="the ZooKeeper ACL id of user:password (for zookeeper_read_ids)"
    )
    digest.add_argument("credentials", help="user:password")
    digest.set_defaults(handler=_zk_digest)
    action("rebuild", "regenerate a user's image from the log; report drift", _rebuild)
    export = action("export", "write a user's log as JSON lines", _export)
    export.add_argument("--out", help="file (default: standard output)")
    imported = action("import", "append a user's log from JSON lines", _import)
    imported.add_argument("--in", dest="input", help="file (default: standard input)")
    tables = actions.add_parser(
        "create-tables", help="make the HBase store's missing tables (safe to run twice)"
    )
    tables.add_argument("--thrift", default="127.0.0.1:9090", help="HBase's Thrift1 gateway")
    tables.add_argument("--namespace", default="pyserver", help="the store's table-name prefix")
    tables.set_defaults(handler=lambda args: asyncio.run(_create_tables(args)))
    address = action("add-address", "route an email address to a user", _add_address)
    address.add_argument("address")
    add_cluster_folder_argument(address)
    phone = action("add-phone", "register a user's phone (E.164) for SMS", _add_phone)
    phone.add_argument("phone", help="+ and 8-15 digits, e.g. +15550001234")
    phone.add_argument(
        "--sms", choices=("off", "all", "inbox"), help="which of the user's messages are texted"
    )
    add_cluster_folder_argument(phone)

    cluster_tools.add_admin_actions(actions)
    admin_history.add_admin_actions(actions, default_data, user_id)

    discovery_move.add_admin_actions(actions)
    blob_gc.add_admin_action(actions, default_data)
    return admin
