"""The wire-frame codec: one suite run against the Cython codec and its pure-Python twin.

The "native" parameter is skipped only under PYSERVER_PURE=1; otherwise a missing
`pyserver_framecodec` build fails these tests instead of hiding behind a skip.
"""

from __future__ import annotations

import itertools
import mmap
import pickle
import re
import struct
import time
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyserver import implementation
from pyserver.errors import BadFrameVersion, FrameError, FrameTooLarge
from pyserver.framedef import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    KIND_ERROR,
    KIND_EVENT,
    KIND_REPLY,
    KIND_REQUEST,
    Frame,
)
from pyserver.pure import frame as pure_frame
from pyserver.wire import frame as facade
from tests import support


def _native() -> ModuleType:
    return support.native("pyserver_framecodec")


@pytest.fixture(params=["native", "pure"])
def codec(request: pytest.FixtureRequest) -> ModuleType:
    return _native() if request.param == "native" else pure_frame


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    return _native(), pure_frame


def raw(length: int, version: int = 1, kind: int = 0, op: int = 0, request_id: int = 0) -> bytes:
    """A frame header with arbitrary (possibly invalid) fields, built independently of the codec."""
    return struct.pack(">IBBHI", length, version, kind, op, request_id)


SAMPLE = [
    Frame(KIND_REQUEST, 1, 0, b""),
    Frame(KIND_REPLY, 2, 7, b'{"ok":true}'),
    Frame(KIND_ERROR, 0xFFFF, 0xFFFF_FFFF, b'{"code":"NOT_FOUND","message":"no such thread"}'),
    Frame(KIND_EVENT, 300, 123_456, bytes(range(256))),
]


def encode_all(codec: ModuleType, frames: list[Frame]) -> bytes:
    return b"".join(codec.encode_frame(*f) for f in frames)


def drain(decoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


# ---- encoding ----


def test_encode_exact_bytes(codec):
    assert codec.encode_frame(KIND_REPLY, 0x0102, 0x0A0B0C0D, b'{"a":1}') == (
        b"\x00\x00\x00\x0f" + b"\x01" + b"\x01" + b"\x01\x02" + b"\x0a\x0b\x0c\x0d" + b'{"a":1}'
    )
    assert codec.encode_frame(KIND_REQUEST, 0, 0, b"") == b"\x00\x00\x00\x08\x01\x00" + bytes(6)


def test_encode_returns_bytes_for_every_payload_type(codec):
    expected = codec.encode_frame(1, 2, 3, b"abcdef")
    for payload in (bytearray(b"abcdef"), memoryview(b"abcdef"), memoryview(b"xabcdefx")[1:-1]):
        out = codec.encode_frame(1, 2, 3, payload)
        assert type(out) is bytes
        assert out == expected
    # A non-contiguous view is taken in logical order; a typed view as its raw bytes.
    assert codec.encode_frame(1, 2, 3, memoryview(b"aXbXcXdXeXfX")[::2]) == expected
    typed = memoryview(bytearray(b"abcdefgh")).cast("I")
    assert codec.encode_frame(1, 2, 3, typed) == codec.encode_frame(1, 2, 3, b"abcdefgh")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", -1),
        ("kind", 4),
        ("kind", 255),
        ("op", -1),
        ("op", 0x1_0000),
        ("request_id", -1),
        ("request_id", 0x1_0000_0000),
        ("request_id", 2**64),
        ("request_id", -(2**100)),
        ("op", 2**200),
    ],
)
def test_encode_rejects_out_of_range_fields(codec, field, value):
    fields = {"kind": 0, "op": 1, "request_id": 2} | {field: value}
    with pytest.raises(ValueError, match=rf"^{field} {value} is out of range"):
        codec.encode_frame(fields["kind"], fields["op"], fields["request_id"], b"{}")


