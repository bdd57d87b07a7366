"""Who may talk to an app server: the cell's service key and signed, expiring user tokens.

Owns the credential formats of docs/protocol.md (HELLO). A service key is a shared
secret of the trusted tiers; a user token is `"<user_id>.<expiry>.<signature>"`, where
`signature` is the lowercase hex HMAC-SHA256 of `"<user_id>.<expiry>"` under the service
key and `expiry` is whole seconds since the Unix epoch. A token is valid while
`now < expiry`. Every secret comparison is constant-time. Calls nothing but the standard
library and `pyserver.errors`.
"""

from __future__ import annotations

import hashlib
import hmac

from pyserver.errors import Unauthenticated
from pyserver.userid import MAX_USER_ID, is_user_id

__all__ = [
    "MAX_USER_ID",
    "check_service_key",
    "make_user_token",
    "verify_user_token",
]

# A token is three short fields; anything much longer is not one, so reject it before
# doing any work on it.
_MAX_TOKEN_LENGTH = 20 + 1 + 20 + 1 + 64
_SIGNATURE_LENGTH = 64  # hex digits of an HMAC-SHA256
_HEX_DIGITS = frozenset("0123456789abcdef")


def check_service_key(given: str, expected: str) -> bool:
    """Whether `given` is the service key, compared in constant time.

    An empty expected key matches nothing: a server with no key configured accepts no
    service connections rather than every one.
    """
    if not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _signature(signed: str, key: str) -> str:
    return hmac.new(key.encode("utf-8"), signed.encode("ascii"), hashlib.sha256).hexdigest()


def _is_decimal(text: str) -> bool:
    # str.isdigit() accepts non-ASCII digits such as "²" that int() may reject or read.
    return 0 < len(text) <= 20 and text.isascii() and text.isdigit()


def make_user_token(user_id: int, expires_at: int, key: str) -> str:
    """A token limiting a connection to `user_id` until `expires_at` (Unix seconds)."""
    if not key:
        raise ValueError("cannot sign a user token without a service key")
    if not is_user_id(user_id, minimum=0):
        raise ValueError(f"user id must be an int in 0..2**64-1, not {user_id!r}")
    if type(expires_at) is not int or expires_at < 0:
        raise ValueError(f"expires_at must be whole seconds since the epoch, not {expires_at!r}")
    signed = f"{user_id}.{expires_at}"
    return f"{signed}.{_signature(signed, key)}"


def verify_user_token(token: str, key: str, now: float) -> int:
    """The user id a token grants, or Unauthenticated saying why it grants nothing.

    Only the canonical form is accepted: decimal fields without sign or leading zeros and
    a lowercase hex signature. The signature is checked (in constant time) before the
    expiry, so a forged token is reported as forged whatever its expiry.
    """
    if not key:
        raise Unauthenticated("user tokens are not accepted: this server has no service key")
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH:
        raise Unauthenticated("malformed user token")
    fields = token.split(".")
    if len(fields) != 3:
        raise Unauthenticated("malformed user token: expected <user_id>.<expiry>.<signature>")
    user_text, expiry_text, signature = fields
    if not (_is_decimal(user_text) and _is_decimal(expiry_text)):
        raise Unauthenticated("malformed user token: user id and expiry must be decimal")
    if (user_text[0] == "0" and len(user_text) > 1) or (
        expiry_text[0] == "0" and len(expiry_text) > 1
    ):
        raise Unauthenticated("malformed user token: numbers must not have leading zeros")
    if len(signature) != _SIGNATURE_LENGTH or not _HEX_DIGITS.issuperset(signature):
        raise Unauthenticated("malformed user token: signature must be 64 lowercase hex digits")
    expected = _signature(f"{user_text}.{expiry_text}", key)
    if not hmac.compare_digest(signature.encode("ascii"), expected.encode("ascii")):
        raise Unauthenticated("bad user token signature")
    user_id = int(user_text)
    if user_id > MAX_USER_ID:
        raise Unauthenticated("user token names a user id over 2**64-1")
    expiry = int(expiry_text)
    if now >= expiry:
        raise Unauthenticated(f"user token expired at {expiry}")
    return user_id
