"""Micro-benchmark of the log-record codec: native and pure twins against msgpack and orjson.

`log_codec`: ns per encode + decode of one typical `message_added` entry (uuid
ids, three participants, a subject, a 100-character snippet, a Message-ID key).
The peers serialise the same dict: msgpack `packb` + `unpackb`, orjson `dumps` +
`loads`. The separate encode and decode figures of the twins ride along as
extra fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import orjson

from bench.timing import compare, entry
from pyserver.implementation import native
from pyserver.pure import logcodec as pure

# A realistic record: what an email between three people leaves in the log.
TYPICAL_MESSAGE_ADDED: dict[str, Any] = {
    "seq": 1_043,
    "ts": 1_764_211_200_123_456,
    "action": "message_added",
    "message_id": "5f0c8a3e-7d1b-4c2a-9e6f-1b2c3d4e5f60",
    "thread_id": "a9b8c7d6-e5f4-4a3b-8c2d-1e0f9a8b7c6d",
    "sender": 100_000_123_456,
    "participants": [100_000_123_456, 100_000_654_321, 100_000_777_888],
    "channel": "email",
    "folder": "inbox",
    "unread": True,
    "subject": "Re: dinner on Friday?",
    "snippet": (
        "Sounds great, let's meet at the usual place around 7. I'll bring the book "
        "you lent me last month. :)"
    ),
    "body_ref": "m:5f0c8a3e-7d1b-4c2a-9e6f-1b2c3d4e5f60",
    "key": "<CAF3x9k2=Yq7@mail.example.com>",
}
assert len(TYPICAL_MESSAGE_ADDED["snippet"]) == 100


def _native_module() -> Any:
    if native is None:
        raise RuntimeError("pyserver._native is not built (or PYSERVER_PURE=1 is set)")
    return native


def _round_trip(dump: Callable[[Any], bytes], load: Callable[[bytes], Any]) -> Callable[[], Any]:
    record = TYPICAL_MESSAGE_ADDED

    def run() -> Any:
        return load(dump(record))

    return run


def run(quick: bool = False) -> dict[str, dict]:
    codec = _native_module()
    record = TYPICAL_MESSAGE_ADDED
    assert codec.encode(record) == pure.encode(record)
    assert codec.decode(codec.encode(record)) == record == msgpack.unpackb(msgpack.packb(record))
    encoded = codec.encode(record)
    rounds, round_s = (2, 0.01) if quick else (7, 0.06)

    both = compare(
        {
            "native": _round_trip(codec.encode, codec.decode),
            "pure": _round_trip(pure.encode, pure.decode),
            "msgpack": _round_trip(msgpack.packb, msgpack.unpackb),
            "orjson": _round_trip(orjson.dumps, orjson.loads),
        },
        rounds=rounds,
        round_s=round_s,
    )
    halves = compare(
        {
            "native_encode": lambda: codec.encode(record),
            "native_decode": lambda: codec.decode(encoded),
            "pure_encode": lambda: pure.encode(record),
            "pure_decode": lambda: pure.decode(encoded),
        },
        rounds=rounds,
        round_s=round_s,
    )
    figures = entry(
        both["native"], both["pure"], {"msgpack": both["msgpack"], "orjson": both["orjson"]}
    )
    figures["record_bytes"] = len(encoded)
    figures.update({f"{name}_ns": round(ns, 1) for name, ns in halves.items()})
    return {"log_codec": figures}