@pytest.mark.parametrize("value", [1.0, "1", None, b"\x01"])
def test_encode_rejects_non_int_fields(codec, value):
    for position, name in enumerate(("kind", "op", "request_id")):
        args = [0, 1, 2, b"{}"]
        args[position] = value
        with pytest.raises(TypeError, match=rf"^{name} must be an int"):
            codec.encode_frame(*args)


@pytest.mark.parametrize("payload", ["{}", 5, None, [1, 2]])
def test_encode_rejects_non_bytes_payload(codec, payload):
    with pytest.raises(
        TypeError, match=re.escape("payload must be bytes, bytearray or memoryview")
    ):
        codec.encode_frame(0, 1, 2, payload)


def test_encode_rejects_a_payload_too_large_for_the_length_field(codec):
    try:  # anonymous and never touched, so it costs address space, not memory
        area = mmap.mmap(-1, 2**32 - 7)
    except (OSError, OverflowError, MemoryError) as exc:
        pytest.skip(f"cannot map 4 GiB of address space: {exc}")
    view = memoryview(area)
    try:
        with pytest.raises(ValueError, match="the frame length must fit in 32 bits"):
            codec.encode_frame(0, 1, 2, view)
    finally:
        view.release()
        area.close()


def test_encode_accepts_the_extreme_valid_fields(codec):
    data = codec.encode_frame(KIND_EVENT, 0xFFFF, 0xFFFF_FFFF, b"x")
    assert data == b"\x00\x00\x00\x09\x01\x03\xff\xff\xff\xff\xff\xffx"
    assert codec.encode_frame(True, 0, 0, b"") == codec.encode_frame(1, 0, 0, b"")


# ---- decoding whole streams ----


def test_round_trip(codec):
    decoder = codec.FrameDecoder()
    decoder.feed(encode_all(codec, SAMPLE))
    frames = drain(decoder)
    assert frames == SAMPLE
    assert all(type(f) is Frame for f in frames)
    assert all(type(f.payload) is bytes for f in frames)
    assert frames[2].request_id == 0xFFFF_FFFF and frames[2].op == 0xFFFF
    assert decoder.buffered == 0
    assert decoder.next_frame() is None


def test_decoded_frames_behave_as_the_named_tuple(codec):
    decoder = codec.FrameDecoder()
    decoder.feed(codec.encode_frame(KIND_REPLY, 9, 42, b"{}"))
    frame = decoder.next_frame()
    assert frame == (KIND_REPLY, 9, 42, b"{}")
    assert (frame.kind, frame.op, frame.request_id, frame.payload) == (1, 9, 42, b"{}")
    assert frame._asdict() == {"kind": 1, "op": 9, "request_id": 42, "payload": b"{}"}
    assert hash(frame) == hash((1, 9, 42, b"{}"))
    assert pickle.loads(pickle.dumps(frame)) == frame
    assert repr(frame) == "Frame(kind=1, op=9, request_id=42, payload=b'{}')"


def test_every_split_point_of_a_multi_frame_stream(codec):
    stream = encode_all(codec, SAMPLE)
    for cut in range(len(stream) + 1):
        decoder = codec.FrameDecoder()
        decoder.feed(stream[:cut])
        first = drain(decoder)
        assert decoder.buffered == cut - sum(HEADER_SIZE + len(f.payload) for f in first)
        decoder.feed(stream[cut:])
        assert first + drain(decoder) == SAMPLE, cut
        assert decoder.buffered == 0


def test_every_pair_of_split_points(codec):
    frames = SAMPLE[:3]
    stream = encode_all(codec, frames)
    for a in range(0, len(stream) + 1, 3):
        for b in range(a, len(stream) + 1, 5):
            decoder = codec.FrameDecoder()
            out = []
            for piece in (stream[:a], stream[a:b], stream[b:]):
                decoder.feed(piece)
                out += drain(decoder)
            assert out == frames, (a, b)


