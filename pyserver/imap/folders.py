"""A user's folders and messages as pymap's mailbox backend, read from the app servers.

Folders are fixed: INBOX, Other, Archive, Sent and Spam (SPECIAL-USE \\Archive,
\\Sent, \\Junk). A folder's messages are the messages of its threads, with the
UIDs the user's log gives them (FOLDER_MESSAGES: stable, increasing, and the
same after any restart, so UIDVALIDITY never changes). The folder's listing is
read again when the user's mailbox changes (one SUBSCRIBE per signed-in user,
`UserWatch`) or this gateway changed it, so a selected or IDLE-ing client hears
of changes made anywhere. A user's sessions share its folders, kept a while
after the last session ends, so a new session selects a folder unchanged
since without reading its listing again.

What each IMAP change does to the mailbox (docs/imap.md): \\Seen is the message's
read state (MARK_READ / MARK_UNREAD); \\Deleted is kept by the gateway until
EXPUNGE deletes the message (DELETE); MOVE, and COPY, move the message's whole
conversation (a message is in one folder: its thread's). Other flags are
accepted for the session and not kept. APPEND files the mail (pyserver.imap.append).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from pymap.backend.mailbox import MailboxDataInterface, MailboxSetInterface
from pymap.concurrent import Event
from pymap.context import subsystem
from pymap.exceptions import MailboxReadOnly, NotAllowedError
from pymap.flags import FlagOp
from pymap.interfaces.message import CachedMessage
from pymap.listtree import ListTree
from pymap.mailbox import MailboxSnapshot
from pymap.message import BaseLoadedMessage, BaseMessage
from pymap.mime import MessageContent
from pymap.parsing.message import AppendMessage
from pymap.parsing.specials import FetchRequirement, ObjectId
from pymap.parsing.specials.flag import Deleted, Flag, Seen
from pymap.selected import SelectedMailbox, SelectedSet

from pyserver.errors import NotFound, PyserverError
from pyserver.imap.append import NOT_HERE, MailFiling
from pyserver.imap.derived import DerivedStore, Facts, facts_of
from pyserver.imap.render import raw_ref, render_message
from pyserver.imap.structure import LoadedMessage
from pyserver.wire.ops import Op

__all__ = ["FOLDERS", "SPECIAL_USE", "AppServers", "ImapMessage", "UserFolders", "UserWatch"]

log = logging.getLogger(__name__)

# IMAP name -> the mailbox's folder
FOLDERS = {
    "INBOX": "inbox",
    "Other": "other",
    "Archive": "archived",
    "Sent": "sent",
    "Spam": "spam",
}
# RFC 6154 attributes of the folders that have one
SPECIAL_USE = {"Archive": b"Archive", "Sent": b"Sent", "Spam": b"Junk"}
# the flags a message keeps: \Seen in the log, \Deleted here until EXPUNGE
_PERMANENT = frozenset({Seen, Deleted})
_PAGE = 5000
# versions of the folders' listings (FolderView._version), unique across folders
_VERSIONS = itertools.count(1)


class AppServers(Protocol):
    """What the gateway asks of the app servers (a `Client` or a `ClusterClient`)."""

    async def request(
        self, op: int, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]: ...

    def get_blob(
        self, user: int, ref: str, message_id: str | None = None, window: int = 4
    ) -> AsyncIterator[bytes]: ...

    def subscribe(self, user: int) -> Any: ...


class MessageSource:
    """The bytes of one user's messages as a mail client reads them, and what FETCH
    derives from them, kept in the gateway's `DerivedStore` (shared by the user's
    sessions; a session of its own without one): a client reads a message's header,
    then its body, and opens the same folder again and again."""

    def __init__(
        self,
        servers: AppServers,
        user: int,
        domain: str,
        cache_bytes: int = 32 << 20,
        store: DerivedStore | None = None,
    ) -> None:
        self._servers = servers
        self.user = user
        self._domain = domain
        self.store = store if store is not None else DerivedStore(bytes_max=cache_bytes)

    async def content(self, message_id: str) -> bytes:
        data = self.store.body(self.user, message_id)
        if data is not None:
            return data
        data, rendered = await self._load(message_id)
        self.store.keep_body(self.user, message_id, data, rendered=rendered)
        return data

    async def facts(self, message: ImapMessage) -> Facts:
        """The message's size and ENVELOPE (`derived`), derived once from its bytes."""
        facts = self.store.facts(self.user, message.message_id)
        if facts is None:
            try:
                data = await self.content(message.message_id)
            except NotFound:  # deleted meanwhile: an empty message, as `load_content`
                return facts_of(message, b"")
            facts = facts_of(message, data)
            self.store.keep_facts(self.user, message.message_id, facts)
        return facts

    async def prefetch(self, message_ids: Iterable[str], at_once: int = 32) -> None:
        """Load these messages' bytes, `at_once` requests in flight (a FETCH of many
        messages then answers from memory instead of one round trip after another)."""
        store, user = self.store, self.user
        wanted = [m for m in dict.fromkeys(message_ids) if store.body(user, m) is None]
        if not wanted:
            return
        gate = asyncio.Semaphore(at_once)

        async def load(message_id: str) -> None:
            async with gate:
                with contextlib.suppress(NotFound):
                    await self.content(message_id)

        await asyncio.gather(*(load(m) for m in wanted[: self._fits(len(wanted))]))

    def _fits(self, count: int) -> int:
        """How many messages of an average size the cache holds (at least a window)."""
        average = self.store.average_size()
        return max(64, min(count, self.store.bytes_max // max(1, average)))

    async def _load(self, message_id: str) -> tuple[bytes, bool]:
        """The message's bytes, and whether they were drawn from its thread."""
        request = self._servers.request
        message = await request(Op.GET_MESSAGE, {"user": self.user, "message_id": message_id})
        ref = raw_ref(message)
        if ref is not None:  # mail as it came in over SMTP, byte for byte
            return await self._blob(ref, message_id), False
        thread = await request(
            Op.GET_THREAD, {"user": self.user, "thread_id": message["thread_id"], "limit": 1}
        )
        files = (message.get("extra") or {}).get("attachments") or []
        attachments = [(file, await self._blob(file["ref"], message_id)) for file in files]
        rendered = render_message(
            message, thread["participants"], thread.get("addresses") or [], self._domain,
            attachments,
        )  # fmt: skip
        return rendered, True

    async def _blob(self, ref: str, message_id: str) -> bytes:
        pieces = [piece async for piece in self._servers.get_blob(self.user, ref, message_id)]
        return b"".join(pieces)


class ImapMessage(BaseMessage):
    """A message of a folder: its UID, date and flags; its bytes loaded when asked."""

    __slots__ = ["_source", "message_id", "modseq", "pyserver_thread"]

    def __init__(
        self,
        uid: int,
        internal_date: datetime,
        permanent_flags: Iterable[Flag],
        *,
        message_id: str,
        thread_id: str,
        source: MessageSource,
        expunged: bool = False,
        modseq: int = 0,
    ) -> None:
        super().__init__(
            uid, internal_date, permanent_flags, expunged=expunged,
            email_id=ObjectId(message_id.encode()), thread_id=ObjectId(thread_id.encode()),
        )  # fmt: skip
        self.message_id = message_id
        self.pyserver_thread = thread_id
        self._source = source
        self.modseq = modseq  # the log position that last changed it (CONDSTORE's MODSEQ)

    def copy(self, *, expunged: bool) -> ImapMessage:
        return ImapMessage(
            self.uid, self.internal_date, self.permanent_flags, message_id=self.message_id,
            thread_id=self.pyserver_thread, source=self._source, expunged=expunged,
            modseq=self.modseq,
        )  # fmt: skip

    async def load_content(self, requirement: FetchRequirement) -> BaseLoadedMessage:
        content = data = None
        if requirement & FetchRequirement.CONTENT:
            try:
                data = await self._source.content(self.message_id)
            except NotFound:  # deleted meanwhile: an empty message, not a failed FETCH
                data = b""
            content = MessageContent.parse(data)
        return LoadedMessage(self, requirement, content, data)


class FolderView(MailboxDataInterface[ImapMessage]):
    """One folder of one user, as pymap's mailbox data (module docstring)."""

    def __init__(self, owner: UserFolders, name: str) -> None:
        self._owner = owner
        self.name = name
        self.folder = FOLDERS[name]
        self._mailbox_id = ObjectId(f"F{self.folder}".encode())
        self._selected_set = SelectedSet()
        self._updated: Event = subsystem.get().new_event()
        self._messages: dict[int, ImapMessage] = {}
        self._deleted: set[int] = set()  # \Deleted, until EXPUNGE
        self._uid_validity = 1
        self._uid_next = 1
        self.highest_modseq = 0  # the user's log position as last read (HIGHESTMODSEQ)
        # the messages by UID, and a version that changes whenever they or their flags do
        # (a selected mailbox already synchronized with it needs no comparison)
        self._sorted: list[ImapMessage] = []
        self._version = next(_VERSIONS)
        self._stale = True
        self._refreshing = asyncio.Lock()

    # ---- the listing ----

    def changed(self) -> None:
        """The mailbox changed (somewhere): read the listing again before the next answer."""
        self._stale = True
        self._updated.set()

    async def refresh(self) -> None:
        async with self._refreshing:
            if not self._stale:
                return
            self._stale = False
            try:
                listing = await self._list()
            except BaseException:
                self._stale = True
                raise
            source = self._owner.source
            messages: dict[int, ImapMessage] = {}
            for item in listing:
                uid = item["uid"]
                flags = set() if item["unread"] else {Seen}
                if uid in self._deleted:
                    flags.add(Deleted)
                known = self._messages.get(uid)
                if known is not None and known.message_id == item["message_id"]:
                    known.permanent_flags = frozenset(flags)
                    known.modseq = item.get("modseq", 0)
                    messages[uid] = known
                    continue
                when = datetime.fromtimestamp(item["ts"] / 1_000_000, UTC)
                messages[uid] = ImapMessage(
                    uid, when, flags, message_id=item["message_id"],
                    thread_id=item["thread_id"], source=source, modseq=item.get("modseq", 0),
                )  # fmt: skip
            self._messages = messages
            self._sorted = sorted(messages.values(), key=_by_uid)
            self._version = next(_VERSIONS)
            self._deleted &= messages.keys()

    async def _list(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        after = 0
        while True:
            page = await self._owner.request(
                Op.FOLDER_MESSAGES,
                {"folder": self.folder, "after_uid": after, "limit": _PAGE},
            )
            found += page["messages"]
            self._uid_validity, self._uid_next = page["uid_validity"], page["uid_next"]
            self.highest_modseq = page.get("seq", 0)
            if not page["more"] or not page["messages"]:
                return found
            after = page["messages"][-1]["uid"]

    # ---- pymap's interface ----

    @property
    def mailbox_id(self) -> ObjectId:
        return self._mailbox_id

    @property
    def readonly(self) -> bool:
        return False

    @property
    def uid_validity(self) -> int:
        return self._uid_validity

    @property
    def uid_next(self) -> int:
        return self._uid_next

    @property
    def permanent_flags(self) -> frozenset[Flag]:
        return _PERMANENT

    @property
    def session_flags(self) -> frozenset[Flag]:
        return frozenset()

    @property
    def selected_set(self) -> SelectedSet:
        return self._selected_set

    async def update_selected(
        self, selected: SelectedMailbox, *, wait_on: Event | None = None
    ) -> SelectedMailbox:
        # a change already heard of (while nobody waited, or during the last refresh) set
        # `_updated` before this wait's event listened to it: report it without waiting
        if wait_on is not None and not self._stale:
            await wait_on.or_event(self._updated).wait()
        await self.refresh()
        if selected.mod_sequence != self._version:
            selected.set_messages(self._sorted)
            selected.mod_sequence = self._version
        return selected

    async def append(self, append_msg: AppendMessage, *, recent: bool = False) -> ImapMessage:
        filing = self._owner.filing
        if filing is None:
            raise MailboxReadOnly(self.name)
        seen = Seen in append_msg.flag_set
        user = self._owner.user
        filed = await filing.file(user, self.name, self.folder, append_msg.literal, seen)
        self._owner.changed()
        await self.refresh()
        uid = self.uid_of(filed.message_id)
        if uid is not None and Deleted in append_msg.flag_set:
            self._deleted.add(uid)
            self._messages[uid].permanent_flags |= {Deleted}
            self._version = next(_VERSIONS)
        return ImapMessage(
            uid or NOT_HERE, append_msg.when or datetime.now(UTC), {Seen} if seen else (),
            message_id=filed.message_id, thread_id=filed.thread_id, source=self._owner.source,
        )  # fmt: skip

    async def copy(self, uid: int, destination: FolderView, *, recent: bool = False) -> int | None:
        # A message is in one folder, its thread's: copying files the conversation there.
        return await self.move(uid, destination, recent=recent)

    async def move(self, uid: int, destination: FolderView, *, recent: bool = False) -> int | None:
        await self.refresh()
        message = self._messages.get(uid)
        if message is None:
            return None
        if destination.folder != self.folder:
            await self._owner.request(
                Op.MOVE, {"thread_id": message.pyserver_thread, "folder": destination.folder}
            )
            self._owner.changed()
        await destination.refresh()
        return destination.uid_of(message.message_id)

    def current(self, uid: int) -> ImapMessage | None:
        """The message of a UID as the folder was last read, if it is still there."""
        return self._messages.get(uid)

    def uid_of(self, message_id: str) -> int | None:
        return next((u for u, m in self._messages.items() if m.message_id == message_id), None)

    async def get(self, uid: int, cached_msg: CachedMessage) -> ImapMessage:
        await self.refresh()  # a command answers from the mailbox as it is now
        message = self._messages.get(uid)
        if message is not None:
            return message
        if not isinstance(cached_msg, ImapMessage):
            raise TypeError(cached_msg)
        return cached_msg.copy(expunged=True)

    async def update(
        self, uid: int, cached_msg: CachedMessage, flag_set: frozenset[Flag], mode: FlagOp
    ) -> ImapMessage:
        message = await self.get(uid, cached_msg)
        if message.expunged:
            return message
        before = message.permanent_flags
        after = frozenset(mode.apply(before, flag_set)) & _PERMANENT
        if (Seen in after) != (Seen in before):
            op = Op.MARK_READ if Seen in after else Op.MARK_UNREAD
            payload = {"thread_id": message.pyserver_thread, "message_id": message.message_id}
            await self._owner.request(op, payload)
        if Deleted in after:
            self._deleted.add(uid)
        else:
            self._deleted.discard(uid)
        message.permanent_flags = after
        self._version = next(_VERSIONS)
        if (Seen in after) != (Seen in before):
            self._owner.changed()  # the user's other sessions see it at their next command
        else:
            self._updated.set()
        return message

    async def delete(self, uids: Iterable[int]) -> None:
        await self.refresh()
        for uid in uids:
            message = self._messages.get(uid)
            if message is None:  # moved or deleted meanwhile: nothing of it is here
                continue
            payload = {"thread_id": message.pyserver_thread, "message_id": message.message_id}
            with contextlib.suppress(NotFound):
                await self._owner.request(Op.DELETE, payload)
            self._deleted.discard(uid)
        self._owner.changed()
        await self.refresh()

    async def claim_recent(self, selected: SelectedMailbox) -> None:
        return None

    async def cleanup(self) -> None:
        return None

    async def snapshot(self) -> MailboxSnapshot:
        await self.refresh()
        exists = unseen = 0
        first_unseen: int | None = None
        for message in self._sorted:
            exists += 1
            if Seen not in message.permanent_flags:
                unseen += 1
                first_unseen = first_unseen or exists
        return MailboxSnapshot(
            self.mailbox_id, self.readonly, self.uid_validity, self.permanent_flags,
            self.session_flags, exists, 0, unseen, first_unseen, self._uid_next,
        )  # fmt: skip


def _by_uid(message: ImapMessage) -> int:
    return message.uid


class UserFolders(MailboxSetInterface[FolderView]):
    """The fixed folders of one signed-in user."""

    def __init__(
        self,
        servers: AppServers,
        user: int,
        domain: str,
        filing: MailFiling | None = None,
        derived: DerivedStore | None = None,
    ) -> None:
        self._servers = servers
        self.user = user
        self.filing = filing  # APPEND (None: refused)
        self.source = MessageSource(servers, user, domain, store=derived)
        self._views = {name: FolderView(self, name) for name in FOLDERS}
        self._subscribed = set(FOLDERS)
        # told of this session's own changes: the user's other sessions on this gateway
        # must see them at their next command, not when the mailbox's event arrives
        self.on_change: Callable[[], None] | None = None

    async def request(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._servers.request(op, {"user": self.user, **payload})

    def changed(self) -> None:
        """This session changed the mailbox: every session of the user reads it again."""
        if self.on_change is not None:
            self.on_change()
        else:
            self.mark_changed()

    def mark_changed(self) -> None:
        self.source.store.forget_rendered(self.user)
        for view in self._views.values():
            view.changed()

    @property
    def delimiter(self) -> str:
        return "/"

    async def set_subscribed(self, name: str, subscribed: bool) -> None:
        if subscribed:
            self._subscribed.add(name)
        else:
            self._subscribed.discard(name)

    async def list_subscribed(self) -> ListTree:
        names = [name for name in FOLDERS if name in self._subscribed]
        return ListTree(self.delimiter).update(*names)

    async def list_mailboxes(self) -> ListTree:
        return ListTree(self.delimiter).update(*FOLDERS)

    async def get_mailbox(self, name: str) -> FolderView:
        canonical = "INBOX" if name.upper() == "INBOX" else name
        return self._views[canonical]  # KeyError: no such folder

    async def add_mailbox(self, name: str) -> ObjectId:
        raise NotAllowedError("folders are fixed: INBOX, Other, Archive, Sent, Spam")

    async def delete_mailbox(self, name: str) -> None:
        raise NotAllowedError("folders are fixed: INBOX, Other, Archive, Sent, Spam")

    async def rename_mailbox(self, before: str, after: str) -> None:
        raise NotAllowedError("folders are fixed: INBOX, Other, Archive, Sent, Spam")


class UserWatch:
    """The folders of each signed-in user, shared by that user's IMAP sessions (as
    pymap's own backends share a user's mailboxes), with one SUBSCRIBE per user: any
    event of the mailbox marks them changed (a selected or IDLE-ing client hears).

    A user's folders, their listings and the subscription that keeps them current
    outlive the user's last session by `linger_s` (at most `keep_idle` users so kept):
    a client that signs in again soon, as mail clients do for every sync, selects a
    folder without reading its listing again when nothing changed meanwhile."""

    def __init__(
        self, servers: AppServers, *, linger_s: float = 120.0, keep_idle: int = 1000
    ) -> None:
        self._servers = servers
        self.linger_s = linger_s
        self.keep_idle = keep_idle
        self._folders: dict[int, UserFolders] = {}
        self._sessions: dict[int, int] = {}
        # users with no session left, oldest first: when each is let go
        self._idle: dict[int, asyncio.TimerHandle] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def open(self, user: int, make: Callable[[], UserFolders]) -> UserFolders:
        """The user's folders for a new session (made with `make` if not kept)."""
        idle = self._idle.pop(user, None)
        if idle is not None:
            idle.cancel()
        folders = self._folders.get(user)
        if folders is None:
            folders = self._folders[user] = make()
            folders.on_change = lambda: self._changed(user)
            self._tasks[user] = asyncio.get_running_loop().create_task(self._follow(user))
        self._sessions[user] = self._sessions.get(user, 0) + 1
        return folders

    async def release(self, folders: UserFolders) -> None:
        """A session of the user ended: its folders are kept for `linger_s` after the last."""
        user = folders.user
        left = self._sessions.get(user, 1) - 1
        if left > 0:
            self._sessions[user] = left
            return
        self._sessions.pop(user, None)
        if self.linger_s <= 0:
            await self._drop(user)
            return
        loop = asyncio.get_running_loop()
        self._idle[user] = loop.call_later(
            self.linger_s, lambda: loop.create_task(self._drop(user, idle=True))
        )
        while len(self._idle) > self.keep_idle:
            oldest = next(iter(self._idle))
            self._idle.pop(oldest).cancel()
            await self._drop(oldest)

    async def _drop(self, user: int, *, idle: bool = False) -> None:
        if idle and self._idle.pop(user, None) is None:
            return  # signed in again meanwhile
        self._folders.pop(user, None)
        task = self._tasks.pop(user, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        for handle in self._idle.values():
            handle.cancel()
        self._idle.clear()
        self._sessions.clear()
        for user in list(self._folders):
            await self._drop(user)

    async def _follow(self, user: int) -> None:
        while True:
            try:
                async with self._servers.subscribe(user) as events:
                    self._changed(user)  # whatever happened while not subscribed
                    async for _event in events:
                        self._changed(user)
            except asyncio.CancelledError:
                raise
            except PyserverError as error:
                log.info("imap: events of user %d interrupted: %s", user, error)
            await asyncio.sleep(0.5)

    def _changed(self, user: int) -> None:
        folders = self._folders.get(user)
        if folders is not None:
            folders.mark_changed()
