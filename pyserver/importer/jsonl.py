"""JSON lines of messages of any channel: one message per line, into the mailboxes of its users.

A line is a JSON object (docs/import.md has the fields): `id` (the idempotency
key), `from` and `to` (user ids, email addresses or phone numbers), `channel`,
`ts`, `subject`, `text`, and optionally `user` (the one mailbox the line is a
copy for; without it, every user among `from` and `to` gets a copy), `folder`,
`read`, `in_reply_to` (another line's id) and `attachments` (files, by path
relative to the JSON-lines file, which go to the blob store).

`scan` reads the file once, for the users whose mailboxes it feeds and the
byte offsets of their lines; `user_records` reads one user's lines again and
makes the records (every check a line can fail is a rejection with a reason).
"""

from __future__ import annotations

import mimetypes
import mmap
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from pyserver.importer.attachments import Attachments
from pyserver.importer.mail import AddressBook
from pyserver.importer.records import ImportRecord, Rejected, timestamp_us
from pyserver.logcodec import CHANNELS, FOLDERS
from pyserver.userid import is_user_id

__all__ = ["JsonLinesSource", "scan"]

_MAX_FIELD_CHARS = 4 << 10
_MAX_TEXT_BYTES = 256 << 10
_MAX_PEOPLE = 100
_MAX_ATTACHMENTS = 100


def _where(path: str, line: int) -> str:
    return f"{path}:{line}"


def scan(path: str) -> tuple[dict[int, list[tuple[int, int]]], list[Rejected]]:
    """{user: [(line number, byte offset), ...]} of the lines each user's mailbox gets, and
    the lines that are not a message at all. OSError if the file cannot be read."""
    owners: dict[int, list[tuple[int, int]]] = defaultdict(list)
    rejected: list[Rejected] = []
    with open(path, "rb") as source:
        offset = 0
        for number, line in enumerate(source, start=1):
            at, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                rejected.append(Rejected(_where(path, number), f"not JSON: {exc}"))
                continue
            users = _owners(item)
            if isinstance(users, str):
                rejected.append(Rejected(_where(path, number), users))
                continue
            for user in users:
                owners[user].append((number, at))
    return dict(owners), rejected


def _owners(item: Any) -> list[int] | str:
    """The users whose mailboxes get a copy of the line, or why it has none."""
    if not isinstance(item, dict):
        return "not a JSON object"
    if "user" in item:
        return (
            [item["user"]]
            if is_user_id(item["user"]) and item["user"] > 0
            else (f"user: {item['user']!r} is not a user id")
        )
    people = (
        [item.get("from"), *(item.get("to") or [])] if isinstance(item.get("to", []), list) else []
    )
    users = sorted({p for p in people if is_user_id(p) and p > 0})
    return users or "no user among from and to: whose mailbox is it?"


