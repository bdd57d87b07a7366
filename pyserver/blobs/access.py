"""GET_BLOB: who may read a blob, and one range of it as a reply.

A user may read a blob only while a message in their mailbox references it
(an attachment, the whole body of a long mail, the raw original), so a blob
is exactly as private as the messages that carry it; a blob nobody may read
and a blob that does not exist are the same NOT_FOUND, so refs cannot be
probed. A blob is read in ranges of at most `MAX_RANGE` bytes, each one reply
(its bytes in base64), so no frame is ever big; docs/protocol.md ("GET_BLOB")
has the payloads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pybase64

from pyserver.blobs.base import BlobNotFound, BlobStore, check_ref
from pyserver.errors import BadRequest, NotFound

__all__ = [
    "DEFAULT_RANGE",
    "MAX_RANGE",
    "BlobRange",
    "blob_refs",
    "find_reference",
    "range_of",
    "read_range",
]

# Bytes per GET_BLOB reply: the default, and the most one request may ask for (its
# base64 stays well under the 1 MiB default frame limit).
DEFAULT_RANGE = 256 << 10
MAX_RANGE = 512 << 10


@dataclass(frozen=True, slots=True)
class BlobRange:
    """A checked GET_BLOB request (the user is the mailbox's to check)."""

    ref: str
    offset: int
    length: int
    message_id: str | None

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> BlobRange:
        ref = check_ref(p.get("ref"))
        offset = p.get("offset", 0) if p.get("offset") is not None else 0
        if type(offset) is not int or offset < 0:
            raise BadRequest(f"offset: must be an integer >= 0, not {offset!r}")
        length = p.get("length") if p.get("length") is not None else DEFAULT_RANGE
        if type(length) is not int or not 1 <= length <= MAX_RANGE:
            raise BadRequest(f"length: must be an integer in 1..{MAX_RANGE}, not {length!r}")
        message_id = p.get("message_id")
        if message_id is not None and (not isinstance(message_id, str) or len(message_id) > 4096):
            raise BadRequest("message_id: must be a message id")
        return cls(ref, offset, length, message_id)


def blob_refs(extra: Mapping[str, Any]) -> Iterator[str]:
    """Every blob ref a message's `extra` holds: attachments, the whole body, the raw message."""
    for attachment in extra.get("attachments", ()):
        if isinstance(attachment, dict):
            yield attachment.get("ref", "")
    for name in ("body", "raw"):
        held = extra.get(name)
        if isinstance(held, dict):
            yield held.get("ref", "")


def find_reference(messages: Mapping[str, Any], ref: str, message_id: str | None) -> str | None:
    """The id of a message (with an `extra`) that references `ref`: `message_id` if given
    and it does, else any message that does, newest first; None if none does."""
    if message_id is not None:
        message = messages.get(message_id)
        candidates = [message] if message is not None else []
    else:
        candidates = reversed(messages.values())
    for message in candidates:
        extra = message.extra
        if extra and ref in blob_refs(extra):
            return message.message_id
    return None


async def read_range(blobs: BlobStore, request: BlobRange, message_id: str) -> dict[str, Any]:
    """GET_BLOB's reply for a range of a blob the user may read."""
    info = await blobs.stat(request.ref)
    if info is None:
        raise NotFound(f"ref: no blob {request.ref}")
    _check_offset(request, info.size)
    try:
        data = await blobs.get(request.ref, request.offset, request.length)
    except BlobNotFound:
        raise NotFound(f"ref: no blob {request.ref}") from None
    return _range_reply(request, message_id, info.size, data)


def range_of(request: BlobRange, message_id: str, whole: bytes) -> dict[str, Any]:
    """GET_BLOB's reply for a range of bytes held whole (a small mail's raw bytes, kept in
    its copy's body: `pyserver.app.inlineraw`)."""
    _check_offset(request, len(whole))
    data = whole[request.offset : request.offset + request.length]
    return _range_reply(request, message_id, len(whole), data)


def _check_offset(request: BlobRange, size: int) -> None:
    if request.offset > size:
        raise BadRequest(f"offset: {request.offset} is past the blob's end ({size} bytes)")


def _range_reply(request: BlobRange, message_id: str, size: int, data: bytes) -> dict[str, Any]:
    """GET_BLOB's reply: `data`, read at the request's offset of a blob of `size` bytes."""
    end = request.offset + len(data)
    return {
        "ref": request.ref,
        "message_id": message_id,
        "size": size,
        "offset": request.offset,
        "data": pybase64.b64encode_as_string(data),
        "eof": end >= size,
    }
