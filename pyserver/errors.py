"""Typed exceptions shared by every part of pyserver, native and pure alike.

Each error that can reach a client carries the protocol error code of
DESIGN.md ("Wire protocol"), so the server can answer it without a table.
"""

from __future__ import annotations


class PyserverError(Exception):
    """Base of every pyserver error. `code` is the protocol error code."""

    code: str = "INTERNAL"


class BadRequest(PyserverError, ValueError):
    """The request or data is malformed; retrying it unchanged will not help."""

    code = "BAD_REQUEST"


class LogCorrupt(BadRequest):
    """A log record is truncated, corrupted, of an unknown version, or hostile."""


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
