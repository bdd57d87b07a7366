"""The log-record codec users import: the native twin when built, else the pure one.

`pyserver.implementation` makes the choice; this module only re-exports it, with
the names of the format's enumerations (docs/log-format.md) for callers:
`ACTIONS`, `CHANNELS` and `FOLDERS` list the names by code (index + 1), and
`FIELDS` maps each action to its own fields in record order.
`IMPLEMENTATION` says which twin is in use ("native" or "pure").

May import: pyserver.implementation, pyserver.pure, pyserver.errors.
"""

from __future__ import annotations

from pyserver import implementation
from pyserver.pure.logcodec import ACTIONS, CHANNELS, FIELDS, FOLDERS, MAX_FIELDS_LEN

if implementation.native is not None:
    encode = implementation.native.encode
    decode = implementation.native.decode
    encode_batch = implementation.native.encode_batch
    decode_batch = implementation.native.decode_batch
    IMPLEMENTATION = "native"
else:
    from pyserver.pure.logcodec import decode, decode_batch, encode, encode_batch

    IMPLEMENTATION = "pure"

__all__ = [
    "ACTIONS",
    "CHANNELS",
    "FIELDS",
    "FOLDERS",
    "IMPLEMENTATION",
    "MAX_FIELDS_LEN",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
]
