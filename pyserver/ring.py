"""The consistent hash ring users import: the native twin when built, else the pure one.

`pyserver.implementation` makes the choice; this module only re-exports it.
`IMPLEMENTATION` says which twin is in use ("native" or "pure").

May import: pyserver.implementation, pyserver.pure, pyserver.errors.
"""

from __future__ import annotations

from pyserver import implementation

if implementation.native is not None:
    HashRing = implementation.native.HashRing
    key_position = implementation.native.key_position
    token_position = implementation.native.token_position
    IMPLEMENTATION = "native"
else:
    from pyserver.pure.ring import HashRing, key_position, token_position

    IMPLEMENTATION = "pure"

__all__ = ["IMPLEMENTATION", "HashRing", "key_position", "token_position"]
