"""Who signs in to the IMAP gateway: a user's address (or id) and one of their user tokens.

LOGIN and AUTHENTICATE PLAIN take the user's address (an address the cell
routes to the user, `u<id>@<mail domain>`, or the bare id) and a user token as
the password (`pyserver admin token`): the token must be valid, not revoked and
the named user's. A refusal is answered NO after `failure_delay_s`, and a peer
address with `max_failures` refusals in the last `failure_window_s` is refused
at once, without checking, until its failures age out.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from pymap.backend.session import BaseSession
from pymap.config import IMAPConfig
from pymap.context import current_command, socket_info
from pymap.exceptions import AuthorizationFailure, InvalidAuth, NotAllowedError
from pymap.interfaces.login import IdentityInterface, LoginInterface
from pymap.parsing.specials import FetchRequirement
from pymap.token import AllTokens
from pymap.user import UserMetadata
from pysasl.creds.server import ServerCredentials

from pyserver.app.auth import UserToken, read_user_token
from pyserver.errors import PyserverError, Unauthenticated
from pyserver.imap.append import MailFiling
from pyserver.imap.derived import DerivedStore
from pyserver.imap.folders import SPECIAL_USE, AppServers, ImapMessage, UserFolders, UserWatch
from pyserver.servicekey import ServiceKey
from pyserver.userid import is_user_id

__all__ = ["ImapLogin", "SignInGuard"]

Resolve = Callable[[str], Awaitable[int | None]]
# peer addresses with recent failures kept before the quiet ones are forgotten
_MAX_PEERS = 100_000


class SignInGuard:
    """Failed sign-ins per peer address, to slow down guessing (module docstring)."""

    def __init__(
        self, max_failures: int = 10, window_s: float = 60.0, delay_s: float = 1.0
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.delay_s = delay_s
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, peer: str, now: float) -> bool:
        failures = self._failures.get(peer)
        if not failures:
            return False
        while failures and now - failures[0] > self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[peer]
        return len(failures) >= self.max_failures

    def failed(self, peer: str, now: float) -> None:
        self._failures.setdefault(peer, deque()).append(now)
        if len(self._failures) > _MAX_PEERS:  # many addresses: forget those gone quiet
            for quiet in [p for p, f in self._failures.items() if now - f[-1] > self.window_s]:
                del self._failures[quiet]


class _TokenCheck:
    """pysasl's view of the account being signed in to: it hands us the password."""

    def __init__(self, authcid: str, check: Callable[[str], bool]) -> None:
        self._authcid = authcid
        self._check = check

    @property
    def authcid(self) -> str:
        return self._authcid

    def compare_authcid(self, authcid: str) -> bool:
        return authcid == self._authcid

    def compare_secret(self, secret: str) -> bool:
        return self._check(secret)

    def get_clear_secret(self) -> str | None:
        return None


