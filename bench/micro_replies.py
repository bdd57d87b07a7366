"""Micro-benchmark of the reply table: answering pipelined cached reads, Cython vs pure.

`reply_table`: nanoseconds per request to answer a batch of 16 pipelined COUNTS frames
(the requests of one `data_received`) from the table: feed the batch to the twin's
frame decoder, then one `answer` call that returns the 16 reply frames. The peer
"decode+encode" is the least the Python path does for the same batch without the
table: decode each frame, look its payload up in a dict of ready replies and encode a
reply frame with the pure codec, with no JSON parsing and no dispatching at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.timing import compare, entry
from pyserver.framedef import KIND_REPLY, KIND_REQUEST
from pyserver.pure import frame as pure_frame
from pyserver.pure import replies as pure_replies
from pyserver.wire.ops import Op

BATCH = 16
USERS = 1_000
REPLY = b'{"folders":{"inbox":{"unread":3,"unseen":1},"other":{"unread":0,"unseen":0}}}'


def _native_module() -> Any:
    import pyserver_framecodec  # missing build: ImportError, not a silent skip

    return pyserver_framecodec


def _filled(table_class: Any) -> Any:
    table = table_class()
    for user in range(1, USERS + 1):
        table.put(user, Op.COUNTS.value, b'{"user":%d}' % user, REPLY)
    return table


def _batch(codec: Any) -> bytes:
    return b"".join(
        codec.encode_frame(KIND_REQUEST, Op.COUNTS, n + 1, b'{"user":%d}' % (n * 37 % USERS + 1))
        for n in range(BATCH)
    )


def _answering(codec: Any, table: Any, batch: bytes) -> Callable[[], None]:
    decoder = codec.FrameDecoder()

    def run() -> None:
        decoder.feed(batch)
        if table.answer(decoder, 0) is None or decoder.buffered:
            raise AssertionError("the table did not answer the whole batch")

    return run


def _decode_and_encode(batch: bytes) -> Callable[[], None]:
    ready = {b'{"user":%d}' % user: REPLY for user in range(1, USERS + 1)}
    decoder = pure_frame.FrameDecoder()
    encode = pure_frame.encode_frame

    def run() -> None:
        decoder.feed(batch)
        out = [encode(KIND_REPLY, f.op, f.request_id, ready[f.payload]) for f in decoder]
        if len(out) != BATCH:
            raise AssertionError("a frame was lost")

    return run


def run(quick: bool = False) -> dict[str, dict]:
    """The `reply_table` figures, Cython and pure measured side by side in one run."""
    native = _native_module()
    native_batch, pure_batch = _batch(native), _batch(pure_frame)
    native_table, pure_table = _filled(native.ReplyTable), _filled(pure_replies.ReplyTable)
    # Both twins must give the same bytes before being timed.
    answers = []
    for codec, table, batch in (
        (native, native_table, native_batch),
        (pure_frame, pure_table, pure_batch),
    ):
        decoder = codec.FrameDecoder()
        decoder.feed(batch)
        answers.append(table.answer(decoder, 0))
    if answers[0] != answers[1] or answers[0] is None:
        raise AssertionError("the Cython and pure reply tables disagree")
    ns = compare(
        {
            "native": _answering(native, native_table, native_batch),
            "pure": _answering(pure_frame, pure_table, pure_batch),
            "decode+encode": _decode_and_encode(pure_batch),
        },
        ops_per_call=BATCH,
        rounds=3 if quick else 7,
        round_s=0.02 if quick else 0.3,
    )
    return {"reply_table": entry(ns["native"], ns["pure"], {"decode+encode": ns["decode+encode"]})}
