"""The pure-Python twin of the native log-record codec (docs/log-format.md, version 1).

Owns nothing the native codec does not: the same entry dicts, the same bytes,
the same exceptions with the same messages. Built on `struct` and
`google_crc32c`; the action, channel and folder names live here, as data both
twins share (the `pyserver.logcodec` facade re-exports them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import google_crc32c

from pyserver.errors import BadRequest, LogCorrupt

__all__ = [
    "ACTIONS",
    "CHANNELS",
    "FIELDS",
    "FOLDERS",
    "MAX_FIELDS_LEN",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
]

VERSION = 1
HEADER_LEN = 22  # version, action, B, seq, ts
MIN_RECORD_LEN = HEADER_LEN + 4  # and the CRC32C
MAX_FIELDS_LEN = 16 * 1024 * 1024
_U64_MAX = (1 << 64) - 1

# Names by code: the name at index i has code i + 1.
ACTIONS: tuple[str, ...] = (
    "message_added",
    "marked_read",
    "marked_unread",
    "moved",
    "message_deleted",
    "thread_deleted",
    "sender_blocked",
    "sender_unblocked",
    "folder_seen",
    "outbound_settled",
    "sms_set",
)
CHANNELS: tuple[str, ...] = ("chat", "email", "sms", "web")
FOLDERS: tuple[str, ...] = ("inbox", "other", "archived", "sent", "spam")

# Field kinds.
_U64, _STR, _LIST, _BOOL, _CHANNEL, _FOLDER = range(6)

_SCHEMAS: dict[str, tuple[tuple[str, int], ...]] = {
    "message_added": (
        ("message_id", _STR),
        ("thread_id", _STR),
        ("sender", _U64),
        ("participants", _LIST),
        ("channel", _CHANNEL),
        ("folder", _FOLDER),
        ("unread", _BOOL),
        ("subject", _STR),
        ("snippet", _STR),
        ("body_ref", _STR),
        ("key", _STR),
    ),
    "marked_read": (("thread_id", _STR), ("message_id", _STR)),
    "marked_unread": (("thread_id", _STR), ("message_id", _STR)),
    "moved": (("thread_id", _STR), ("folder", _FOLDER)),
    "message_deleted": (("thread_id", _STR), ("message_id", _STR)),
    "thread_deleted": (("thread_id", _STR),),
    "sender_blocked": (("sender", _U64),),
    "sender_unblocked": (("sender", _U64),),
    "folder_seen": (("folder", _FOLDER),),
    "outbound_settled": (
        ("message_id", _STR),
        ("address", _STR),
        ("outcome", _STR),
        ("detail", _STR),
    ),
    "sms_set": (("phone", _STR), ("mode", _STR)),
}

# Each action's own fields, in record order (after seq, ts and action).
FIELDS: dict[str, tuple[str, ...]] = {
    action: tuple(name for name, _ in schema) for action, schema in _SCHEMAS.items()
}

_ACTION_CODES = {name: code for code, name in enumerate(ACTIONS, 1)}
_CHANNEL_CODES = {name: code for code, name in enumerate(CHANNELS, 1)}
_FOLDER_CODES = {name: code for code, name in enumerate(FOLDERS, 1)}
# Every key each action's entries must have, for spotting an unexpected one.
_KEYS = {action: frozenset(("seq", "ts", "action", *FIELDS[action])) for action in ACTIONS}
# The schema by action code, for decoding.
_SCHEMAS_BY_CODE = {code: (name, _SCHEMAS[name]) for name, code in _ACTION_CODES.items()}

_HEADER = struct.Struct("<BBIQQ")
_U32 = struct.Struct("<I")
_U64S = struct.Struct("<Q")
_MISSING = object()


# ---- encoding ----


def _uint(value: Any, label: str, where: str) -> int:
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadRequest(f"{where}{label} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise BadRequest(f"{where}{label} must be in 0..2**64-1")
    return value


def _utf8(value: Any, label: str, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where}{label} must be a str, not {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where}{label} is not encodable as UTF-8") from None


def _code(value: Any, name: str, codes: dict[str, int], where: str) -> int:
    if not isinstance(value, str):
        raise BadRequest(f"{where}field {name!r} must be a str, not {type(value).__name__}")
    code = codes.get(value)
    if code is None:
        raise BadRequest(f"{where}unknown {name} {value!r}")
    return code


def _fields(entry: dict[str, Any], schema: tuple[tuple[str, int], ...], where: str) -> bytes:
    """The action's fields, checked and encoded in record order."""
    parts: list[bytes] = []
    append = parts.append
    for name, kind in schema:
        value = entry[name]
        if kind == _STR:
            raw = _utf8(value, f"field {name!r}", where)
            append(_U32.pack(len(raw)))
            append(raw)
        elif kind == _U64:
            append(_U64S.pack(_uint(value, f"field {name!r}", where)))
        elif kind == _LIST:
            if not isinstance(value, (list, tuple)):
                raise BadRequest(
                    f"{where}field {name!r} must be a list or tuple, not {type(value).__name__}"
                )
            for i, item in enumerate(value):
                _uint(item, f"field {name!r} item {i}", where)
            append(struct.pack(f"<I{len(value)}Q", len(value), *value))
        elif kind == _BOOL:
            if type(value) is not bool:
                raise BadRequest(
                    f"{where}field {name!r} must be a bool, not {type(value).__name__}"
                )
            append(b"\x01" if value else b"\x00")
        elif kind == _CHANNEL:
            append(bytes((_code(value, name, _CHANNEL_CODES, where),)))
        else:
            append(bytes((_code(value, name, _FOLDER_CODES, where),)))
    return b"".join(parts)


