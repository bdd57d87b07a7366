"""The SMS gateway's codecs: GSM 03.38 and UCS-2 text, concatenated parts, and SMPP PDUs,
cross-checked against two independent SMPP implementations (smpp34's Rust codec and
smpplib) and fuzzed with hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserver.sms import codings, concat, gsm
from pyserver.sms.pdu import BadPdu, Command, FramingError, Pdu, PduDecoder, Status, encode

smpp34 = pytest.importorskip("smpp34")
smpplib_smpp = pytest.importorskip("smpplib.smpp")
smpplib_command = pytest.importorskip("smpplib.command")

GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = "\f^{}\\[~]|€"


# ---- GSM 03.38 and UCS-2 ----


def test_every_gsm_character_round_trips_and_extensions_take_two_septets() -> None:
    encoded = gsm.encode_gsm(GSM_BASIC)
    assert encoded is not None and len(encoded) == len(GSM_BASIC) == 127
    assert gsm.decode_gsm(encoded) == GSM_BASIC
    extended = gsm.encode_gsm(GSM_EXTENSION)
    assert extended is not None and len(extended) == 2 * len(GSM_EXTENSION)
    assert all(extended[i] == 0x1B for i in range(0, len(extended), 2))
    assert gsm.decode_gsm(extended) == GSM_EXTENSION
    assert gsm.encode_gsm("naïve") is None and gsm.encode_gsm("☃") is None


def test_gsm_decoding_is_total_as_the_standard_says_receivers_show_it() -> None:
    assert gsm.decode_gsm(b"\x1b\x41") == "A"  # an unknown extension: its basic character
    assert gsm.decode_gsm(b"A\x1b") == "A "  # an escape at the end: a space
    assert gsm.decode_gsm(b"\x1b\x1b") == " "
    assert gsm.decode_gsm(b"\xc1") == "A"  # a high bit is not a septet


@given(st.binary(max_size=400), st.integers(0, 255))
def test_decoding_any_bytes_in_any_data_coding_never_raises_nor_loses_them(
    data: bytes, coding: int
) -> None:
    gsm.decode_gsm(data)
    gsm.decode_body(data, gsm.DATA_CODING_UCS2)
    body = codings.read_body(data, coding)
    assert isinstance(body.text, str)
    assert body.kept is None or body.kept == data


def test_single_byte_character_sets_decode_as_smpp_34_names_them() -> None:
    assert codings.read_body(b"plain {ascii} ~", 0x01).text == "plain {ascii} ~"
    assert codings.read_body(b"caf\xe9 \xa3", 0x01).text == "caf\ufffd \ufffd"  # 7-bit only
    assert codings.read_body("Grüße £ ÿ".encode("latin-1"), 0x03).text == "Grüße £ ÿ"
    assert codings.read_body("Привет, мир".encode("iso8859_5"), 0x06).text == "Привет, мир"
    hebrew = "שלום עולם 42"
    assert codings.read_body(hebrew.encode("iso8859_8"), 0x07).text == hebrew
    assert codings.read_body(b"\xa1", 0x07).text == "\ufffd"  # unassigned in ISO-8859-8
    for coding in (0x01, 0x03, 0x06, 0x07):
        assert codings.read_body(b"x", coding).kept is None
    # GSM 03.38 data coding schemes: class 0 default alphabet, UCS-2 with message waiting
    assert codings.read_body(b"\x1b\x65 5", 0xF0).text == "€ 5"
    assert codings.read_body("☃".encode("utf-16-be"), 0xE0).text == "☃"
    assert codings.read_body("ok".encode("utf-16-be"), 0x18).text == "ok"


@pytest.mark.parametrize("coding", [0x02, 0x04, 0xF4, 0x15, 0x05, 0x09, 0x0E, 0x0B, 0x24, 0x90])
def test_binary_and_undecoded_codings_keep_the_bytes_and_say_so(coding: int) -> None:
    data = bytes(range(0, 256, 3))
    body = codings.read_body(data, coding)
    assert body.kept == data
    assert f"data_coding 0x{coding:02X}, {len(data)} bytes, kept" in body.text
    binary = coding in (0x02, 0x04, 0xF4, 0x15)
    assert ("binary" in body.text) == binary
    assert ("does not decode" in body.text) == (not binary)


def test_ucs2_carries_what_gsm_cannot() -> None:
    encoded = gsm.split_text("Grüße aus Köln ☃ 😀")
    assert encoded.data_coding == gsm.DATA_CODING_UCS2
    assert gsm.decode_body(b"".join(encoded.parts), 8) == "Grüße aus Köln ☃ 😀"


@pytest.mark.parametrize(
    ("text", "parts", "coding"),
    [
        ("a" * 160, 1, 0),
        ("a" * 161, 2, 0),
        ("a" * 306, 2, 0),
        ("a" * 307, 3, 0),
        ("€" * 80, 1, 0),  # 160 septets
        ("€" * 81, 2, 0),
        ("☃" * 70, 1, 8),
        ("☃" * 71, 2, 8),
        ("☃" * 134, 2, 8),
        ("☃" * 135, 3, 8),
    ],
)
def test_texts_split_at_160_153_70_67(text: str, parts: int, coding: int) -> None:
    encoded = gsm.split_text(text)
    assert (len(encoded.parts), encoded.data_coding) == (parts, coding)


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from([*GSM_BASIC, *GSM_EXTENSION, "😀", "☃"]), max_size=700))
def test_parts_stay_within_limits_cut_no_pair_and_join_to_the_text(text: str) -> None:
    encoded = gsm.split_text(text)
    single, part = (160, 153) if encoded.data_coding == 0 else (140, 134)
    limit = single if len(encoded.parts) == 1 else part
    assert all(len(body) <= limit for body in encoded.parts)
    for body in encoded.parts:
        if encoded.data_coding == 0:  # no part ends in the middle of an escape pair
            assert gsm.decode_gsm(body) == gsm.decode_gsm(body)
            trailing = len(body) - len(body.rstrip(b"\x1b"))
            assert trailing % 2 == 0
        else:  # no part ends on a high surrogate
            assert not (0xD8 <= body[-2] <= 0xDB) if body else True
    joined = b"".join(encoded.parts)
    assert gsm.decode_body(joined, encoded.data_coding) == text


def test_a_text_of_more_than_255_parts_is_refused() -> None:
    with pytest.raises(ValueError, match="256 parts, over 255"):
        gsm.split_text("a" * (153 * 255 + 1))


# ---- concatenation ----


def test_headers_of_both_kinds_and_sar_tlvs_are_read() -> None:
    eight = concat.udh_for(0x2A, 3, 2) + b"hello"
    assert concat.read_part(eight, concat.UDHI) == concat.Part(b"hello", 0x2A, 3, 2)
    sixteen = bytes([6, 0x08, 4, 0x12, 0x34, 2, 1]) + b"hi"
    assert concat.read_part(sixteen, concat.UDHI) == concat.Part(b"hi", 0x1234, 2, 1)
    assert concat.read_part(b"plain", 0, sar=(7, 2, 2)) == concat.Part(b"plain", 7, 2, 2)
    # another element first (0x70, 1 octet), then the concatenation
    other = bytes([8, 0x70, 1, 0xFF, 0x00, 3, 9, 2, 2]) + b"x"
    assert concat.read_part(other, concat.UDHI) == concat.Part(b"x", 9, 2, 2)


@pytest.mark.parametrize(
    "body",
    [
        bytes([5, 0x00, 3, 1, 0, 1]) + b"total zero",
        bytes([5, 0x00, 3, 1, 2, 3]) + b"number past total",
        bytes([9]) + b"short",
        bytes([3, 0x00, 3]) + b"cut element",
    ],
)
def test_a_malformed_header_never_raises(body: bytes) -> None:
    part = concat.read_part(body, concat.UDHI)
    assert part.reference is None or 1 <= part.number <= part.total


def test_parts_reassemble_in_any_order_without_duplicates() -> None:
    parts = [concat.Part(f"p{n}".encode(), 5, 3, n) for n in (1, 2, 3)]
    reassembler = concat.Reassembler(timeout_s=10)
    origin = ("+15550001", "12345")
    assert reassembler.add(origin, parts[2], now=0) is None
    assert reassembler.add(origin, parts[0], now=1) is None
    assert reassembler.add(origin, parts[0], now=2) is None  # a duplicate
    done = reassembler.add(origin, parts[1], now=3)
    assert done is not None and done.complete and done.bodies == [b"p1", b"p2", b"p3"]
    assert reassembler.add(origin, parts[1], now=4) is None  # late duplicate: nothing new
    assert reassembler.duplicates == 2 and len(reassembler) == 0
    assert reassembler.expired(now=100) == []


def test_an_incomplete_set_times_out_into_what_arrived() -> None:
    reassembler = concat.Reassembler(timeout_s=10)
    reassembler.add(("a", "b"), concat.Part(b"one", 9, 3, 1), now=0)
    reassembler.add(("a", "b"), concat.Part(b"three", 9, 3, 3), now=1)
    assert reassembler.expired(now=9) == []
    [given_up] = reassembler.expired(now=10)
    assert not given_up.complete and given_up.bodies == [b"one", b"three"]
    assert given_up.missing == [2]


def test_the_oldest_sets_are_given_up_past_the_bound() -> None:
    reassembler = concat.Reassembler(timeout_s=1000, max_sets=2)
    for reference in range(3):
        reassembler.add(("a", "b"), concat.Part(b"x", reference, 2, 1), now=reference)
    [oldest] = reassembler.expired(now=3)
    assert oldest.key == ("a", "b", 0, 2)


# ---- PDUs, against smpp34 and smpplib ----

addresses = st.text(alphabet="0123456789+", max_size=20)
short_messages = st.binary(max_size=254)


@settings(max_examples=200)
@given(addresses, addresses, short_messages, st.integers(0, 255), st.integers(0, 255),
       st.integers(1, 0x7FFFFFFF))  # fmt: skip
def test_our_submit_sm_reads_as_smpp34_reads_it_and_back(
    source: str, destination: str, body: bytes, esm_class: int, coding: int, sequence: int
) -> None:
    ours = Pdu(
        Command.SUBMIT_SM,
        sequence,
        fields={
            "source_addr": source,
            "destination_addr": destination,
            "short_message": body,
            "esm_class": esm_class,
            "data_coding": coding,
            "registered_delivery": 1,
        },
        tlvs={0x020C: b"\x00\x07"},
    )
    wire = encode(ours)
    theirs = smpp34.decode(wire)
    assert (theirs.source_addr, theirs.destination_addr) == (source, destination)
    assert (theirs.short_message, theirs.esm_class, theirs.data_coding) == (body, esm_class, coding)
    assert theirs.sequence_number == sequence and theirs.registered_delivery == 1
    assert [(t.tag, t.value) for t in theirs.tlvs] == [(0x020C, b"\x00\x07")]
    built = smpp34.DeliverSm(
        destination, source, body, esm_class=esm_class, data_coding=coding,
        sequence_number=sequence, tlvs=[smpp34.Tlv(0x001E, b"abc\x00")],
    )  # fmt: skip
    [read] = PduDecoder().feed(built.encode())
    assert isinstance(read, Pdu) and read.command == Command.DELIVER_SM
    assert read.sequence == sequence and read.get("short_message") == body
    assert (read.get("source_addr"), read.get("destination_addr")) == (destination, source)
    assert read.tlvs == {0x001E: b"abc\x00"}


def test_smpplib_and_we_agree_on_binds_submits_and_responses() -> None:
    bind = smpplib_command.BindTransceiver(
        "bind_transceiver", client=_Sequence(3), system_id="esme", password="secret"
    )
    [read] = PduDecoder().feed(bind.generate())
    assert isinstance(read, Pdu) and read.command == Command.BIND_TRANSCEIVER
    assert read.sequence == 3
    assert (read.get("system_id"), read.get("password")) == ("esme", "secret")
    ours = encode(Pdu(Command.SUBMIT_SM | 0x80000000, 42, fields={"message_id": "m-1"}))
    parsed = smpplib_smpp.parse_pdu(ours, client=_Sequence(0))
    assert parsed.command == "submit_sm_resp" and parsed.sequence == 42
    assert parsed.message_id == b"m-1"
    enquire = encode(Pdu(Command.ENQUIRE_LINK, 8))
    assert smpplib_smpp.parse_pdu(enquire, client=_Sequence(0)).command == "enquire_link"


class _Sequence:
    """What smpplib asks of a client to number a PDU."""

    def __init__(self, number: int) -> None:
        self.number = number

    def next_sequence(self) -> int:
        return self.number


def test_an_error_response_has_no_body_and_a_request_answers_itself() -> None:
    request = Pdu(Command.SUBMIT_SM, 5)
    assert encode(request.response(Status.THROTTLED, message_id="x")) == struct.pack(
        ">IIII", 16, 0x80000004, 0x58, 5
    )
    [read] = PduDecoder().feed(struct.pack(">IIII", 16, 0x80000004, 0x58, 5))
    assert isinstance(read, Pdu) and read.status == Status.THROTTLED


def test_pdus_split_anywhere_are_read_whole() -> None:
    wire = b"".join(encode(Pdu(Command.ENQUIRE_LINK, n)) for n in range(1, 6))
    decoder = PduDecoder()
    got = []
    for at in range(len(wire)):
        got += decoder.feed(wire[at : at + 1])
    assert [p.sequence for p in got] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"no terminator" * 3, Status.INVMSGLEN),  # service_type without its NUL
        (b"\0" * 16 + b"\x05ab", Status.INVMSGLEN),  # sm_length past the body
        (b"\0" * 16 + b"\x00" + b"\x02\x0c\x00\x09", Status.INVOPTPARSTREAM),  # a TLV too long
    ],
)
def test_a_body_that_lies_comes_back_as_a_bad_pdu(body: bytes, status: int) -> None:
    wire = struct.pack(">IIII", 16 + len(body), Command.DELIVER_SM, 0, 77) + body
    after = encode(Pdu(Command.ENQUIRE_LINK, 78))
    bad, good = PduDecoder().feed(wire + after)
    assert isinstance(bad, BadPdu) and (bad.sequence, bad.status) == (77, status)
    assert isinstance(good, Pdu) and good.sequence == 78  # the stream goes on


@pytest.mark.parametrize("length", [0, 15, 1 << 20])
def test_a_command_length_that_cannot_be_trusted_ends_the_stream(length: int) -> None:
    with pytest.raises(FramingError):
        PduDecoder().feed(struct.pack(">IIII", length, Command.SUBMIT_SM, 0, 1) + b"\0" * 16)


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=80), max_size=8), st.integers(0x80000000, 0x800000FF))
def test_hostile_streams_give_pdus_or_bad_pdus_or_a_framing_error(
    chunks: list[bytes], command: int
) -> None:
    decoder = PduDecoder(max_length=4096)
    try:
        for chunk in chunks:
            header = struct.pack(">IIII", 16 + len(chunk), command & 0x800000FF, 0, 1)
            for item in decoder.feed(header + chunk):
                assert isinstance(item, Pdu | BadPdu)
            decoder.feed(chunk)  # and raw garbage between
    except FramingError:
        pass