def test_one_byte_at_a_time(codec):
    stream = encode_all(codec, SAMPLE)
    ends = []
    position = 0
    for f in SAMPLE:
        position += HEADER_SIZE + len(f.payload)
        ends.append(position)
    decoder = codec.FrameDecoder()
    out = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        frame = decoder.next_frame()
        if i + 1 in ends:
            assert frame == SAMPLE[ends.index(i + 1)]
        else:
            assert frame is None, i
        if frame is not None:
            out.append(frame)
    assert out == SAMPLE
    assert decoder.buffered == 0


def test_one_byte_at_a_time_without_draining_in_between(codec):
    stream = encode_all(codec, SAMPLE)
    decoder = codec.FrameDecoder()
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
    assert decoder.buffered == len(stream)
    assert list(decoder) == SAMPLE


def test_many_frames_in_one_chunk(codec):
    frames = [Frame(i % 4, i % 65536, i * 7919, b'{"n":%d}' % i) for i in range(2000)]
    decoder = codec.FrameDecoder()
    decoder.feed(encode_all(codec, frames) + codec.encode_frame(0, 1, 2, b"{}")[:5])
    assert list(decoder) == frames
    assert decoder.buffered == 5


def test_a_large_frame_in_many_small_chunks_decodes_in_linear_time(codec):
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = codec.encode_frame(KIND_REPLY, 5, 6, payload)
    decoder = codec.FrameDecoder(max_frame_size=2 << 20)
    start = time.perf_counter()
    for i in range(0, len(data), 64):
        assert decoder.next_frame() is None
        decoder.feed(data[i : i + 64])
    frame = decoder.next_frame()
    elapsed = time.perf_counter() - start
    assert frame == Frame(KIND_REPLY, 5, 6, payload)
    # Re-copying the partial frame on every chunk would copy ~8 GiB here: many seconds.
    assert elapsed < 3.0


def test_a_long_stream_in_odd_chunks_with_uneven_reads(codec):
    """Exercises the buffer's growth, sliding and release with frames of many sizes."""
    frames = [Frame(i % 4, i, i * 31, bytes([i % 251]) * (i * 37 % 3001)) for i in range(400)]
    stream = encode_all(codec, frames)
    chunk_sizes = [1, 4095, 16384, 70000, 333, 300_000, 12]
    read_counts = [0, 1, 5, 0, 100, 2, 0, 1000]
    decoder = codec.FrameDecoder()
    out = []
    position = 0
    step = 0
    while position < len(stream):
        chunk = stream[position : position + chunk_sizes[step % len(chunk_sizes)]]
        position += len(chunk)
        decoder.feed(chunk)
        for _ in range(read_counts[step % len(read_counts)]):
            if (frame := decoder.next_frame()) is None:
                break
            out.append(frame)
        consumed = sum(HEADER_SIZE + len(f.payload) for f in out)
        assert decoder.buffered == position - consumed
        step += 1
    out += drain(decoder)
    assert out == frames
    assert decoder.buffered == 0
    # The decoder is reusable after its buffer was emptied (and possibly released).
    boundary = sum(HEADER_SIZE + len(f.payload) for f in frames[:150])
    decoder.feed(stream[:boundary])
    assert drain(decoder) == frames[:150]
    assert decoder.buffered == 0


def test_iteration_stops_when_more_bytes_are_needed_and_resumes_after_feed(codec):
    stream = encode_all(codec, SAMPLE)
    cut = HEADER_SIZE * 3 + len(SAMPLE[1].payload)  # inside the third frame
    decoder = codec.FrameDecoder()
    decoder.feed(stream[:cut])
    iterator = iter(decoder)
    assert list(iterator) == SAMPLE[:2]
    decoder.feed(stream[cut:])
    assert list(iterator) == []  # an exhausted iterator stays exhausted
    assert list(decoder) == SAMPLE[2:]