class ImapLogin(LoginInterface):
    """pymap's login: user tokens checked as the app servers check them."""

    def __init__(
        self,
        config: IMAPConfig,
        servers: AppServers,
        keys: ServiceKey,
        *,
        resolve: Resolve,
        mail_domain: str,
        revoked: Callable[[UserToken], bool] | None = None,
        guard: SignInGuard | None = None,
        watch: UserWatch | None = None,
        filing: MailFiling | None = None,
        derived: DerivedStore | None = None,
    ) -> None:
        self.config = config
        self.filing = filing
        self.derived = derived or DerivedStore()  # shared by every session (`derived`)
        self.servers = servers
        self._keys = keys
        self._resolve = resolve
        self.mail_domain = mail_domain.lower()
        self._revoked = revoked
        self.guard = guard or SignInGuard()
        self.watch = watch or UserWatch(servers)
        self._tokens = AllTokens(config)

    def for_config(self, config: IMAPConfig) -> ImapLogin:
        """The same sign-in for another listener's settings (one guard, one watch)."""
        return ImapLogin(
            config, self.servers, self._keys, resolve=self._resolve,
            mail_domain=self.mail_domain, revoked=self._revoked, guard=self.guard,
            watch=self.watch, filing=self.filing, derived=self.derived,
        )  # fmt: skip

    @property
    def tokens(self) -> AllTokens:
        return self._tokens

    async def authenticate(self, credentials: ServerCredentials) -> Identity:
        peer = _peer()
        now = time.monotonic()
        if self.guard.blocked(peer, now):
            await asyncio.sleep(self.guard.delay_s)
            raise InvalidAuth("too many failed sign-ins from here: wait a minute")
        user = await self._user_named(credentials.authcid)

        def check(secret: str) -> bool:
            try:
                token = read_user_token(secret.strip(), self._keys, time.time(), self._revoked)
            except Unauthenticated:
                return False
            return token.user == user

        if user is None or not credentials.verify(_TokenCheck(credentials.authcid, check)):
            self.guard.failed(peer, now)
            await asyncio.sleep(self.guard.delay_s)
            raise InvalidAuth()
        return Identity(user, self)

    async def authorize(self, authenticated: IdentityInterface, authzid: str) -> Identity:
        if not isinstance(authenticated, Identity):
            raise AuthorizationFailure()
        # signing in as someone else (authzid) is not allowed: it must name the same user
        if authzid and await self._user_named(authzid) != authenticated.user:
            raise AuthorizationFailure()
        return authenticated

    async def _user_named(self, name: str) -> int | None:
        """The user an address or id names, or None."""
        name = name.strip()
        if name.isascii() and name.isdigit() and len(name) <= 20:
            user = int(name)
            return user if is_user_id(user, minimum=1) else None
        local, at, domain = name.rpartition("@")
        if at and domain.lower() == self.mail_domain and local[:1] in ("u", "U"):
            digits = local[1:]
            if digits.isascii() and digits.isdigit() and len(digits) <= 20:
                return int(digits) if is_user_id(int(digits), minimum=1) else None
        try:
            return await self._resolve(name)
        except PyserverError:
            return None


def _peer() -> str:
    try:
        info = socket_info.get()
    except LookupError:
        return "?"
    peer = info.peername
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class Identity(IdentityInterface):
    """A signed-in user."""

    def __init__(self, user: int, login: ImapLogin) -> None:
        self.user = user
        self.login = login

    @property
    def name(self) -> str:
        return str(self.user)

    @property
    def roles(self) -> frozenset[str]:
        return frozenset()

    @asynccontextmanager
    async def new_session(self) -> AsyncIterator[Session]:
        login = self.login
        folders = login.watch.open(
            self.user,
            lambda: UserFolders(
                login.servers, self.user, login.mail_domain, login.filing, login.derived
            ),
        )
        try:
            yield Session(self.name, self.login.config, folders)
        finally:
            await login.watch.release(folders)

    async def new_token(self, *, expiration: datetime | None = None) -> str | None:
        return None

    async def get(self) -> UserMetadata:
        return UserMetadata(self.login.config, self.name)

    async def set(self, metadata: UserMetadata) -> int | None:
        raise NotAllowedError("accounts are managed by the cell, not over IMAP")

    async def delete(self) -> None:
        raise NotAllowedError("accounts are managed by the cell, not over IMAP")


class Session(BaseSession[ImapMessage]):
    """One IMAP session of a user; LIST adds the folders' SPECIAL-USE attributes."""

    def __init__(self, owner: str, config: IMAPConfig, folders: UserFolders) -> None:
        super().__init__(owner)
        self._config = config
        self._folders = folders

    @property
    def config(self) -> IMAPConfig:
        return self._config

    @property
    def mailbox_set(self) -> UserFolders:
        return self._folders

    async def fetch_messages(self, selected: Any, sequence_set: Any, set_seen: bool) -> Any:
        """pymap loads each message's bytes as it writes its answer, one after another;
        when the FETCH needs them, they are loaded first, many at once."""
        messages, updated = await super().fetch_messages(selected, sequence_set, set_seen)
        attributes = getattr(current_command.get(None), "attributes", ())
        needs = FetchRequirement.reduce(attribute.requirement for attribute in attributes)
        if needs & FetchRequirement.CONTENT:
            await self._folders.source.prefetch(m.message_id for _, m in messages)
        return messages, updated

    async def list_mailboxes(self, *args: Any, **kwargs: Any) -> Any:
        entries, selected = await super().list_mailboxes(*args, **kwargs)
        return [_with_special_use(entry) for entry in entries], selected


def _with_special_use(
    entry: tuple[str, str | None, Sequence[bytes]],
) -> tuple[str, str | None, Iterable[bytes]]:
    name, delimiter, attributes = entry
    special = SPECIAL_USE.get(name)
    return name, delimiter, [*attributes, special] if special else attributes
