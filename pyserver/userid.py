"""User ids, checked in one place: unsigned 64-bit integers (DESIGN.md, "Hash ring").

Every part that takes a user id from outside (a request's payload, a command line,
an HTTP path, a token) checks it here. Imports: `pyserver.errors` only.

May import: pyserver.errors.
"""

from __future__ import annotations

import argparse
from typing import Any

from pyserver.errors import BadRequest

__all__ = ["MAX_USER_ID", "check_user_id", "is_user_id", "user_id_argument"]

MAX_USER_ID = (1 << 64) - 1


def is_user_id(value: Any, minimum: int = 1) -> bool:
    """Whether `value` is an int (not a bool) in `minimum`..2**64-1."""
    return type(value) is int and minimum <= value <= MAX_USER_ID


def check_user_id(value: Any, name: str = "user", minimum: int = 1) -> int:
    """`value` if it is a user id, else BadRequest naming the field and the range."""
    if not is_user_id(value, minimum):
        raise BadRequest(f"{name}: must be a user id in {minimum}..2**64-1, not {value!r}")
    return value


def user_id_argument(text: str) -> int:
    """A user id given on a command line (0 allowed: the outside world's id), for argparse."""
    value = int(text)
    if not is_user_id(value, minimum=0):
        raise argparse.ArgumentTypeError(f"{text} is not a user id (0 .. 2**64-1)")
    return value