def _record(entry: Any, where: str) -> bytes:
    """One entry's record; `where` prefixes error messages ("entry 3: " in a batch)."""
    if not isinstance(entry, dict):
        raise TypeError(f"{where}a log entry must be a dict, not {type(entry).__name__}")
    action = entry.get("action", _MISSING)
    if action is _MISSING:
        raise BadRequest(f"{where}missing field 'action'")
    if not isinstance(action, str):
        raise BadRequest(f"{where}field 'action' must be a str, not {type(action).__name__}")
    schema = _SCHEMAS.get(action)
    if schema is None:
        raise BadRequest(f"{where}unknown action {action!r}")
    for name in ("seq", "ts", *FIELDS[action]):
        if name not in entry:
            raise BadRequest(f"{where}missing field {name!r}")
    if len(entry) != 3 + len(schema):
        keys = _KEYS[action]
        extra = next(key for key in entry if key not in keys)
        raise BadRequest(f"{where}unexpected field {extra!r}")
    seq = _uint(entry["seq"], "field 'seq'", where)
    ts = _uint(entry["ts"], "field 'ts'", where)
    fields = _fields(entry, schema, where)
    if len(fields) > MAX_FIELDS_LEN:
        raise BadRequest(
            f"{where}the entry needs {len(fields)} bytes of fields, "
            f"over the {MAX_FIELDS_LEN}-byte limit"
        )
    head = _HEADER.pack(VERSION, _ACTION_CODES[action], len(fields), seq, ts) + fields
    return head + _U32.pack(google_crc32c.value(head))


def encode(entry: dict[str, Any]) -> bytes:
    """One entry dict as a record. BadRequest if it does not fit the schema."""
    return _record(entry, "")


def encode_batch(entries: Iterable[dict[str, Any]]) -> bytes:
    """Entry dicts as a batch: their records back to back."""
    return b"".join(_record(entry, f"entry {i}: ") for i, entry in enumerate(entries))


# ---- decoding ----


def _as_bytes(data: Any) -> bytes:
    """The bytes of any C-contiguous buffer; `bytes` itself without a copy."""
    if type(data) is bytes:
        return data
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"a log record must be a bytes-like object, not {type(data).__name__}"
        ) from None
    with view:
        if not view.c_contiguous:
            raise TypeError("a log record must be a C-contiguous buffer")
        return view.tobytes()


def _corrupt(offset: int, problem: str) -> LogCorrupt:
    return LogCorrupt(f"corrupt fields at byte {offset}: {problem}")


