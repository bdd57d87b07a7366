"""ENABLE (RFC 5161) and CONDSTORE (RFC 7162) on pymap, with MODSEQ from the user's log.

A message's MODSEQ is the log position of the entry that last changed it as
IMAP sees it (added, marked read or unread, filed in its folder:
FOLDER_MESSAGES's `modseq`, kept by `pyserver.app.image`); a folder's
HIGHESTMODSEQ is the user's log position (FOLDER_MESSAGES's `seq`), which
every change of the mailbox moves on. Flags kept by the session alone
(`\\Deleted` until EXPUNGE, the flags not kept at all) change no MODSEQ.

pymap 0.36 has none of it; `apply()` adds, in pymap's own terms:

- ENABLE (`EnableCommand`, registered by `commands()`): `* ENABLED CONDSTORE`
  for CONDSTORE, nothing for what is not offered;
- SELECT/EXAMINE: `* OK [HIGHESTMODSEQ n]`, and `(CONDSTORE)` enables it;
  STATUS (HIGHESTMODSEQ);
- FETCH: the MODSEQ item, and the (CHANGEDSINCE n) modifier (only the messages
  changed since n, with their MODSEQ);
- STORE (UNCHANGEDSINCE n): a message changed since n is left as it is and
  named in `[MODIFIED set]`;
- SEARCH MODSEQ n (the messages changed at n or later), answered with
  `(MODSEQ highest)` of the messages found;
- once CONDSTORE is enabled (by ENABLE or any command above, RFC 7162 3.1),
  every FETCH answer that gives FLAGS, asked for or not, gives UID and MODSEQ too.

`enabled(state)` says whether a connection enabled CONDSTORE (the fast FETCH
path leaves such connections to pymap). QRESYNC builds on this (`qresync`).

May import: pymap, and the folder view's `highest_modseq` and messages'
`modseq` (pyserver.imap.folders) by duck typing; nothing of the app servers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pymap.fetch import DynamicFetchValue, MessageAttributes
from pymap.imap.state import ConnectionState
from pymap.parsing import EndLine, Params, Space
from pymap.parsing.command import CommandAuth
from pymap.parsing.commands import Commands
from pymap.parsing.exceptions import NotParseable
from pymap.parsing.primitives import Atom, List, Number
from pymap.parsing.response import ResponseBad, ResponseCode, ResponseOk, UntaggedResponse
from pymap.parsing.response.specials import FetchResponse, SearchResponse, StatusResponse
from pymap.parsing.specials import FetchAttribute, SearchKey, SequenceSet
from pymap.parsing.specials.fetchattr import FetchValue
from pymap.parsing.specials.statusattr import StatusAttribute
from pymap.search import SearchCriteria, SearchParams

__all__ = ["EnableCommand", "apply", "changes_since", "commands", "enable", "enabled", "view_of"]

CAPABILITIES = [b"ENABLE", b"CONDSTORE"]
_MODSEQ = b"MODSEQ"
_MODSEQ_ATTR = FetchAttribute(_MODSEQ)
_FLAGS_ATTR = FetchAttribute(b"FLAGS")
_UID_ATTR = FetchAttribute(b"UID")
_ENABLED = "pyserver_condstore"


class EnableCommand(CommandAuth):
    """ENABLE capability... (RFC 5161)."""

    command = b"ENABLE"

    def __init__(self, tag: bytes, names: Sequence[bytes]) -> None:
        super().__init__(tag)
        self.names = names

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[EnableCommand, memoryview]:
        names: list[bytes] = []
        while True:
            if names:
                try:
                    _, buf = EndLine.parse(buf, params)
                    return cls(params.tag, names), buf
                except NotParseable:
                    pass
            _, buf = Space.parse(buf, params)
            atom, buf = Atom.parse(buf, params)
            names.append(atom.value.upper())


class _SearchWithModseq(SearchResponse):
    """`* SEARCH 2 5 (MODSEQ 917)` (RFC 7162 3.1.5)."""

    def __init__(self, seqs: Iterable[int], highest: int) -> None:
        super().__init__(seqs)
        self._highest = highest

    @property
    def text(self) -> bytes:
        return super().text + b" (MODSEQ %d)" % self._highest


class _ModseqFetchValue(DynamicFetchValue):
    def get_value(self) -> Any:
        return List([Number(getattr(self.message, "modseq", 0))])


def commands() -> Commands:
    """pymap's command table with ENABLE."""
    table = Commands()
    table.register(EnableCommand)
    return table


