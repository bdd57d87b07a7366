"""Micro-benchmark of the wire-frame decoder: Cython vs pure Python, with a struct peer.

`frame_decode`: nanoseconds per frame to decode a stream of small frames (40-byte JSON
payloads, 10,000 frames) fed in 64 KiB chunks and drained by iteration after each chunk.
The "struct" peer is the floor a Python decoder can hope for: a non-incremental loop of
`struct.unpack_from` over the whole buffer at once, building plain tuples.
"""

from __future__ import annotations

from collections.abc import Callable
from struct import Struct

from bench.timing import compare, entry
from pyserver.framedef import KIND_REQUEST, Frame
from pyserver.pure import frame as pure_frame

CHUNK_SIZE = 64 * 1024
PAYLOAD = b'{"thread":123456789,"text":"hello there"}'[:40]
_HEADER = Struct(">IBBHI")


def _native_module():
    from pyserver_framecodec import _codec  # missing build → ImportError, not a silent skip

    return _codec


def _stream(frames: int) -> bytes:
    return b"".join(
        pure_frame.encode_frame(KIND_REQUEST, 1 + i % 40, i, PAYLOAD) for i in range(frames)
    )


def _chunks(stream: bytes) -> list[bytes]:
    return [stream[i : i + CHUNK_SIZE] for i in range(0, len(stream), CHUNK_SIZE)]


def _incremental(decoder_class: type, chunks: list[bytes], frames: int) -> Callable[[], None]:
    def run() -> None:
        decoder = decoder_class()
        feed = decoder.feed
        count = 0
        for chunk in chunks:
            feed(chunk)
            for _frame in decoder:
                count += 1
        if count != frames:
            raise AssertionError(f"decoded {count} frames, expected {frames}")

    return run


def _struct_loop(stream: bytes, frames: int) -> Callable[[], None]:
    unpack_from = _HEADER.unpack_from

    def run() -> None:
        out = []
        append = out.append
        pos = 0
        end = len(stream)
        while pos < end:
            length, _version, kind, op, request_id = unpack_from(stream, pos)
            append((kind, op, request_id, stream[pos + 12 : pos + 4 + length]))
            pos += 4 + length
        if len(out) != frames:
            raise AssertionError(f"decoded {len(out)} frames, expected {frames}")

    return run


def run(quick: bool = False) -> dict[str, dict]:
    """The `frame_decode` figures, Cython and pure measured side by side in one run."""
    codec = _native_module()
    frames = 10_000
    stream = _stream(frames)
    chunks = _chunks(stream)
    # Both twins must decode the same stream to the same frames before being timed.
    expected = list(_decoded(pure_frame.FrameDecoder, chunks))
    if list(_decoded(codec.FrameDecoder, chunks)) != expected or len(expected) != frames:
        raise AssertionError("the Cython and pure decoders disagree")
    ns = compare(
        {
            "native": _incremental(codec.FrameDecoder, chunks, frames),
            "pure": _incremental(pure_frame.FrameDecoder, chunks, frames),
            "struct": _struct_loop(stream, frames),
        },
        ops_per_call=frames,
        rounds=3 if quick else 7,
        round_s=0.02 if quick else 0.3,
    )
    return {"frame_decode": entry(ns["native"], ns["pure"], {"struct": ns["struct"]})}


def _decoded(decoder_class: type, chunks: list[bytes]) -> list[Frame]:
    decoder = decoder_class()
    out: list[Frame] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out.extend(decoder)
    return out
