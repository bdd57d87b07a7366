"""Who is signed in to the web tier: session cookies, sign-in tokens and CSRF tokens.

Owns the web tier's credential formats, all signed with a secret derived from
the cell's current service key (so every web process of a cluster, and a restarted
one, reads the others' cookies; a leaked session secret reveals nothing of the
key), and read under the secret of any key still accepted (keys rotate):

1. A person signs in with a user token (`pyserver admin token`, verified as the
   app server's HELLO does, `pyserver.app.auth`).
2. The tier answers with a session cookie
   `v2.<user>.<expiry>.<issued>.<token id>.<nonce>.<signature>`: HttpOnly,
   SameSite=Strict, expiring with the session (`lifetime_s`, never past the
   token's own expiry). `signature` is the hex HMAC-SHA256 of the rest. The
   token's issue time and id are kept so that revoking the token
   (`pyserver admin revoke`) ends its sessions too (`revoked`).
3. Every form and state-changing request carries the session's CSRF token, the
   HMAC of `"csrf." + nonce`: a page of another site can neither read it nor
   guess it, and it changes with every sign-in.
4. Signing out forgets the nonce: the cookie is refused by this process from then
   on, even if a copy of it was kept (until it would have expired anyway).

The login form has its own CSRF token, bound to a short-lived pre-session cookie
(`login_nonce`), so a page of another site cannot sign a browser in as someone else.
Calls the standard library, `pyserver.app.auth` and `pyserver.servicekey` only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyserver.app.auth import UserToken, read_user_token
from pyserver.servicekey import ServiceKey, as_service_keys

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "SessionKeeper", "WebSession"]

SESSION_COOKIE = "pyserver_session"
LOGIN_COOKIE = "pyserver_login"
_VERSION = "v2"
_MAX_COOKIE = 220  # seven short fields; anything longer is not ours


@dataclass(frozen=True, slots=True)
class WebSession:
    """A signed-in browser: its user, when the session ends, and its CSRF token."""

    user: int
    expires_at: int
    nonce: str
    csrf: str
    # what revoking the sign-in token looks at: its user, issue time and id (the key id
    # is not kept, and `expires_at` is the session's)
    token: UserToken


class SessionKeeper:
    """Issues and reads the web tier's cookies (see the module docstring)."""

    def __init__(
        self,
        service_key: ServiceKey,
        *,
        lifetime_s: int = 7 * 86_400,
        clock: Callable[[], float] = time.time,
        revoked: Callable[[UserToken], bool] | None = None,
    ) -> None:
        if not service_key:
            raise ValueError("the web tier needs the cell's service key")
        self._keys = as_service_keys(service_key)
        # whether a sign-in token is revoked (None: revocations are not checked here)
        self._revoked = revoked
        self.lifetime_s = lifetime_s
        self._clock = clock
        # nonce -> expiry of the sessions signed out here (kept until they would expire)
        self._signed_out: dict[str, int] = {}

    def sign_in(self, user_token: str) -> tuple[WebSession, str]:
        """A new session of the token's user and its cookie value (Unauthenticated if the
        token is not a valid, current one)."""
        now = self._clock()
        token = read_user_token(user_token.strip(), self._keys, now, self._revoked)
        expires_at = min(int(now) + self.lifetime_s, token.expires_at)
        nonce = secrets.token_urlsafe(16)
        signed = f"{_VERSION}.{token.user}.{expires_at}.{token.issued_at}.{token.token_id}.{nonce}"
        cookie = f"{signed}.{self._sign(signed)}"
        return self._session(token.user, token.issued_at, token.token_id, expires_at, nonce), cookie

    def read(self, cookie: str | None) -> WebSession | None:
        """The session a cookie proves, or None (absent, forged, expired, signed out,
        its token revoked)."""
        if not cookie or len(cookie) > _MAX_COOKIE:
            return None
        fields = cookie.split(".")
        if len(fields) != 7 or fields[0] != _VERSION:
            return None
        signed, signature = cookie.rsplit(".", 1)
        if not self._signed(signed, signature):
            return None
        _, user_text, expiry_text, issued_text, token_id, nonce, _ = fields
        expires_at = int(expiry_text)
        if self._clock() >= expires_at or nonce in self._signed_out:
            return None
        session = self._session(int(user_text), int(issued_text), token_id, expires_at, nonce)
        if self._revoked is not None and self._revoked(session.token):
            return None
        return session

    def _session(
        self, user: int, issued_at: int, token_id: str, expires_at: int, nonce: str
    ) -> WebSession:
        token = UserToken(user, issued_at, expires_at, "", token_id)
        return WebSession(user, expires_at, nonce, self._sign(f"csrf.{nonce}"), token)

    def sign_out(self, session: WebSession) -> None:
        """Refuse this session's cookie from now on."""
        now = self._clock()
        self._signed_out = {n: e for n, e in self._signed_out.items() if e > now}
        self._signed_out[session.nonce] = session.expires_at

    def check_csrf(self, session: WebSession, given: str | None) -> bool:
        return bool(given) and self._signed(f"csrf.{session.nonce}", str(given))

    # ---- the login form's CSRF token ----

    def new_login_nonce(self) -> tuple[str, str]:
        """A pre-session nonce (the login cookie's value) and the login form's token."""
        nonce = secrets.token_urlsafe(16)
        return nonce, self._sign(f"login.{nonce}")

    def check_login_csrf(self, nonce: str | None, given: str | None) -> bool:
        if not nonce or not given or len(nonce) > 64:
            return False
        return self._signed(f"login.{nonce}", str(given))

    def _signed(self, text: str, signature: str) -> bool:
        """Whether `signature` is the HMAC of `text` under the secret of a key accepted now
        (a page signed before a key rotation still works)."""
        given = signature.encode()
        return any(
            hmac.compare_digest(given, self._sign(text, key).encode()) for key in self._keys.all()
        )

    def _sign(self, text: str, key: str | None = None) -> str:
        """The HMAC of `text` under the secret of `key` (the current key by default)."""
        secret = hmac.new(
            (key or self._keys.current).encode("utf-8"), b"pyserver web session v1", hashlib.sha256
        ).digest()
        return hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()
