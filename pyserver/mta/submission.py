"""SMTP submission for mail clients: a user sends mail as themselves, and it is their SEND.

A port of its own (`--submission-port`, RFC 6409): STARTTLS first, then AUTH
PLAIN or LOGIN with the user's address (a registered one, or
`u<user>@<mail_domain>`) and a user token as the password, as for IMAP; nothing
is accepted before. Each mail becomes a SEND of the authenticated user, to the
users and the outside addresses of its envelope: the sender's copy is stored in
their conversation at once, users get theirs, and the outbox relays the rest
(pyserver.app.outbox). The From is the user's whatever the mail says; the
subject and the text body are kept, the Message-ID is the SEND's key (a client
that sends twice sends once). Its attachments go to the blob store and out with
the mail.

`verify_token(token) -> user id` (ValueError when the token is not valid) is
given by the process, which holds the service key.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from pyserver.blobs.base import BlobStore
from pyserver.errors import BadRequest, PyserverError
from pyserver.mta.outbound import resolve_user
from pyserver.mta.parse import parse_mail
from pyserver.mta.route import OwnerRoute
from pyserver.mta.smtp import MtaProxy, SmtpSession
from pyserver.store.base import AddressStore
from pyserver.wire.ops import Op

__all__ = ["SubmissionProxy"]

log = logging.getLogger(__name__)

_MAX_RECIPIENTS = 100


@dataclass(slots=True)
class _Login:
    """Who a session authenticated as: the token's user, the login address it gave, and
    whether that address was found to be the user's."""

    user: int
    address: str
    checked: bool = False


class _Submission:
    """aiosmtpd's hooks on the submission port: AUTH, RCPT and DATA."""

    def __init__(
        self,
        addresses: AddressStore,
        route: OwnerRoute,
        verify_token: Callable[[str], int],
        mail_domain: str,
        blobs: BlobStore,
    ) -> None:
        self._addresses = addresses
        self._blobs = blobs
        self._route = route
        self._verify_token = verify_token
        self._mail_domain = mail_domain

    async def _user_of(self, address: str) -> int | None:
        try:
            return await resolve_user(address, self._addresses, self._mail_domain)
        except BadRequest:
            return None

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd calls this synchronously: the token decides who the user is; that the
        login address is that user's is checked at MAIL (it needs a lookup)."""
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        try:
            user = self._verify_token(data.password.decode("utf-8", "replace"))
        except ValueError:
            return AuthResult(success=False, handled=False)
        login = data.login.decode("utf-8", "replace")
        return AuthResult(success=True, auth_data=_Login(user, login))

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        login = session.auth_data
        if not isinstance(login, _Login):
            return "530 5.7.0 Authentication required"
        if not login.checked:
            try:
                claimed = await self._user_of(login.address)
            except PyserverError:
                return "451 4.3.0 Address lookup failed, try again later"
            if claimed != login.user:  # the login address must be the token's user's
                session.auth_data = None
                session.authenticated = False
                return "535 5.7.8 Authentication credentials invalid"
            login.checked = True
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if len(envelope.rcpt_tos) >= _MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = session.auth_data
        if not isinstance(login, _Login) or not login.checked:
            return "530 5.7.0 Authentication required"
        sender = login.user
        raw = envelope.original_content or b""
        try:
            mail = parse_mail(raw)
            recipients: list[int | str] = []
            for address in envelope.rcpt_tos:
                user = await self._user_of(address)
                recipients.append(user if user is not None else address.strip().strip("<>"))
            attachments = []
            for attachment in mail.attachments:
                stored = await self._blobs.put(attachment.pieces())
                attachments.append({"ref": stored.ref, "name": attachment.name[:255],
                                    "type": attachment.content_type,
                                    "size": stored.size})  # fmt: skip
            payload = {"sender": sender, "recipients": recipients, "channel": "email",
                       "text": mail.text, "subject": mail.subject[:4000]}  # fmt: skip
            if attachments:
                payload["attachments"] = attachments
            if mail.message_id:
                payload["key"] = mail.message_id[:4000]
            reply = await self._route.request(Op.SEND, payload)
        except BadRequest as error:
            return f"554 5.6.0 Message refused: {' '.join(str(error).split())[:200]}"
        except PyserverError as error:
            log.warning("submission from user %d deferred: %r", sender, error)
            return "451 4.3.0 Could not take the message now, try again later"
        except Exception:
            log.exception("submission of %d bytes failed", len(raw))
            return "451 4.3.0 Internal error, try again later"
        return f"250 2.0.0 OK queued as {reply['message_id']}"

    async def handle_exception(self, error: Exception) -> str:
        log.exception("submission session error", exc_info=error)
        return "451 4.3.0 Internal error, try again later"


class SubmissionProxy(MtaProxy):
    """The submission listener: STARTTLS with `tls`, then AUTH, required."""

    def __init__(
        self,
        addresses: AddressStore,
        route: OwnerRoute,
        verify_token: Callable[[str], int],
        tls: ssl.SSLContext,
        *,
        blobs: BlobStore,
        mail_domain: str,
        max_mail_bytes: int = 80 << 20,
        hostname: str = "pyserver",
        timeout_s: float = 300,
    ) -> None:
        self._submission = _Submission(addresses, route, verify_token, mail_domain, blobs)
        self._tls = tls
        self._max_mail_bytes = max_mail_bytes
        super().__init__(None, hostname=hostname, timeout_s=timeout_s)  # type: ignore[arg-type]
        self._handler = self._submission  # type: ignore[assignment]

    def _session(self) -> SmtpSession:
        session = SmtpSession(
            self._submission,
            data_size_limit=self._max_mail_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self._hostname,
            ident="pyserver submission",
            timeout=self._timeout_s,
            tls_context=self._tls,
            require_starttls=True,
            auth_required=True,
            authenticator=self._submission.authenticate,
            auth_exclude_mechanism=["CRAM-MD5"],
        )
        self._sessions.add(session)
        return session
