"""APPEND: a mail a user's mail client stores in one of their folders, filed in their mailbox.

A client APPENDs to Sent the mail it has just sent, and mbsync APPENDs every
new message of a Maildir folder. `MailFiling.file` checks the bytes are a
message (`BadMessage` names what is wrong: empty, NUL bytes, no header
fields), keeps them in the blob store with the MTA proxy's own
`pyserver.mta.intake.store_mail` (raw bytes, attachments, a long body), and
files the email object it builds:

- **Sent**: a SEND of the user (the From is the user's, whatever it says) to
  the users and outside addresses of its To, Cc and Bcc, with the email object
  as the sender's copy's `extra` (so FETCH BODY[] gives the appended bytes back,
  byte for byte) and `relay` false: users of the system get their copy as from
  any send, and nothing is mailed out again (the client sent it already). The
  conversation is that of its participants; the Message-ID is the SEND's key,
  so the same mail sent through submission, or appended twice, is one message.
- **any other folder**: a DELIVER to the user alone (from the From address, or
  from the user when the From is theirs), filed in that folder when its
  conversation is new; a conversation the user has keeps its folder.

pymap asks `FolderView.append` (pyserver.imap.folders), which calls `file` and
answers the message's UID in the folder (UIDPLUS APPENDUID); a message whose
conversation lives in another folder has no UID here, and the OK then carries
no APPENDUID (`apply` teaches pymap that). A refusal is an `AppendFailure`: NO
with the reason, [UNAVAILABLE] when trying again may help.

May import: pyserver.mta (its public parsing and storing functions), the wire
ops, pymap's exceptions and response codes; not the rest of the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, Protocol

from pymap.exceptions import AppendFailure
from pymap.imap.state import ConnectionState
from pymap.parsing.response import ResponseCode
from pymap.parsing.response.code import AppendUid

from pyserver.blobs.base import BlobStore
from pyserver.errors import BadRequest, Forbidden, PyserverError, TooLarge
from pyserver.mta.emailobject import EmailObject
from pyserver.mta.intake import MtaSettings, store_mail
from pyserver.mta.outbound import user_of_address
from pyserver.wire.ops import Op

__all__ = ["BadMessage", "Filed", "MailFiling", "apply"]

log = logging.getLogger(__name__)

# the UID of a message APPENDed to a folder it did not land in (its conversation's is
# another): pymap is told "no UID" with it, and the OK carries no APPENDUID
NOT_HERE = 0
_RECIPIENT_HEADERS = ("to", "cc", "bcc")


class BadMessage(ValueError):
    """The bytes APPENDed are not a message the mailbox can keep (the reason says why)."""


class _Requests(Protocol):
    async def request(
        self, op: int, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Filed:
    """Where an APPENDed mail went: its message and thread, and whether it was there."""

    message_id: str
    thread_id: str
    duplicate: bool


def check_message(raw: bytes) -> None:
    """Raise BadMessage unless `raw` is an RFC 5322 message: not empty, no NUL byte (RFC
    3501's CHAR8), and starting with header fields."""
    if not raw.strip():
        raise BadMessage("the message is empty")
    if b"\0" in raw:
        raise BadMessage("the message holds a NUL byte")
    first = raw.split(b"\n", 1)[0]
    name, colon, _ = first.partition(b":")
    if not colon or not name or any(c <= 32 or c >= 127 for c in name):
        raise BadMessage("the message does not start with a header field (Name: value)")


def named_addresses(raw: bytes, headers: Iterable[str]) -> list[str]:
    """The addresses the given header fields of a message name, in order, each once."""
    message = BytesHeaderParser(policy=compat32).parsebytes(raw)
    values: list[str] = []
    for name in headers:
        values += [str(value) for value in message.get_all(name, [])]
    found: dict[str, str] = {}
    for _, address in getaddresses(values):
        address = address.strip()
        if "@" in address and len(address) <= 254 and not any(c.isspace() for c in address):
            found.setdefault(address.casefold(), address)
    return list(found.values())


class MailFiling:
    """Files APPENDed mail in users' mailboxes (the module docstring)."""

    def __init__(
        self,
        servers: _Requests,
        blobs: BlobStore,
        resolve: Callable[[str], Awaitable[int | None]],
        settings: MtaSettings,
    ) -> None:
        self._servers = servers
        self._blobs = blobs
        self._resolve = resolve
        self._settings = settings

    async def file(self, user: int, mailbox: str, folder: str, raw: bytes, seen: bool) -> Filed:
        """File `raw` in `user`'s `folder` (IMAP name `mailbox`), read if `seen`; raises
        pymap's AppendFailure (NO with the reason), never anything else."""
        try:
            return await self._file(user, folder, raw, seen)
        except BadMessage as refusal:
            raise AppendFailure(mailbox, str(refusal).encode(), _code(b"CANNOT")) from None
        except (BadRequest, TooLarge, Forbidden) as refusal:
            why = " ".join(str(refusal).split())[:200]
            raise AppendFailure(mailbox, why.encode(), _code(b"CANNOT")) from None
        except (PyserverError, OSError) as failure:
            log.warning("imap: APPEND of user %d deferred: %r", user, failure)
            why = b"the message could not be stored now, try again"
            raise AppendFailure(mailbox, why, _code(b"UNAVAILABLE")) from None
        except Exception:
            log.exception("imap: APPEND of %d bytes for user %d failed", len(raw), user)
            raise AppendFailure(mailbox, b"internal error", _code(b"SERVERBUG")) from None

    async def _file(self, user: int, folder: str, raw: bytes, seen: bool) -> Filed:
        check_message(raw)
        email = await store_mail(raw, None, self._blobs, self._settings)
        if folder == "sent":
            reply = await self._sent(user, raw, email)
            filed = Filed(reply["message_id"], reply["thread_id"], reply["duplicate"])
            unread = False
        else:
            reply = await self._kept(user, folder, raw, email)
            if reply.get("dropped") or not reply.get("message_id"):
                raise BadMessage("the mailbox did not keep the message")
            filed = Filed(reply["message_id"], reply["thread_id"], reply["duplicate"])
            unread = True
        if not filed.duplicate and unread == seen:  # the flags the client gave
            op = Op.MARK_READ if seen else Op.MARK_UNREAD
            payload = {"user": user, "thread_id": filed.thread_id, "message_id": filed.message_id}
            await self._servers.request(op, payload)
        return filed

    async def _user_of(self, address: str) -> int | None:
        own = user_of_address(address, self._settings.mail_domain)
        return own if own is not None else await self._resolve(address)

    async def _sent(self, user: int, raw: bytes, email: EmailObject) -> dict[str, Any]:
        """The user's SEND of a mail their client sent already (nothing goes out again)."""
        recipients: list[int | str] = []
        for address in named_addresses(raw, _RECIPIENT_HEADERS):
            found = await self._user_of(address)
            if found is None:
                recipients.append(address)
            elif found != user and found not in recipients:
                recipients.append(found)
        if not recipients:
            raise BadMessage("a sent mail must name a recipient other than you (To, Cc, Bcc)")
        payload: dict[str, Any] = {
            "sender": user,
            "recipients": recipients,
            "channel": "email",
            "text": email.text,
            "subject": email.subject,
            "key": email.key,
            "extra": email.extra,
            "relay": False,
        }
        if email.attachments:
            payload["attachments"] = email.attachments
        return await self._servers.request(Op.SEND, payload)

    async def _kept(self, user: int, folder: str, raw: bytes, email: EmailObject) -> dict[str, Any]:
        """The mail into the user's own mailbox alone (DELIVER), in `folder` if its
        conversation is new."""
        sender = 0
        if "@" in email.sender and await self._user_of(email.sender) == user:
            sender = user
        participants = {user}
        for address in named_addresses(raw, ("to", "cc")):
            found = await self._user_of(address)
            if found is not None:
                participants.add(found)
        payload = email.deliver_payload(user, participants)
        payload.update(sender=sender, folder=folder)
        return await self._servers.request(Op.DELIVER, payload)


def _code(name: bytes) -> ResponseCode:
    return ResponseCode.of(name)


def apply() -> None:
    """Teach pymap's APPEND that a message with no UID in the folder (`NOT_HERE`) is
    answered OK without APPENDUID (RFC 4315 gives UIDs in the destination only)."""
    original = ConnectionState.do_append
    if getattr(original, "pyserver_corrected", False):
        return

    async def do_append(self: ConnectionState, cmd: Any) -> Any:
        response, updates = await original(self, cmd)
        code = getattr(response, "_code", None)
        if isinstance(code, AppendUid) and NOT_HERE in code.uids:
            response._code = None
            response._raw = None
        return response, updates

    do_append.pyserver_corrected = True  # type: ignore[attr-defined]
    ConnectionState.do_append = do_append  # type: ignore[method-assign]