def test_bytearray_and_memoryview_input_is_copied(codec):
    stream = encode_all(codec, SAMPLE)
    decoder = codec.FrameDecoder()
    chunk = bytearray(stream[:20])
    decoder.feed(chunk)
    chunk[:] = b"\xff" * 20  # the caller reuses its buffer
    backing = bytearray(b"xx" + stream[20:100] + b"yy")
    decoder.feed(memoryview(backing)[2:-2])
    backing[:] = bytes(len(backing))
    decoder.feed(memoryview(stream[100:]))
    assert drain(decoder) == SAMPLE


def test_non_contiguous_and_typed_memoryviews_feed_their_bytes(codec):
    stream = encode_all(codec, SAMPLE[:2])
    spread = bytearray(2 * len(stream))
    spread[::2] = stream
    decoder = codec.FrameDecoder()
    decoder.feed(memoryview(spread)[::2])
    assert drain(decoder) == SAMPLE[:2]
    padded = stream + bytes(-len(stream) % 4)
    decoder.feed(memoryview(padded).cast("I"))
    assert drain(decoder) == SAMPLE[:2]
    assert decoder.buffered == len(padded) - len(stream)


@pytest.mark.parametrize("data", ["text", 5, None, [1, 2]])
def test_feed_rejects_other_types(codec, data):
    decoder = codec.FrameDecoder()
    with pytest.raises(TypeError, match=re.escape("feed() takes bytes, bytearray or memoryview")):
        decoder.feed(data)
    assert decoder.buffered == 0


def test_empty_feeds_change_nothing(codec):
    decoder = codec.FrameDecoder()
    decoder.feed(b"")
    decoder.feed(bytearray())
    decoder.feed(memoryview(b""))
    assert decoder.buffered == 0
    assert decoder.next_frame() is None


# ---- limits and errors ----


def test_max_size_boundary_exactly(codec):
    decoder = codec.FrameDecoder(max_frame_size=100)
    assert decoder.max_frame_size == 100
    decoder.feed(codec.encode_frame(0, 1, 2, b"a" * 92))  # length field 100
    assert decoder.next_frame() == Frame(0, 1, 2, b"a" * 92)
    decoder.feed(codec.encode_frame(0, 1, 2, b"a" * 93))  # length field 101
    with pytest.raises(
        FrameTooLarge, match=re.escape("frame length 101 is over the limit of 100 bytes")
    ):
        decoder.next_frame()


def test_default_max_size_boundary(codec):
    decoder = codec.FrameDecoder()
    assert decoder.max_frame_size == DEFAULT_MAX_FRAME_SIZE
    payload = b"p" * (DEFAULT_MAX_FRAME_SIZE - 8)
    decoder.feed(codec.encode_frame(3, 4, 5, payload))
    assert decoder.next_frame() == Frame(3, 4, 5, payload)
    decoder.feed(raw(DEFAULT_MAX_FRAME_SIZE + 1)[:4])
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_too_large_is_raised_as_soon_as_the_length_is_seen(codec):
    decoder = codec.FrameDecoder(max_frame_size=1000)
    decoder.feed(raw(1001)[:3])
    assert decoder.next_frame() is None  # the length is not whole yet
    decoder.feed(raw(1001)[3:4])
    with pytest.raises(FrameTooLarge) as caught:
        decoder.next_frame()
    assert str(caught.value) == "frame length 1001 is over the limit of 1000 bytes"
    assert caught.value.code == "TOO_LARGE"
    assert isinstance(caught.value, FrameError)


def test_a_limit_beyond_the_length_field_accepts_every_length(codec):
    decoder = codec.FrameDecoder(max_frame_size=2**40)
    decoder.feed(b"\xff\xff\xff\xff\x01\x00")
    assert decoder.next_frame() is None  # 4 GiB declared, nothing wrong yet