def enabled(state: Any) -> bool:
    """Whether the connection (pymap's ConnectionState) enabled CONDSTORE."""
    return bool(getattr(state, _ENABLED, False))


def enable(state: ConnectionState) -> None:
    """Enable CONDSTORE on the connection."""
    setattr(state, _ENABLED, True)


async def view_of(state: ConnectionState, name: str | None = None) -> Any:
    """The folder view (pyserver.imap.folders.FolderView) named, or the selected one,
    read again."""
    folders = state.session.mailbox_set
    view = await folders.get_mailbox(name if name is not None else state.selected.lookup)
    await view.refresh()
    return view


def changes_since(view: Any, selected: Any, modseq: int) -> list[FetchResponse]:
    """`* n FETCH (UID u FLAGS (...) MODSEQ (m))` of each message of the selected folder
    changed after `modseq`, by sequence number."""
    session_flags = selected.session_flags
    found = []
    for seq, uid in enumerate(selected.messages._sorted, 1):
        message = view.current(uid)
        if message is None or message.modseq <= modseq:
            continue
        values = [
            FetchValue.of(_UID_ATTR, Number(uid)),
            FetchValue.of(_FLAGS_ATTR, List(message.get_flags(session_flags), sort=True)),
            FetchValue.of(_MODSEQ_ATTR, List([Number(message.modseq)])),
        ]
        found.append(FetchResponse(seq, values))
    return found


def _highest(view: Any) -> int:
    return max(1, int(getattr(view, "highest_modseq", 0)))


def _option(options: Any, name: bytes) -> int | None:
    """A numeric command option's value (CHANGEDSINCE, UNCHANGEDSINCE), or None."""
    arg = options.get(name) if options else None
    if arg is None:
        return None
    values = list(arg.value)
    if len(values) != 1 or not isinstance(values[0], Number):
        raise ValueError(name.decode() + " needs a number (a MODSEQ)")
    return int(values[0].value)


def _current(state: ConnectionState, view: Any, sequence_set: SequenceSet) -> list[tuple[int, Any]]:
    """(sequence number, message as the folder has it now) of a command's messages."""
    found = []
    for seq, cached in state.selected.messages.get_all(sequence_set):
        found.append((seq, view.current(cached.uid) or cached))
    return found


def _subset(pairs: list[tuple[int, Any]], uid: bool) -> SequenceSet:
    return SequenceSet.build([m.uid if uid else seq for seq, m in pairs] or [0], uid=uid)


