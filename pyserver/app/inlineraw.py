"""A small mail's raw bytes, kept in each copy's body instead of in the blob store.

The MTA proxy hands DELIVER a mail of at most `mail_inline_raw_bytes` with its
bytes as received (`raw`, base64) and names them in `extra.raw` as it names a blob
(`ref`: their SHA-256, `size`), with `inline: true`. The owner keeps them in the
copy's body (the `m` family, under the message id, beside `text`, `from` and
`extra`), committed with the copy's log entry: the mail's one durable write, with no
blob barrier before it. Moves and exports carry them with the body. GET_BLOB of
that ref reads them back from the stored body; the user image never holds them.

May import: pyserver.store.base, pyserver.blobs.base, pyserver.errors, pybase64, orjson.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
import pybase64

from pyserver.blobs.base import BlobCorrupt
from pyserver.errors import BadRequest, NotFound, TooLarge
from pyserver.store.base import LogStore

__all__ = ["BODY_FIELD", "body_field", "from_deliver", "names_inline", "read"]

# The stored body's field holding the bytes (base64).
BODY_FIELD = "raw"


def names_inline(extra: Mapping[str, Any], ref: str) -> bool:
    """Whether `extra` names `ref` as its mail's raw bytes, kept in the copy's body."""
    raw = extra.get("raw")
    return isinstance(raw, dict) and raw.get("inline") is True and raw.get("ref") == ref


def from_deliver(
    payload: Mapping[str, Any], extra: Mapping[str, Any], max_bytes: int
) -> bytes | None:
    """DELIVER's `raw`, checked against `extra.raw` (None when the mail's raw is a blob)."""
    value = payload.get("raw")
    named = extra.get("raw")
    inline = isinstance(named, dict) and named.get("inline") is True
    if value is None:
        if inline:
            raise BadRequest("raw: missing, while extra.raw says the mail's bytes come inline")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"raw: must be a base64 string, not {type(value).__name__}")
    if len(value) > 4 * -(-max_bytes // 3):
        raise TooLarge(f"raw: over the limit of {max_bytes} bytes")
    try:
        data = pybase64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise BadRequest("raw: not base64") from None
    if not (
        inline
        and named.get("size") == len(data)
        and named.get("ref") == hashlib.sha256(data).hexdigest()
    ):
        raise BadRequest(
            "raw: extra.raw must name these bytes (ref: their SHA-256, size, inline: true)"
        )
    return data


def body_field(data: bytes) -> str:
    """The stored body's `raw`."""
    return pybase64.b64encode_as_string(data)


async def read(store: LogStore, user: int, message_id: str, ref: str) -> bytes:
    """The raw bytes kept in the body of the user's message `message_id` (named `ref`)."""
    stored = (await store.get_messages(user, [message_id])).get(message_id)
    if stored is None:
        raise NotFound(f"ref: the body holding {ref} is gone")
    try:
        body = orjson.loads(stored)
        data = pybase64.b64decode(body[BODY_FIELD], validate=True)
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, binascii.Error):
        raise BlobCorrupt(f"blob {ref}: the body of message {message_id!r} lost it") from None
    if hashlib.sha256(data).hexdigest() != ref:  # damaged bytes are never returned
        raise BlobCorrupt(f"blob {ref}: the bytes kept in message {message_id!r} differ")
    return data
