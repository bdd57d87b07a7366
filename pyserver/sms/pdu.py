"""SMPP 3.4 PDUs: the wire format of the gateway's session with an SMSC, sans I/O.

Owns encoding and decoding of the PDUs an ESME uses: bind_transmitter,
bind_receiver, bind_transceiver, submit_sm, deliver_sm, enquire_link, unbind,
their responses, and generic_nack. A PDU is a 16-byte header (command_length,
command_id, command_status, sequence_number, all big-endian u32) and a body of
fields in the order of the specification (C-octet strings NUL-terminated, with a
maximum length each; single octets; the short message after its own length
octet), then optional parameters (TLVs: u16 tag, u16 length, value).

`PduDecoder.feed(bytes)` returns the whole PDUs received so far. Hostile input
never crashes it: a PDU whose body cannot be read (a C-string without its NUL or
over its maximum, a short message longer than the body, a TLV that runs past the
end) comes back as a `BadPdu` with the SMPP status to answer it with, and the
stream goes on after it; a command_length under 16 or over `max_length` cannot
be skipped safely, and raises `FramingError` (the session then closes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BadPdu",
    "Command",
    "FramingError",
    "Pdu",
    "PduDecoder",
    "Status",
    "Tag",
    "encode",
]

HEADER = struct.Struct(">IIII")
RESPONSE = 0x80000000


class Command:
    GENERIC_NACK = 0x80000000
    BIND_RECEIVER = 0x00000001
    BIND_TRANSMITTER = 0x00000002
    SUBMIT_SM = 0x00000004
    DELIVER_SM = 0x00000005
    UNBIND = 0x00000006
    BIND_TRANSCEIVER = 0x00000009
    ENQUIRE_LINK = 0x00000015


class Status:
    OK = 0x00
    INVMSGLEN = 0x01  # message length is invalid
    INVCMDLEN = 0x02  # command length is invalid
    INVCMDID = 0x03  # invalid command id
    INVBNDSTS = 0x04  # incorrect bind status for the command
    ALYBND = 0x05  # already bound
    SYSERR = 0x08  # system error
    INVSRCADR = 0x0A  # invalid source address
    INVDSTADR = 0x0B  # invalid destination address
    BINDFAIL = 0x0D
    INVPASWD = 0x0E
    INVSYSID = 0x0F
    MSGQFUL = 0x14  # message queue full
    THROTTLED = 0x58  # throttling error
    INVOPTPARSTREAM = 0xC0  # error in the optional part of the PDU body
    DELIVERYFAILURE = 0xFE
    UNKNOWNERR = 0xFF


class Tag:
    RECEIPTED_MESSAGE_ID = 0x001E
    SAR_MSG_REF_NUM = 0x020C
    SAR_TOTAL_SEGMENTS = 0x020E
    SAR_SEGMENT_SEQNUM = 0x020F
    MESSAGE_PAYLOAD = 0x0424
    MESSAGE_STATE = 0x0427
    SC_INTERFACE_VERSION = 0x0210


# Each command's body: (field, kind, maximum octets with the NUL) in wire order.
# Kinds: "c" a C-octet string, "u8" one octet, "sm" the short message (after sm_length).
_BIND = (
    ("system_id", "c", 16),
    ("password", "c", 9),
    ("system_type", "c", 13),
    ("interface_version", "u8", 1),
    ("addr_ton", "u8", 1),
    ("addr_npi", "u8", 1),
    ("address_range", "c", 41),
)
_SHORT_MESSAGE = (
    ("service_type", "c", 6),
    ("source_addr_ton", "u8", 1),
    ("source_addr_npi", "u8", 1),
    ("source_addr", "c", 21),
    ("dest_addr_ton", "u8", 1),
    ("dest_addr_npi", "u8", 1),
    ("destination_addr", "c", 21),
    ("esm_class", "u8", 1),
    ("protocol_id", "u8", 1),
    ("priority_flag", "u8", 1),
    ("schedule_delivery_time", "c", 17),
    ("validity_period", "c", 17),
    ("registered_delivery", "u8", 1),
    ("replace_if_present_flag", "u8", 1),
    ("data_coding", "u8", 1),
    ("sm_default_msg_id", "u8", 1),
    ("short_message", "sm", 254),
)
_BODIES: dict[int, tuple[tuple[str, str, int], ...]] = {
    Command.BIND_RECEIVER: _BIND,
    Command.BIND_TRANSMITTER: _BIND,
    Command.BIND_TRANSCEIVER: _BIND,
    Command.BIND_RECEIVER | RESPONSE: (("system_id", "c", 16),),
    Command.BIND_TRANSMITTER | RESPONSE: (("system_id", "c", 16),),
    Command.BIND_TRANSCEIVER | RESPONSE: (("system_id", "c", 16),),
    Command.SUBMIT_SM: _SHORT_MESSAGE,
    Command.DELIVER_SM: _SHORT_MESSAGE,
    Command.SUBMIT_SM | RESPONSE: (("message_id", "c", 65),),
    Command.DELIVER_SM | RESPONSE: (("message_id", "c", 65),),
    Command.ENQUIRE_LINK: (),
    Command.ENQUIRE_LINK | RESPONSE: (),
    Command.UNBIND: (),
    Command.UNBIND | RESPONSE: (),
    Command.GENERIC_NACK: (),
}


@dataclass(slots=True)
class Pdu:
    """One PDU: its command, status, sequence number, body fields and TLVs (tag -> value)."""

    command: int
    sequence: int
    status: int = Status.OK
    fields: dict[str, Any] = field(default_factory=dict)
    tlvs: dict[int, bytes] = field(default_factory=dict)

    @property
    def is_response(self) -> bool:
        return bool(self.command & RESPONSE)

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def response(self, status: int = Status.OK, **fields: Any) -> Pdu:
        """The response to this request (a generic_nack for a command without one)."""
        command = self.command | RESPONSE if self.command in _BODIES else Command.GENERIC_NACK
        return Pdu(command, self.sequence, status, fields)


@dataclass(frozen=True, slots=True)
class BadPdu:
    """A PDU whose body could not be read: answer `status` to `command`/`sequence`."""

    command: int
    sequence: int
    status: int
    reason: str


class FramingError(Exception):
    """The stream cannot be read on: a command_length the decoder cannot trust."""


def encode(pdu: Pdu) -> bytes:
    """The PDU's bytes; ValueError for a field that does not fit its maximum."""
    body = bytearray()
    spec = _BODIES.get(pdu.command)
    if spec is None:
        raise ValueError(f"no encoding for command 0x{pdu.command:08x}")
    # an error response carries no body (SMPP 3.4, 4.1.2: except for submit_sm_resp's id)
    if not (pdu.is_response and pdu.status != Status.OK):
        for name, kind, most in spec:
            value = pdu.fields.get(name)
            if kind == "c":
                raw = (value or "").encode("ascii") if isinstance(value, str) else (value or b"")
                if len(raw) + 1 > most:
                    raise ValueError(f"{name}: {len(raw)} octets, over {most - 1}")
                body += raw + b"\0"
            elif kind == "u8":
                body.append(int(value or 0) & 0xFF)
            else:  # the short message, after its length
                raw = bytes(value or b"")
                if len(raw) > most:
                    raise ValueError(f"{name}: {len(raw)} octets, over {most}")
                body.append(len(raw))
                body += raw
        for tag, value in pdu.tlvs.items():
            body += struct.pack(">HH", tag, len(value)) + value
    return HEADER.pack(16 + len(body), pdu.command, pdu.status, pdu.sequence) + bytes(body)