@pytest.mark.parametrize("length", [0, 1, 7])
def test_a_length_under_the_header_size_is_an_error(codec, length):
    decoder = codec.FrameDecoder()
    decoder.feed(raw(length)[:4])
    with pytest.raises(FrameError) as caught:
        decoder.next_frame()
    assert type(caught.value) is FrameError
    assert str(caught.value) == f"frame length {length} is under 8, the size of the header"


@pytest.mark.parametrize("version", [0, 2, 255])
def test_a_bad_version_is_an_error(codec, version):
    decoder = codec.FrameDecoder()
    decoder.feed(raw(20, version=version))
    with pytest.raises(BadFrameVersion) as caught:
        decoder.next_frame()
    assert str(caught.value) == f"frame version {version} is not supported (expected 1)"
    assert caught.value.code == "BAD_REQUEST"


@pytest.mark.parametrize("kind", [4, 9, 255])
def test_an_unknown_kind_is_an_error(codec, kind):
    decoder = codec.FrameDecoder()
    decoder.feed(raw(8, kind=kind))
    with pytest.raises(FrameError) as caught:
        decoder.next_frame()
    assert type(caught.value) is FrameError
    assert str(caught.value) == f"frame kind {kind} is unknown (expected 0 to 3)"


def test_the_header_is_checked_before_the_body_arrives(codec):
    decoder = codec.FrameDecoder()
    decoder.feed(raw(1000, version=7)[:11])
    assert decoder.next_frame() is None  # 11 bytes: the header is not whole yet
    decoder.feed(raw(1000, version=7)[11:])
    with pytest.raises(BadFrameVersion):
        decoder.next_frame()


def test_frames_before_a_bad_one_are_delivered(codec):
    good = encode_all(codec, SAMPLE[:3])
    decoder = codec.FrameDecoder()
    decoder.feed(good + raw(8, version=9) + codec.encode_frame(0, 1, 2, b"{}"))
    assert [decoder.next_frame() for _ in range(3)] == SAMPLE[:3]
    with pytest.raises(BadFrameVersion):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("bad", "error"),
    [(raw(2000), FrameTooLarge), (raw(3), FrameError), (raw(8, version=2), BadFrameVersion)],
)
def test_errors_are_sticky(codec, bad, error):
    decoder = codec.FrameDecoder(max_frame_size=1000)
    decoder.feed(codec.encode_frame(0, 1, 2, b"{}") + bad)
    assert decoder.next_frame() == Frame(0, 1, 2, b"{}")
    with pytest.raises(error) as first:
        decoder.next_frame()
    held = decoder.buffered
    decoder.feed(codec.encode_frame(0, 1, 2, b"{}"))  # valid bytes cannot repair the stream
    assert decoder.buffered == held
    for _ in range(3):
        with pytest.raises(error) as again:
            decoder.next_frame()
        assert type(again.value) is type(first.value)
        assert str(again.value) == str(first.value)
    with pytest.raises(error):
        list(decoder)


@pytest.mark.parametrize("limit", [7, 0, -1])
def test_a_limit_under_the_smallest_frame_is_refused(codec, limit):
    with pytest.raises(ValueError, match=f"^max_frame_size {limit} is below 8"):
        codec.FrameDecoder(limit)


@pytest.mark.parametrize("limit", [1.5, "100", None])
def test_a_non_int_limit_is_refused(codec, limit):
    with pytest.raises(TypeError, match=re.escape("max_frame_size must be an int")):
        codec.FrameDecoder(max_frame_size=limit)


# ---- the facade and the shared definition ----


def test_the_facade_exports_the_chosen_twin():
    if implementation.framecodec is not None:
        assert facade.IMPLEMENTATION == "native"
        assert facade.FrameDecoder is implementation.framecodec.FrameDecoder
        assert facade.encode_frame is implementation.framecodec.encode_frame
    else:
        assert facade.IMPLEMENTATION == "pure"
        assert facade.FrameDecoder is pure_frame.FrameDecoder
    assert facade.Frame is Frame
    assert (facade.VERSION, facade.HEADER_SIZE, facade.DEFAULT_MAX_FRAME_SIZE) == (1, 12, 1 << 20)
    assert (facade.KIND_REQUEST, facade.KIND_REPLY, facade.KIND_ERROR, facade.KIND_EVENT) == (
        0,
        1,
        2,
        3,
    )


