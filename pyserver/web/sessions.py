"""Who is signed in to the web tier: session cookies, sign-in tokens and CSRF tokens.

Owns the web tier's credential formats, all signed with one secret derived from
the cell's service key (so every web process of a cluster, and a restarted one,
reads the others' cookies; a leaked session secret reveals nothing of the key):

1. A person signs in with a user token (`pyserver admin token`, verified as the
   app server's HELLO does, `pyserver.app.auth`).
2. The tier answers with a session cookie `v1.<user>.<expiry>.<nonce>.<signature>`:
   HttpOnly, SameSite=Strict, expiring with the session (`lifetime_s`, never past
   the token's own expiry). `signature` is the hex HMAC-SHA256 of the rest.
3. Every form and state-changing request carries the session's CSRF token, the
   HMAC of `"csrf." + nonce`: a page of another site can neither read it nor
   guess it, and it changes with every sign-in.
4. Signing out forgets the nonce: the cookie is refused by this process from then
   on, even if a copy of it was kept (until it would have expired anyway).

The login form has its own CSRF token, bound to a short-lived pre-session cookie
(`login_nonce`), so a page of another site cannot sign a browser in as someone else.
Calls the standard library and `pyserver.app.auth` only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyserver.app.auth import verify_user_token

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "SessionKeeper", "WebSession"]

SESSION_COOKIE = "pyserver_session"
LOGIN_COOKIE = "pyserver_login"
_VERSION = "v1"
_MAX_COOKIE = 160  # five short fields; anything longer is not ours


@dataclass(frozen=True, slots=True)
class WebSession:
    """A signed-in browser: its user, when the session ends, and its CSRF token."""

    user: int
    expires_at: int
    nonce: str
    csrf: str


class SessionKeeper:
    """Issues and reads the web tier's cookies (see the module docstring)."""

    def __init__(
        self,
        service_key: str,
        *,
        lifetime_s: int = 7 * 86_400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not service_key:
            raise ValueError("the web tier needs the cell's service key")
        self._service_key = service_key
        self._secret = hmac.new(
            service_key.encode("utf-8"), b"pyserver web session v1", hashlib.sha256
        ).digest()
        self.lifetime_s = lifetime_s
        self._clock = clock
        # nonce -> expiry of the sessions signed out here (kept until they would expire)
        self._signed_out: dict[str, int] = {}

    def sign_in(self, user_token: str) -> tuple[WebSession, str]:
        """A new session of the token's user and its cookie value (Unauthenticated if the
        token is not a valid, current one)."""
        now = self._clock()
        user = verify_user_token(user_token.strip(), self._service_key, now)
        token_expiry = int(user_token.strip().split(".")[1])
        expires_at = min(int(now) + self.lifetime_s, token_expiry)
        nonce = secrets.token_urlsafe(16)
        signed = f"{_VERSION}.{user}.{expires_at}.{nonce}"
        cookie = f"{signed}.{self._sign(signed)}"
        return WebSession(user, expires_at, nonce, self._sign(f"csrf.{nonce}")), cookie

    def read(self, cookie: str | None) -> WebSession | None:
        """The session a cookie proves, or None (absent, forged, expired, signed out)."""
        if not cookie or len(cookie) > _MAX_COOKIE:
            return None
        fields = cookie.split(".")
        if len(fields) != 5 or fields[0] != _VERSION:
            return None
        _, user_text, expiry_text, nonce, signature = fields
        signed = f"{_VERSION}.{user_text}.{expiry_text}.{nonce}"
        if not hmac.compare_digest(signature.encode(), self._sign(signed).encode()):
            return None
        expires_at = int(expiry_text)
        if self._clock() >= expires_at or nonce in self._signed_out:
            return None
        return WebSession(int(user_text), expires_at, nonce, self._sign(f"csrf.{nonce}"))

    def sign_out(self, session: WebSession) -> None:
        """Refuse this session's cookie from now on."""
        now = self._clock()
        self._signed_out = {n: e for n, e in self._signed_out.items() if e > now}
        self._signed_out[session.nonce] = session.expires_at

    def check_csrf(self, session: WebSession, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given).encode(), session.csrf.encode())

    # ---- the login form's CSRF token ----

    def new_login_nonce(self) -> tuple[str, str]:
        """A pre-session nonce (the login cookie's value) and the login form's token."""
        nonce = secrets.token_urlsafe(16)
        return nonce, self._sign(f"login.{nonce}")

    def check_login_csrf(self, nonce: str | None, given: str | None) -> bool:
        if not nonce or not given or len(nonce) > 64:
            return False
        return hmac.compare_digest(str(given).encode(), self._sign(f"login.{nonce}").encode())

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode("utf-8"), hashlib.sha256).hexdigest()