def apply() -> None:
    """Add ENABLE and CONDSTORE to pymap's connection state (idempotent)."""
    if getattr(ConnectionState, "pyserver_condstore_added", False):
        return
    MessageAttributes._simple_attrs = {  # type: ignore[misc]
        **MessageAttributes._simple_attrs,
        _MODSEQ: _ModseqFetchValue,
    }
    StatusAttribute.valid_statuses = {*StatusAttribute.valid_statuses, b"HIGHESTMODSEQ"}
    _patch_fetch_attribute()
    _patch_search()
    originals = {
        name: getattr(ConnectionState, name)
        for name in ("do_select", "do_status", "do_fetch", "do_store", "do_search", "do_command")
    }

    async def do_enable(self: ConnectionState, cmd: EnableCommand) -> Any:
        response = ResponseOk(cmd.tag, b"ENABLE completed.")
        if b"CONDSTORE" in cmd.names:
            enable(self)
            response.add_untagged(UntaggedResponse(b"ENABLED CONDSTORE"))
        return response, None

    async def do_select(self: ConnectionState, cmd: Any) -> Any:
        if cmd.options.has(b"CONDSTORE"):
            enable(self)
        response, updates = await originals["do_select"](self, cmd)
        view = await view_of(self, cmd.mailbox)
        code = ResponseCode.of(b"HIGHESTMODSEQ %d" % _highest(view))
        response.add_untagged_ok(b"Highest", code)
        return response, updates

    async def do_status(self: ConnectionState, cmd: Any) -> Any:
        asked = [a for a in cmd.status_list if a.value == b"HIGHESTMODSEQ"]
        if not asked:
            return await originals["do_status"](self, cmd)
        enable(self)
        cmd.status_list = [a for a in cmd.status_list if a.value != b"HIGHESTMODSEQ"]
        response, updates = await originals["do_status"](self, cmd)
        view = await view_of(self, cmd.mailbox)
        for untagged in response._untagged:
            if isinstance(untagged, StatusResponse):
                untagged.data = {**untagged.data, asked[0]: Number(_highest(view))}
        return response, updates

    async def do_fetch(self: ConnectionState, cmd: Any) -> Any:
        try:
            since = _option(cmd.options, b"CHANGEDSINCE")
        except ValueError as error:
            return ResponseBad(cmd.tag, str(error).encode()), None
        asks = any(attr.value == _MODSEQ for attr in cmd.attributes)
        if since is None and not asks:
            return await originals["do_fetch"](self, cmd)
        enable(self)
        if not asks:
            cmd.attributes = [*cmd.attributes, _MODSEQ_ATTR]
        if since is not None:
            view = await view_of(self)
            changed = [
                (seq, m) for seq, m in _current(self, view, cmd.sequence_set) if m.modseq > since
            ]
            if not changed:
                return ResponseOk(cmd.tag, cmd.command + b" completed."), self.selected
            cmd.sequence_set = _subset(changed, cmd.uid)
        return await originals["do_fetch"](self, cmd)

    async def do_store(self: ConnectionState, cmd: Any) -> Any:
        try:
            since = _option(cmd.options, b"UNCHANGEDSINCE")
        except ValueError as error:
            return ResponseBad(cmd.tag, str(error).encode()), None
        if since is None:
            return await originals["do_store"](self, cmd)
        enable(self)
        view = await view_of(self)
        current = _current(self, view, cmd.sequence_set)
        modified = [(seq, m) for seq, m in current if m.modseq > since]
        kept = [(seq, m) for seq, m in current if m.modseq <= since]
        if kept:
            cmd.sequence_set = _subset(kept, cmd.uid)
            response, updates = await originals["do_store"](self, cmd)
        else:
            response, updates = ResponseOk(cmd.tag, cmd.command + b" completed."), self.selected
        if modified:
            listed = SequenceSet.build([m.uid if cmd.uid else seq for seq, m in modified])
            response.code = ResponseCode.of(b"MODIFIED " + bytes(listed))
        return response, updates

    async def do_search(self: ConnectionState, cmd: Any) -> Any:
        if not any(_names_modseq(key) for key in cmd.keys):
            return await originals["do_search"](self, cmd)
        enable(self)
        response, updates = await originals["do_search"](self, cmd)
        view = await view_of(self)
        for index, untagged in enumerate(response._untagged):
            if not isinstance(untagged, SearchResponse) or not list(untagged.seqs):
                continue
            found = list(untagged.seqs)
            wanted = SequenceSet.build(found, uid=cmd.uid)
            highest = max(m.modseq for _, m in _current(self, view, wanted))
            response._untagged[index] = _SearchWithModseq(found, highest)
        return response, updates

    async def do_command(self: ConnectionState, cmd: Any) -> Any:
        response = await originals["do_command"](self, cmd)
        if enabled(self) and self._selected is not None:
            _with_modseqs(response, self._selected)
        return response

    ConnectionState.do_enable = do_enable  # type: ignore[attr-defined]
    ConnectionState.do_select = do_select  # type: ignore[method-assign]
    ConnectionState.do_status = do_status  # type: ignore[method-assign]
    ConnectionState.do_fetch = do_fetch  # type: ignore[method-assign]
    ConnectionState.do_store = do_store  # type: ignore[method-assign]
    ConnectionState.do_search = do_search  # type: ignore[method-assign]
    ConnectionState.do_command = do_command  # type: ignore[method-assign]
    ConnectionState.pyserver_condstore_added = True  # type: ignore[attr-defined]