def test_the_native_codec_is_used_unless_pure_is_forced():
    if implementation.PURE_FORCED:
        assert facade.IMPLEMENTATION == "pure"
    else:
        _native()
        assert facade.IMPLEMENTATION == "native"


# ---- properties: the twins agree ----

fields = st.tuples(
    st.integers(0, 3),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF_FFFF),
    st.binary(max_size=64),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(fields, max_size=12),
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    reads=st.lists(st.integers(0, 3), min_size=9, max_size=9),
)
def test_random_frames_split_at_random_points_decode_identically(both, frames, cuts, reads):
    """Feeds interleaved with a random number of reads (none, some, or more than ready)."""
    stream = encode_all(pure_frame, frames)
    assert encode_all(both[0], frames) == stream
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    for codec in both:
        decoder = codec.FrameDecoder()
        out = []
        for (start, end), read_count in zip(itertools.pairwise(bounds), reads, strict=False):
            decoder.feed(stream[start:end])
            for _ in range(read_count):
                if (frame := decoder.next_frame()) is not None:
                    out.append(frame)
        out += drain(decoder)
        assert out == [Frame(*f) for f in frames]
        assert decoder.buffered == 0


def test_chunks_fed_while_earlier_frames_are_unread_keep_their_order(codec):
    stream = encode_all(codec, SAMPLE[:2])
    decoder = codec.FrameDecoder()
    decoder.feed(stream[:12])  # the first frame, whole
    decoder.feed(stream[12:14])  # two bytes of the second
    assert decoder.next_frame() == SAMPLE[0]
    assert decoder.next_frame() is None
    decoder.feed(stream[14:20])
    decoder.feed(stream[20:])
    assert drain(decoder) == SAMPLE[1:2]


def outcome(codec: ModuleType, chunks: list[bytes], limit: int) -> tuple:
    """Frames decoded, then the error (class and message) if any, and the bytes left."""
    decoder = codec.FrameDecoder(limit)
    fed = sum(len(c) for c in chunks)
    frames = []
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            frames += drain(decoder)
        except FrameError as exc:
            # Each frame consumed at least 12 bytes, so draining cannot have looped forever.
            assert len(frames) * HEADER_SIZE <= fed
            return frames, type(exc), str(exc), decoder.buffered
        assert len(frames) * HEADER_SIZE <= fed
    return frames, None, None, decoder.buffered


@settings(max_examples=300, deadline=2000)
@given(
    garbage=st.lists(st.binary(max_size=40), max_size=6),
    limit=st.integers(8, 64),
    valid_prefix=st.booleans(),
)
def test_random_garbage_only_raises_frame_errors_and_the_twins_agree(
    both, garbage, limit, valid_prefix
):
    chunks = list(garbage)
    if valid_prefix:
        chunks.insert(0, pure_frame.encode_frame(1, 2, 3, b""))  # fits even the lowest limit
    # Any exception other than FrameError (and its subclasses) escapes and fails the test.
    native, pure = (outcome(codec, chunks, limit) for codec in both)
    assert native == pure
    if valid_prefix:
        assert native[0][:1] == [Frame(1, 2, 3, b"")]


@settings(max_examples=150, deadline=None)
@given(kind=st.integers(-2, 6), op=st.integers(-2, 0x10002), request_id=st.integers(-2, 2**33))
def test_encode_errors_agree(both, kind, op, request_id):
    results = []
    for codec in both:
        try:
            results.append(codec.encode_frame(kind, op, request_id, b"{}"))
        except ValueError as exc:
            results.append(("ValueError", str(exc)))
    assert results[0] == results[1]
