"""The fast FETCH path: the common FETCH forms answered from ready-made bytes.

A mail client opening a folder asks `UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)`
and then whole messages (`BODY.PEEK[]`). pymap answers each message by building
objects (a FetchResponse of FetchValues, each formatted on writing) and loads and
parses the message's bytes for every answer. Here, when every item asked for is
one of

    UID, FLAGS, INTERNALDATE, ENVELOPE, RFC822.SIZE,
    BODY[], BODY.PEEK[], RFC822 (the whole message, no partial)

the answer is written as bytes, a block of messages at a time in one write: the
ENVELOPE and size come from the gateway's derived facts (`derived`: computed
once per message by pymap's own formatting, so the bytes are the same), the
whole message from the gateway's bounded cache of bytes, loaded for a block of
messages at once (`MessageSource.prefetch`, many requests in flight).

Everything else goes to pymap's general path (`apply` wraps its `do_fetch`):
another item (BODYSTRUCTURE, sections, partials, BINARY, MODSEQ...), a FETCH
modifier (CHANGEDSINCE), a session with CONDSTORE enabled (its FLAGS answers
carry MODSEQ: `condstore`), a BODY[]/RFC822 that would set \\Seen, and a
sequence set naming a message no longer in the folder (pymap answers it as
expunged). `FAST_FETCH` turns the path off (the tests compare both paths).

May import: pymap, `pyserver.imap.condstore` (whether CONDSTORE is on) and the
folder view and message source (`pyserver.imap.folders`) by duck typing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from pymap.imap.state import ConnectionState
from pymap.parsing.primitives import List
from pymap.parsing.response import ResponseOk, UntaggedResponse
from pymap.parsing.response.specials import FetchResponse
from pymap.parsing.specials import DateTime, FetchAttribute
from pymap.parsing.specials.flag import Flag

from pyserver.errors import NotFound
from pyserver.imap import condstore

__all__ = ["FAST_FETCH", "apply", "eligible"]

# PYSERVER_IMAP_FAST_FETCH=0 sends every FETCH through pymap (the tests compare both)
FAST_FETCH = {"on": os.environ.get("PYSERVER_IMAP_FAST_FETCH", "1") != "0"}
_BLOCK = 256  # messages loaded and written at a time
_SIMPLE = frozenset({b"UID", b"FLAGS", b"INTERNALDATE", b"ENVELOPE", b"RFC822.SIZE"})
_WHOLE = frozenset({b"BODY", b"BODY.PEEK", b"RFC822"})
_FACTS = frozenset({b"ENVELOPE", b"RFC822.SIZE"})
_applied: list[bool] = []


def eligible(state: Any, cmd: Any) -> bool:
    """Whether the fast path answers this FETCH exactly as pymap would."""
    if not FAST_FETCH["on"] or condstore.enabled(state) or getattr(cmd, "options", None):
        return False
    readonly = state.selected.readonly
    for attr in cmd.attributes:
        name = attr.value
        if name in _SIMPLE:
            continue
        if name not in _WHOLE or attr.partial is not None or attr.section is None:
            return False
        section = attr.section
        if section.specifier is not None or section.parts or (attr.set_seen and not readonly):
            return False
    return True


class _Answers(UntaggedResponse):
    """The `* n FETCH (...)` lines of a fast FETCH, loaded and written a block at a
    time (`async_write`); its plain `write` (pymap's logging of a response) names
    the answers without loading anything."""

    def __init__(
        self,
        messages: Sequence[tuple[int, Any]],
        attributes: Sequence[FetchAttribute],
        source: Any,
        session_flags: Any,
    ) -> None:
        super().__init__(b"")
        self.messages = messages
        self.attributes = attributes
        self.extra: dict[int, dict[Any, bytes]] = {}  # seq -> items merged in (`_FastOk`)
        self._names = [attr.value for attr in attributes]
        self._prefixes = [bytes(attr.for_response) + b" " for attr in attributes]
        self._source = source
        self._session_flags = session_flags
        self._flags: dict[frozenset[Flag], bytes] = {}

    def write(self, writer: Any) -> None:
        writer.write(b"* (%d FETCH answers)\r\n" % len(self.messages))

    async def async_write(self, writer: Any) -> None:
        for block in _blocks(self.messages):
            writer.write(await self._answer(block))
            drain = getattr(writer, "drain", None)
            if drain is not None:
                await drain()

    async def _answer(self, block: Sequence[tuple[int, Any]]) -> bytes:
        names = self._names
        source = self._source
        whole = any(name in _WHOLE for name in names)
        if whole:
            await source.prefetch(message.message_id for _, message in block)
        wants_facts = any(name in _FACTS for name in names)
        if wants_facts:  # the facts not derived yet need the bytes: load them at once
            store, user = source.store, source.user
            missing = [m.message_id for _, m in block if store.facts(user, m.message_id) is None]
            await source.prefetch(missing)
        out: list[bytes] = []  # the block's pieces, joined once (a body is copied once)
        for seq, message in block:
            facts = await source.facts(message) if wants_facts else None
            out.append(b"* %d FETCH (" % seq)
            separator = b""
            for name, prefix in zip(names, self._prefixes, strict=True):
                out += (separator, prefix)
                separator = b" "
                if name == b"UID":
                    out.append(b"%d" % message.uid)
                elif name == b"FLAGS":
                    out.append(self._flags_of(message))
                elif name == b"ENVELOPE":
                    out.append(facts.envelope)  # type: ignore[union-attr]
                elif name == b"RFC822.SIZE":
                    out.append(b"%d" % facts.size)  # type: ignore[union-attr]
                elif name == b"INTERNALDATE":
                    out.append(bytes(DateTime(message.internal_date)))
                else:  # the whole message
                    data = await _content(source, message.message_id)
                    out += (b"{%d}\r\n" % len(data), data)
            for item in self.extra.get(seq, {}).values():
                out += (b" ", item)
            out.append(b")\r\n")
        return b"".join(out)

    def _flags_of(self, message: Any) -> bytes:
        flags = frozenset(message.get_flags(self._session_flags))
        text = self._flags.get(flags)
        if text is None:
            text = self._flags[flags] = bytes(List(flags, sort=True))
        return text


class _FastOk(ResponseOk):
    """The tagged OK of a fast FETCH. pymap merges the untagged FETCH updates that
    follow a command (flags changed meanwhile) into the FETCH answer of the same
    message (`FetchResponse.merge`); here too: an update's items already answered are
    dropped (the answer gives the current value), the others join the answer's line."""

    def __init__(self, tag: bytes, text: bytes, answers: _Answers) -> None:
        super().__init__(tag, text)
        self._answers = answers
        self._seqs = {seq for seq, _ in answers.messages}
        self._asked = set(answers.attributes)

    def add_untagged(self, *responses: UntaggedResponse) -> None:
        kept: list[UntaggedResponse] = []
        for response in responses:
            if isinstance(response, FetchResponse) and response.seq in self._seqs:
                extra = self._answers.extra.setdefault(response.seq, {})
                for attr, value in response.data.items():
                    if attr not in self._asked:
                        extra[attr] = bytes(value)
            else:
                kept.append(response)
        super().add_untagged(*kept)


async def _content(source: Any, message_id: str) -> bytes:
    try:
        return bytes(await source.content(message_id))
    except NotFound:  # deleted meanwhile: an empty message, as pymap's path answers
        return b""


def _blocks(messages: Sequence[tuple[int, Any]]) -> Iterator[Sequence[tuple[int, Any]]]:
    for start in range(0, len(messages), _BLOCK):
        yield messages[start : start + _BLOCK]


async def fast_fetch(state: ConnectionState, cmd: Any) -> Any:
    """The answer to an eligible FETCH, or None to leave it to pymap."""
    selected = state.selected
    if not cmd.uid:
        selected.hide_expunged = True
    folders: Any = state.session.mailbox_set
    view = await folders.get_mailbox(selected.lookup)
    await view.refresh()
    messages = []
    for seq, cached in selected.messages.get_all(cmd.sequence_set):
        message = view.current(cached.uid)
        if message is None:  # gone since the client last heard: pymap says how
            return None
        messages.append((seq, message))
    attributes = list(dict.fromkeys(cmd.attributes))  # once each, as pymap's answer
    answers = _Answers(messages, attributes, folders.source, selected.session_flags)
    response = _FastOk(cmd.tag, cmd.command + b" completed.", answers)
    if messages:
        response.add_untagged(answers)
    return response, await view.update_selected(selected)


def apply() -> None:
    """Answer eligible FETCH commands on the fast path (after `condstore.apply`)."""
    if _applied:
        return
    _applied.append(True)
    general = ConnectionState.do_fetch

    async def do_fetch(self: ConnectionState, cmd: Any) -> Any:
        if eligible(self, cmd):
            answer = await fast_fetch(self, cmd)
            if answer is not None:
                return answer
        return await general(self, cmd)

    ConnectionState.do_fetch = do_fetch  # type: ignore[method-assign]