class JsonLinesSource:
    """Reads one user's lines of a JSON-lines file into records."""

    def __init__(self, path: str, attachments: Attachments, book: AddressBook) -> None:
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.attachments = attachments
        self.book = book
        self._map: mmap.mmap | None = None

    def lines(self, places: list[tuple[int, int]]) -> Iterator[tuple[str, bytes]]:
        """(where, line bytes) of these (line number, offset) places."""
        if self._map is None:  # the file mapped once: a user's lines are anywhere in it
            with open(self.path, "rb") as source:
                self._map = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
        data = self._map
        for number, offset in places:
            end = data.find(b"\n", offset)
            yield _where(self.path, number), data[offset : len(data) if end < 0 else end]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    async def record(self, user: int, where: str, line: bytes) -> ImportRecord | Rejected:
        """The record of one line for `user`'s mailbox, or why there is none."""
        try:
            item = orjson.loads(line)
            return await self._record(user, where, item, len(line))
        except (orjson.JSONDecodeError, _Refused) as exc:
            return Rejected(where, str(exc))

    async def _record(self, user: int, where: str, item: Any, size: int) -> ImportRecord:
        if not isinstance(item, dict):
            raise _Refused("not a JSON object")
        key = _string(item, "id", required=True)
        if not key:
            raise _Refused("id: must not be empty")
        channel = item.get("channel", "chat")
        if channel not in CHANNELS:
            raise _Refused(f"channel: must be one of {', '.join(CHANNELS)}, not {channel!r}")
        ts = timestamp_us(item.get("ts"))
        if ts is None:
            raise _Refused(f"ts: {item.get('ts')!r} is not a time (Unix seconds or ISO 8601)")
        text = item.get("text")
        if not isinstance(text, str):
            raise _Refused("text: required, a string")
        if (
            len(text) * 4 > _MAX_TEXT_BYTES
            and len(text.encode("utf-8", "replace")) > _MAX_TEXT_BYTES
        ):
            raise _Refused(f"text: over the limit of {_MAX_TEXT_BYTES} bytes")
        subject = _string(item, "subject")
        to = item.get("to", [])
        if not isinstance(to, list) or len(to) > _MAX_PEOPLE:
            raise _Refused(f"to: must be a list of at most {_MAX_PEOPLE} users or addresses")
        sender, sender_address = await self._person(item.get("from"), "from")
        participants = {user}
        outside: dict[str, str] = {}
        if sender:
            participants.add(sender)
        elif sender_address:
            outside[sender_address.casefold()] = sender_address
        for person in to:
            if type(person) is int and person > 0 and is_user_id(person):  # the common case
                participants.add(person)
                continue
            someone, address = await self._person(person, "to")
            if someone:
                participants.add(someone)
            elif address:
                outside.setdefault(address.casefold(), address)
        own = sender == user
        folder = item.get("folder", "sent" if own else "inbox")
        if folder not in FOLDERS:
            raise _Refused(f"folder: must be one of {', '.join(FOLDERS)}, not {folder!r}")
        read = item.get("read", True)
        if not isinstance(read, bool):
            raise _Refused("read: must be true or false")
        reply = item.get("in_reply_to")
        if reply is not None and not isinstance(reply, str):
            raise _Refused("in_reply_to: must be the id of another line")
        extra: dict[str, Any] = {}
        if "attachments" in item:
            attachments = await self._attachments(item["attachments"])
            if attachments:
                extra["attachments"] = attachments
        if outside and own:
            extra["to_addresses"] = sorted(outside.values(), key=str.casefold)
        return ImportRecord(
            user=user,
            key=key,
            where=where,
            channel=channel,
            sender=sender,
            sender_address=sender_address,
            participants=tuple(sorted(participants)),
            addresses=tuple(sorted(outside.values(), key=str.casefold)),
            folder=folder,
            unread=not read and not own,
            ts=ts,
            subject=subject,
            text=text,
            extra=extra,
            reply_to=(reply,) if reply else (),
            size=size,
        )

    async def _person(self, value: Any, name: str) -> tuple[int, str | None]:
        """(user, address) of a from/to item: a user id, or an address (a user's, if known)."""
        if is_user_id(value) and value > 0:
            return value, None
        if isinstance(value, str) and value.strip() and len(value) <= 254:
            address = value.strip()
            if "@" not in address and not (address.startswith("+") and address[1:].isdigit()):
                raise _Refused(f"{name}: {value!r} is neither a user id, an address nor a phone")
            return (await self.book.user_of(address)) or 0, address
        raise _Refused(f"{name}: {value!r} is neither a user id, an address nor a phone")

    async def _attachments(self, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or len(value) > _MAX_ATTACHMENTS:
            raise _Refused(f"attachments: must be a list of at most {_MAX_ATTACHMENTS} files")
        found = []
        for item in value:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise _Refused("attachments: each must be an object with a path")
            file = Path(os.path.normpath(os.path.join(self.folder, item["path"])))
            if not str(file).startswith(self.folder + os.sep):
                raise _Refused(f"attachments: {item['path']!r} is outside the file's folder")
            try:
                blob = await self.attachments.add_file(file)
            except OSError as exc:
                raise _Refused(f"attachments: {item['path']!r}: {exc.strerror or exc}") from None
            name = item.get("name") if isinstance(item.get("name"), str) else file.name
            kind = item.get("type")
            if not isinstance(kind, str) or not kind:
                kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            found.append(
                {"ref": blob.ref, "name": name[:255], "type": kind[:255], "size": blob.size}
            )
        return found


class _Refused(ValueError):
    """A line that cannot be a message, and why."""


def _string(item: dict[str, Any], name: str, required: bool = False) -> str:
    value = item.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _Refused(f"{name}: {'required, ' if required else ''}a string")
    if len(value) > _MAX_FIELD_CHARS:
        raise _Refused(f"{name}: over {_MAX_FIELD_CHARS} characters")
    return value