def decode_body(command: int, status: int, sequence: int, body: bytes) -> Pdu | BadPdu:
    """One PDU from its header fields and body (see the module docstring)."""
    spec = _BODIES.get(command)
    if spec is None:
        return BadPdu(command, sequence, Status.INVCMDID, f"unknown command 0x{command:08x}")
    pdu = Pdu(command, sequence, status)
    if command & RESPONSE and status != Status.OK and not body:
        return pdu  # an error response may carry no body at all
    at = 0
    for name, kind, most in spec:
        if kind == "c":
            end = body.find(b"\0", at, at + most)
            if end < 0:
                return BadPdu(command, sequence, Status.INVMSGLEN, f"{name}: no NUL within {most}")
            pdu.fields[name] = body[at:end].decode("latin-1")
            at = end + 1
        elif kind == "u8":
            if at >= len(body):
                return BadPdu(command, sequence, Status.INVMSGLEN, f"{name}: body ends")
            pdu.fields[name] = body[at]
            at += 1
        else:
            if at >= len(body) or at + 1 + body[at] > len(body):
                return BadPdu(command, sequence, Status.INVMSGLEN, f"{name}: past the body")
            length = body[at]
            pdu.fields[name] = body[at + 1 : at + 1 + length]
            at += 1 + length
    while at < len(body):
        if at + 4 > len(body):
            return BadPdu(command, sequence, Status.INVOPTPARSTREAM, "a TLV header is cut off")
        tag, length = struct.unpack_from(">HH", body, at)
        if at + 4 + length > len(body):
            return BadPdu(command, sequence, Status.INVOPTPARSTREAM, f"TLV 0x{tag:04x} too long")
        pdu.tlvs[tag] = body[at + 4 : at + 4 + length]
        at += 4 + length
    return pdu


class PduDecoder:
    """Bytes in, PDUs out (see the module docstring)."""

    def __init__(self, max_length: int = 64 << 10) -> None:
        self.max_length = max_length
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Pdu | BadPdu]:
        self._buffer += data
        out: list[Pdu | BadPdu] = []
        buffer = self._buffer
        at = 0
        while len(buffer) - at >= 16:
            length, command, status, sequence = HEADER.unpack_from(buffer, at)
            if length < 16 or length > self.max_length:
                raise FramingError(f"command_length {length} (16..{self.max_length})")
            if len(buffer) - at < length:
                break
            out.append(decode_body(command, status, sequence, bytes(buffer[at + 16 : at + length])))
            at += length
        del buffer[:at]
        return out
