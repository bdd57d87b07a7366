"""Who may talk to an app server: the cell's service keys and signed, expiring user tokens.

Owns the credential formats of docs/protocol.md (HELLO). A service key is a shared
secret of the trusted tiers (several are accepted during a rotation:
`pyserver.servicekey`). A user token is
`"<user_id>.<issued>.<expiry>.<key_id>.<signature>"`: `issued` and `expiry` are whole
seconds since the Unix epoch, `key_id` names the service key that signed it, and
`signature` is the lowercase hex HMAC-SHA256 of everything before it under that key.
A token is valid while `now < expiry`, its key is still accepted, and it is not
revoked (`pyserver.app.revocations`). Every secret comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyserver.errors import Unauthenticated
from pyserver.servicekey import KEY_ID_LENGTH, ServiceKey, as_service_keys, current_key, key_id
from pyserver.userid import MAX_USER_ID, is_user_id

__all__ = [
    "MAX_USER_ID",
    "UserToken",
    "check_service_key",
    "make_user_token",
    "read_user_token",
    "token_id",
    "verify_user_token",
]

# A token is five short fields; anything much longer is not one, so reject it before
# doing any work on it.
_MAX_TOKEN_LENGTH = 3 * (20 + 1) + KEY_ID_LENGTH + 1 + 64
_SIGNATURE_LENGTH = 64  # hex digits of an HMAC-SHA256
_HEX_DIGITS = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class UserToken:
    """What a valid token says."""

    user: int
    issued_at: int
    expires_at: int
    key_id: str
    token_id: str  # its public name, for revoking it (`token_id`)


def check_service_key(given: str, expected: ServiceKey) -> bool:
    """Whether `given` is one of the service keys, compared in constant time.

    An empty expected key matches nothing: a server with no key configured accepts no
    service connections rather than every one.
    """
    if isinstance(expected, str):
        return bool(expected) and hmac.compare_digest(
            given.encode("utf-8"), expected.encode("utf-8")
        )
    return expected.accepts(given)


def token_id(token: str) -> str:
    """A token's public name: what revocations and logs call it (not a credential)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


def _signature(signed: str, key: str) -> str:
    return hmac.new(key.encode("utf-8"), signed.encode("ascii"), hashlib.sha256).hexdigest()


def _is_decimal(text: str) -> bool:
    # str.isdigit() accepts non-ASCII digits such as "²" that int() may reject or read.
    return 0 < len(text) <= 20 and text.isascii() and text.isdigit()


def make_user_token(
    user_id: int, expires_at: int, key: ServiceKey, *, issued_at: int | None = None
) -> str:
    """A token limiting a connection to `user_id` until `expires_at` (Unix seconds), signed
    with the current service key."""
    signing_key = current_key(key)
    if not signing_key:
        raise ValueError("cannot sign a user token without a service key")
    if not is_user_id(user_id, minimum=0):
        raise ValueError(f"user id must be an int in 0..2**64-1, not {user_id!r}")
    if type(expires_at) is not int or expires_at < 0:
        raise ValueError(f"expires_at must be whole seconds since the epoch, not {expires_at!r}")
    issued = int(time.time()) if issued_at is None else issued_at
    if type(issued) is not int or issued < 0:
        raise ValueError(f"issued_at must be whole seconds since the epoch, not {issued!r}")
    signed = f"{user_id}.{issued}.{expires_at}.{key_id(signing_key)}"
    return f"{signed}.{_signature(signed, signing_key)}"


def read_user_token(
    token: str,
    key: ServiceKey,
    now: float,
    revoked: Callable[[UserToken], bool] | None = None,
) -> UserToken:
    """What a token grants, or Unauthenticated saying why it grants nothing.

    Only the canonical form is accepted: decimal fields without sign or leading zeros,
    a known key id and a lowercase hex signature. The signature is checked (in constant
    time) before the expiry, so a forged token is reported as forged whatever its expiry.
    A valid token that `revoked` names (`Revocations.refuses`) grants nothing either.
    """
    keys = as_service_keys(key) if key else None
    if keys is None:
        raise Unauthenticated("user tokens are not accepted: this server has no service key")
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH:
        raise Unauthenticated("malformed user token")
    fields = token.split(".")
    if len(fields) != 5:
        raise Unauthenticated(
            "malformed user token: expected <user_id>.<issued>.<expiry>.<key_id>.<signature>"
        )
    user_text, issued_text, expiry_text, kid, signature = fields
    numbers = (user_text, issued_text, expiry_text)
    if not all(_is_decimal(number) for number in numbers):
        raise Unauthenticated("malformed user token: user id and times must be decimal")
    if any(number[0] == "0" and len(number) > 1 for number in numbers):
        raise Unauthenticated("malformed user token: numbers must not have leading zeros")
    if len(kid) != KEY_ID_LENGTH or not _HEX_DIGITS.issuperset(kid):
        raise Unauthenticated("malformed user token: the key id must be 8 lowercase hex digits")
    if len(signature) != _SIGNATURE_LENGTH or not _HEX_DIGITS.issuperset(signature):
        raise Unauthenticated("malformed user token: signature must be 64 lowercase hex digits")
    signing_key = keys.by_id(kid)
    if signing_key is None:
        raise Unauthenticated(f"user token signed with key {kid}, not (or no longer) accepted")
    expected = _signature(token[: -_SIGNATURE_LENGTH - 1], signing_key)
    if not hmac.compare_digest(signature.encode("ascii"), expected.encode("ascii")):
        raise Unauthenticated("bad user token signature")
    user_id = int(user_text)
    if user_id > MAX_USER_ID:
        raise Unauthenticated("user token names a user id over 2**64-1")
    expiry = int(expiry_text)
    if now >= expiry:
        raise Unauthenticated(f"user token expired at {expiry}")
    found = UserToken(user_id, int(issued_text), expiry, kid, token_id(token))
    if revoked is not None and revoked(found):
        raise Unauthenticated(f"user token {found.token_id} is revoked")
    return found


def verify_user_token(token: str, key: ServiceKey, now: float) -> int:
    """The user id a valid token grants (Unauthenticated if none); revocations are the
    caller's to check (`pyserver.app.revocations`)."""
    return read_user_token(token, key, now).user