def _decode_at(data: bytes, offset: int) -> tuple[dict[str, Any], int]:
    """The record at data[offset:], after checks 1 to 7, and the offset past it."""
    available = len(data) - offset
    if available < MIN_RECORD_LEN:
        raise LogCorrupt(
            f"truncated at byte {offset}: {available} bytes left, "
            f"a record needs at least {MIN_RECORD_LEN}"
        )
    version, code, fields_len, seq, ts = _HEADER.unpack_from(data, offset)
    if version != VERSION:
        raise LogCorrupt(f"unsupported version at byte {offset}: {version}")
    if fields_len > MAX_FIELDS_LEN:
        raise LogCorrupt(
            f"corrupt length at byte {offset + 2}: {fields_len} bytes of fields, "
            f"over the {MAX_FIELDS_LEN}-byte limit"
        )
    needed = MIN_RECORD_LEN + fields_len
    if available < needed:
        raise LogCorrupt(
            f"truncated at byte {offset}: {available} bytes left, the record needs {needed}"
        )
    end = offset + HEADER_LEN + fields_len  # where the CRC sits
    (stored,) = _U32.unpack_from(data, end)
    computed = google_crc32c.value(data[offset:end])
    if stored != computed:
        raise LogCorrupt(
            f"checksum mismatch at byte {end}: stored {stored:#010x}, computed {computed:#010x}"
        )
    known = _SCHEMAS_BY_CODE.get(code)
    if known is None:
        raise LogCorrupt(f"unknown action at byte {offset + 1}: {code}")
    action, schema = known
    entry: dict[str, Any] = {"seq": seq, "ts": ts, "action": action}
    pos = offset + HEADER_LEN
    for name, kind in schema:
        left = end - pos
        if kind in (_STR, _LIST):
            if left < 4:
                raise _corrupt(pos, f"field {name!r} needs 4 bytes, {left} left")
            (n,) = _U32.unpack_from(data, pos)
            left -= 4
            if kind == _STR:
                if n > left:
                    raise _corrupt(pos, f"field {name!r} declares {n} bytes, {left} left")
                try:
                    entry[name] = data[pos + 4 : pos + 4 + n].decode("utf-8")
                except UnicodeDecodeError:
                    raise _corrupt(pos, f"field {name!r} is not valid UTF-8") from None
                pos += 4 + n
            else:
                if n * 8 > left:
                    raise _corrupt(pos, f"field {name!r} declares {n} items, {left} bytes left")
                entry[name] = list(struct.unpack_from(f"<{n}Q", data, pos + 4))
                pos += 4 + n * 8
        elif kind == _U64:
            if left < 8:
                raise _corrupt(pos, f"field {name!r} needs 8 bytes, {left} left")
            (entry[name],) = _U64S.unpack_from(data, pos)
            pos += 8
        else:
            if left < 1:
                raise _corrupt(pos, f"field {name!r} needs 1 bytes, {left} left")
            byte = data[pos]
            if kind == _BOOL:
                if byte > 1:
                    raise _corrupt(pos, f"field {name!r} has byte {byte}, not a bool")
                entry[name] = byte == 1
            else:
                names = CHANNELS if kind == _CHANNEL else FOLDERS
                if not 1 <= byte <= len(names):
                    raise _corrupt(pos, f"field {name!r} has unknown code {byte}")
                entry[name] = names[byte - 1]
            pos += 1
    if pos != end:
        raise _corrupt(pos, f"{end - pos} bytes follow the last field")
    return entry, end + 4


def decode(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Exactly one record as an entry dict. LogCorrupt if it fails any check."""
    data = _as_bytes(data)
    entry, end = _decode_at(data, 0)
    if end != len(data):
        raise LogCorrupt(f"trailing bytes at byte {end}: {len(data) - end} bytes after the record")
    return entry


def decode_batch(data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
    """A batch as entry dicts, in order. LogCorrupt if any record fails a check."""
    data = _as_bytes(data)
    entries = []
    offset = 0
    while offset < len(data):
        entry, offset = _decode_at(data, offset)
        entries.append(entry)
    return entries
