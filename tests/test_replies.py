"""The reply table of cached reads: one suite for the Cython table and its pure twin.

Each twin reads only its own twin's frame decoder. The "native" parameter is skipped
only under PYSERVER_PURE=1; a missing build fails these tests.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserver.framedef import KIND_ERROR, KIND_REPLY, KIND_REQUEST
from pyserver.pure import frame as pure_frame
from pyserver.pure import replies as pure_replies
from tests import support

COUNTS, LIST_THREADS = 23, 20


class Twin:
    """One implementation: its frame codec and its reply table."""

    def __init__(self, name: str, frames: ModuleType, table: Any) -> None:
        self.name = name
        self.frames = frames
        self.ReplyTable = table

    def decoder_with(self, *frames: tuple[int, int, int, bytes]) -> Any:
        decoder = self.frames.FrameDecoder()
        decoder.feed(b"".join(self.frames.encode_frame(*frame) for frame in frames))
        return decoder


def _native() -> Twin:
    module = support.native("pyserver_framecodec")
    return Twin("native", module, module.ReplyTable)


@pytest.fixture(params=["native", "pure"])
def twin(request: pytest.FixtureRequest) -> Twin:
    if request.param == "native":
        return _native()
    return Twin("pure", pure_frame, pure_replies.ReplyTable)


def reply(op: int, request_id: int, body: bytes) -> bytes:
    return pure_frame.encode_frame(KIND_REPLY, op, request_id, body)


def test_a_pipelined_run_of_hits_is_answered_in_one_call(twin: Twin) -> None:
    table = twin.ReplyTable()
    table.put(2, COUNTS, b'{"user":2}', b'{"folders":{"inbox":[1,3]}}')
    table.put(2, LIST_THREADS, b'{"user":2}', b'{"threads":[],"next":null}')
    decoder = twin.decoder_with(
        (KIND_REQUEST, COUNTS, 5, b'{"user":2}'),
        (KIND_REQUEST, LIST_THREADS, 6, b'{"user":2}'),
        (KIND_REQUEST, COUNTS, 7, b'{"user":2}'),
    )
    out = table.answer(decoder, 0)
    assert out == (
        reply(COUNTS, 5, b'{"folders":{"inbox":[1,3]}}')
        + reply(LIST_THREADS, 6, b'{"threads":[],"next":null}')
        + reply(COUNTS, 7, b'{"folders":{"inbox":[1,3]}}')
    )
    assert decoder.buffered == 0
    assert table.hits() == {COUNTS: 2, LIST_THREADS: 1}


def test_it_stops_at_the_first_frame_it_does_not_hold(twin: Twin) -> None:
    table = twin.ReplyTable()
    table.put(2, COUNTS, b'{"user":2}', b"{}")
    decoder = twin.decoder_with(
        (KIND_REQUEST, COUNTS, 1, b'{"user":2}'),
        (KIND_REQUEST, COUNTS, 2, b'{"user": 2}'),  # other bytes: another key
        (KIND_REQUEST, COUNTS, 3, b'{"user":2}'),
    )
    assert table.answer(decoder, 0) == reply(COUNTS, 1, b"{}")
    assert decoder.next_frame() == (KIND_REQUEST, COUNTS, 2, b'{"user": 2}')
    assert table.answer(decoder, 0) == reply(COUNTS, 3, b"{}")
    assert table.answer(decoder, 0) is None


def test_a_user_connection_reads_only_its_own_users_replies(twin: Twin) -> None:
    table = twin.ReplyTable()
    table.put(2, COUNTS, b'{"user":2}', b"{}")
    decoder = twin.decoder_with((KIND_REQUEST, COUNTS, 1, b'{"user":2}'))
    assert table.answer(decoder, 3) is None
    assert decoder.buffered > 0  # left for the Python path, which says FORBIDDEN
    assert table.answer(decoder, 2) == reply(COUNTS, 1, b"{}")


@pytest.mark.parametrize(
    "frame",
    [
        (KIND_ERROR, COUNTS, 1, b'{"user":2}'),  # not a request
        (KIND_REQUEST, COUNTS, 0, b'{"user":2}'),  # request id 0 names the stream
        (KIND_REQUEST, LIST_THREADS, 1, b'{"user":2}'),  # another op, same payload
    ],
)
def test_frames_the_python_path_must_see_are_left_alone(twin: Twin, frame: tuple) -> None:
    table = twin.ReplyTable()
    table.put(2, COUNTS, b'{"user":2}', b"{}")
    decoder = twin.decoder_with(frame)
    assert table.answer(decoder, 0) is None
    assert decoder.next_frame() == frame


def test_incomplete_and_malformed_frames_are_left_to_the_decoder(twin: Twin) -> None:
    table = twin.ReplyTable()
    table.put(2, COUNTS, b'{"user":2}', b"{}")
    whole = twin.frames.encode_frame(KIND_REQUEST, COUNTS, 1, b'{"user":2}')
    decoder = twin.frames.FrameDecoder()
    decoder.feed(whole[:-1])
    assert table.answer(decoder, 0) is None
    decoder.feed(whole[-1:])
    if twin.name == "native":  # the pure twin reads only its current chunk
        assert table.answer(decoder, 0) == reply(COUNTS, 1, b"{}")
    bad = twin.frames.FrameDecoder()
    bad.feed(b"\x00\x00\x00\x08\x09" + bytes(7))  # version 9
    assert table.answer(bad, 0) is None
    with pytest.raises(Exception, match="version 9"):
        bad.next_frame()


def test_the_other_twins_decoder_is_never_read(twin: Twin) -> None:
    table = twin.ReplyTable()
    table.put(2, COUNTS, b'{"user":2}', b"{}")
    other = pure_frame if twin.name == "native" else _native().frames
    decoder = other.FrameDecoder()
    decoder.feed(other.encode_frame(KIND_REQUEST, COUNTS, 1, b'{"user":2}'))
    assert table.answer(decoder, 0) is None


def test_forget_clear_and_replacing_an_entry(twin: Twin) -> None:
    table = twin.ReplyTable()
    table.put(2, COUNTS, b'{"user":2}', b"old")
    table.put(2, COUNTS, b'{"user":2}', b"new")
    table.put(3, COUNTS, b'{"user":3}', b"three")
    assert len(table) == 2
    decoder = twin.decoder_with((KIND_REQUEST, COUNTS, 1, b'{"user":2}'))
    assert table.answer(decoder, 0) == reply(COUNTS, 1, b"new")
    table.forget(2)
    table.forget(2)  # harmless twice
    assert len(table) == 1
    decoder = twin.decoder_with((KIND_REQUEST, COUNTS, 1, b'{"user":2}'))
    assert table.answer(decoder, 0) is None
    table.clear()
    assert len(table) == 0 and table.nbytes == 0


def test_held_read_only_names_the_replies_asked_for_since_they_were_put(twin: Twin) -> None:
    """A reply put for a read just made counts as read; one put again after a write
    (read=False) does not, until a request is answered from it."""
    table = twin.ReplyTable()
    table.put(2, COUNTS, b'{"user":2}', b"counts")
    table.put(2, LIST_THREADS, b'{"user":2}', b"threads", read=False)
    assert table.held(2) == [(COUNTS, b'{"user":2}'), (LIST_THREADS, b'{"user":2}')]
    assert table.held(2, read_only=True) == [(COUNTS, b'{"user":2}')]
    decoder = twin.decoder_with((KIND_REQUEST, LIST_THREADS, 1, b'{"user":2}'))
    assert table.answer(decoder, 0) == reply(LIST_THREADS, 1, b"threads")
    assert table.held(2, read_only=True) == table.held(2)
    table.put(2, COUNTS, b'{"user":2}', b"counts again", read=False)  # replaced: unread
    assert table.held(2, read_only=True) == [(LIST_THREADS, b'{"user":2}')]
    table.forget(2)
    assert table.held(2, read_only=True) == [] and table.held(3, read_only=True) == []


def test_the_table_is_bounded_per_user_and_in_all(twin: Twin) -> None:
    table = twin.ReplyTable(max_bytes=10_000, per_user=4)
    for n in range(10):
        table.put(2, COUNTS, b'{"user":2,"n":%d}' % n, b"x" * 10)
    assert len(table) <= 4
    for user in range(1, 200):
        table.put(user, COUNTS, b'{"user":%d}' % user, b"y" * 100)
    assert table.nbytes <= 10_000
    assert 0 < len(table) < 199
    table.put(5, COUNTS, b"{}", b"z" * 20_000)  # larger than the whole table: not held
    assert table.nbytes <= 10_000


@pytest.mark.parametrize(
    ("user", "op", "payload", "reply_body", "error"),
    [
        (0, COUNTS, b"{}", b"{}", ValueError),
        (2**64, COUNTS, b"{}", b"{}", ValueError),
        (True, COUNTS, b"{}", b"{}", ValueError),
        (2, 256, b"{}", b"{}", ValueError),
        (2, -1, b"{}", b"{}", ValueError),
        (2, COUNTS, "{}", b"{}", TypeError),
        (2, COUNTS, b"{}", bytearray(b"{}"), TypeError),
    ],
)
def test_bad_puts_are_refused(
    twin: Twin, user: Any, op: Any, payload: Any, reply_body: Any, error: type
) -> None:
    with pytest.raises(error):
        twin.ReplyTable().put(user, op, payload, reply_body)


def test_many_entries_grow_the_native_hash_table(twin: Twin) -> None:
    table = twin.ReplyTable()
    for user in range(1, 5001):
        table.put(user, COUNTS, b'{"user":%d}' % user, b"%d" % user)
    for user in range(1, 5001, 2):
        table.forget(user)
    decoder = twin.decoder_with(
        *((KIND_REQUEST, COUNTS, user, b'{"user":%d}' % user) for user in range(2, 5001, 2))
    )
    out = table.answer(decoder, 0)
    assert out == b"".join(reply(COUNTS, user, b"%d" % user) for user in range(2, 5001, 2))
    assert len(table) == 2500


PUT = st.tuples(
    st.just("put"),
    st.integers(1, 5),
    st.sampled_from([COUNTS, LIST_THREADS]),
    st.integers(0, 6),
    st.binary(max_size=40),
    st.booleans(),
)
# (kind, op, request id, user, n) of a frame whose payload is {"user":user,"n":n}
FRAME = st.tuples(
    st.sampled_from([KIND_REQUEST, KIND_REPLY]),
    st.sampled_from([COUNTS, 20, 21]),
    st.integers(0, 3),
    st.integers(1, 5),
    st.integers(0, 6),
)
ASK = st.tuples(st.just("ask"), st.integers(0, 5), st.lists(FRAME, max_size=6))
FORGET = st.tuples(st.just("forget"), st.integers(1, 5))
ACTIONS = st.lists(st.one_of(PUT, FORGET, st.tuples(st.just("clear")), ASK), max_size=40)


@settings(max_examples=200, deadline=None)
@given(actions=ACTIONS)
def test_the_twins_answer_byte_for_byte_alike(actions: list[tuple]) -> None:
    native = _native()
    pure = Twin("pure", pure_frame, pure_replies.ReplyTable)
    tables = [native.ReplyTable(max_bytes=2_000, per_user=3), pure.ReplyTable(2_000, 3)]
    for action in actions:
        if action[0] == "put":
            _, user, op, n, body, read = action
            payload = b'{"user":%d,"n":%d}' % (user, n)
            for table in tables:
                table.put(user, op, payload, body, read=read)
        elif action[0] == "forget":
            for table in tables:
                table.forget(action[1])
        elif action[0] == "clear":
            for table in tables:
                table.clear()
        else:
            _, scope, frames = action
            wire = [(kind, op, rid, b'{"user":%d,"n":%d}' % (user, n))
                    for kind, op, rid, user, n in frames]  # fmt: skip
            outcomes = []
            for twin, table in zip((native, pure), tables, strict=True):
                decoder = twin.decoder_with(*wire)
                outcomes.append((table.answer(decoder, scope), list(decoder)))
            assert outcomes[0] == outcomes[1]
        assert [len(t) for t in tables] == [len(tables[0])] * 2
        assert tables[0].nbytes == tables[1].nbytes
        for user in range(1, 6):
            assert tables[0].held(user, read_only=True) == tables[1].held(user, read_only=True)
    assert tables[0].hits() == tables[1].hits()