def _with_modseqs(response: Any, selected: Any) -> None:
    """UID and MODSEQ in every FETCH answer that gives FLAGS (RFC 7162 3.1.2 asks it of
    those a flag change causes; Dovecot gives MODSEQ only there, a client ignores it
    elsewhere), by the message's sequence number in the folder after the command."""
    order = selected.messages._sorted
    cache = selected.messages._cache
    for untagged in getattr(response, "_untagged", ()):
        if not isinstance(untagged, FetchResponse):
            continue
        names = {attr.value for attr in untagged.data}
        if b"FLAGS" not in names or _MODSEQ in names:
            continue
        if not 0 < untagged.seq <= len(order):
            continue
        uid = order[untagged.seq - 1]
        modseq = getattr(cache.get(uid), "modseq", 0)
        if b"UID" not in names:  # RFC 7162 3.1.2: UID and MODSEQ in every such answer
            untagged.data[_UID_ATTR] = FetchValue.of(_UID_ATTR, Number(uid))
        untagged.data[_MODSEQ_ATTR] = FetchValue.of(_MODSEQ_ATTR, List([Number(modseq)]))


def _names_modseq(key: Any) -> bool:
    if key.value == _MODSEQ:
        return True
    inner = key.filter
    if isinstance(inner, SearchKey):
        return _names_modseq(inner)
    if isinstance(inner, (tuple, list, frozenset, set)):
        return any(isinstance(k, SearchKey) and _names_modseq(k) for k in inner)
    return False


class _ModseqCriteria(SearchCriteria):
    def __init__(self, modseq: int, params: SearchParams) -> None:
        super().__init__(params)
        self.modseq = modseq

    def matches(self, msg_seq: int, msg: Any, loaded_msg: Any) -> bool:
        return int(getattr(msg, "modseq", 0)) >= self.modseq


def _patch_fetch_attribute() -> None:
    parse = FetchAttribute.parse.__func__  # type: ignore[attr-defined]
    requirement = FetchAttribute.requirement

    def parse_modseq(cls: Any, buf: memoryview, params: Params) -> Any:
        try:
            return parse(cls, buf, params)
        except NotParseable:
            text = bytes(buf[:32]).lstrip(b" ")
            if text[:6].upper() == _MODSEQ and text[6:7] in (b" ", b")", b"\r", b""):
                skipped = len(bytes(buf)) - len(bytes(buf).lstrip(b" "))
                return cls(_MODSEQ), buf[skipped + 6 :]
            raise

    def requirement_modseq(self: FetchAttribute) -> Any:
        if self.value == _MODSEQ:
            return requirement.fget(_FLAGS_ATTR)  # type: ignore[attr-defined]
        return requirement.fget(self)  # type: ignore[attr-defined]

    FetchAttribute.parse = classmethod(parse_modseq)  # type: ignore[method-assign,assignment]
    FetchAttribute.requirement = property(requirement_modseq)  # type: ignore[method-assign,assignment]


def _patch_search() -> None:
    parse = SearchKey.parse.__func__  # type: ignore[attr-defined]
    of = SearchCriteria.of.__func__  # type: ignore[attr-defined]

    def parse_modseq(cls: Any, buf: memoryview, params: Params) -> Any:
        try:
            return parse(cls, buf, params)
        except NotParseable:
            text = bytes(buf).lstrip(b" ")
            skipped = len(bytes(buf)) - len(text)
            inverse = text[:4].upper() == b"NOT "
            if inverse:
                text = text[4:].lstrip(b" ")
                skipped = len(bytes(buf)) - len(text)
            if text[:7].upper() != b"MODSEQ ":
                raise
            rest = buf[skipped + 7 :]
            # MODSEQ ["/flags/\\Seen" all|shared|priv] n: the entry is matched as any change
            try:
                number, after = Number.parse(rest, params)
            except NotParseable:
                _, rest = _astring(rest, params)
                _, rest = Atom.parse(rest, params)
                number, after = Number.parse(rest, params)
            return cls(_MODSEQ, number.value, inverse), after

    def of_modseq(cls: Any, key: Any, params: SearchParams) -> Any:
        if key.value == _MODSEQ and not key.inverse:
            return _ModseqCriteria(int(key.filter), params)
        return of(cls, key, params)

    SearchKey.parse = classmethod(parse_modseq)  # type: ignore[method-assign,assignment]
    SearchCriteria.of = classmethod(of_modseq)  # type: ignore[method-assign,assignment]


def _astring(buf: memoryview, params: Params) -> Any:
    from pymap.parsing.specials.astring import AString

    return AString.parse(buf, params)
