"""Typed exceptions shared by every part of pyserver, native and pure alike.

Each error that can reach a client carries the protocol error code of
DESIGN.md ("Wire protocol"), so the server can answer it without a table.

May import: nothing of pyserver.
"""

from __future__ import annotations


class PyserverError(Exception):
    """Base of every pyserver error. `code` is the protocol error code."""

    code: str = "INTERNAL"


class BadRequest(PyserverError, ValueError):
    """The request or data is malformed; retrying it unchanged will not help."""

    code = "BAD_REQUEST"


class LogCorrupt(PyserverError, ValueError):
    """A log record or snapshot is truncated, corrupted, of an unknown version, or hostile.

    Met while reading stored data, it is the server's fault, not the client's: the
    request is answered INTERNAL and the corruption logged loudly.
    """


class EmptyRing(PyserverError, LookupError):
    """The hash ring has no nodes, so no user has an owner."""

    code = "UNAVAILABLE"


class FrameError(BadRequest):
    """A wire frame is malformed; the stream can no longer be trusted."""


class FrameTooLarge(FrameError):
    """A wire frame declares a length over the configured limit."""

    code = "TOO_LARGE"


class BadFrameVersion(FrameError):
    """A wire frame carries a protocol version this server does not speak."""


class Unauthenticated(PyserverError):
    """No HELLO yet on this connection, or a bad service key or user token."""

    code = "UNAUTHENTICATED"


class Forbidden(PyserverError):
    """The connection's credentials do not cover this user or operation."""

    code = "FORBIDDEN"


class NotFound(PyserverError, LookupError):
    """No such thread, message or blob."""

    code = "NOT_FOUND"


class TooLarge(BadRequest):
    """A field or a whole request over its configured limit."""

    code = "TOO_LARGE"


class Unavailable(PyserverError):
    """This server cannot serve now (fenced, draining, store down): retry later."""

    code = "UNAVAILABLE"


class TooMany(PyserverError):
    """Over a rate limit (requests of one user): wait a moment, then retry."""

    code = "TOO_MANY"


class NotOwner(PyserverError):
    """Another server owns this user; `owner` is its "host:port"."""

    code = "NOT_OWNER"

    def __init__(self, message: str, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


def error_payload(exc: BaseException) -> dict[str, str]:
    """The protocol error object for an exception: typed errors keep their code."""
    if isinstance(exc, PyserverError):
        payload = {"code": exc.code, "message": str(exc)}
        if isinstance(exc, NotOwner):
            payload["owner"] = exc.owner
        return payload
    return {"code": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"}
