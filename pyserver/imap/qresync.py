"""QRESYNC (RFC 7162 3.2) on pymap, on top of `condstore`: a client resynchronises a folder
in one SELECT.

- `ENABLE QRESYNC` (CONDSTORE with it): `* ENABLED QRESYNC`;
- `SELECT folder (QRESYNC (uidvalidity modseq [known-uids ...]))`: when the
  UIDVALIDITY is the folder's, the usual answer and then `* VANISHED (EARLIER)`
  with the UIDs the client may know that are gone, and a FETCH (UID, FLAGS,
  MODSEQ) of every message changed after `modseq`;
- `UID FETCH set (CHANGEDSINCE n VANISHED)`: `* VANISHED (EARLIER)` for the UIDs
  of the set that are gone, then the changes;
- once enabled, an expunge is told as `* VANISHED uid...`, never `* n EXPUNGE`,
  and a SELECT while a folder is selected first answers `* OK [CLOSED]`.

The log keeps no record of which UIDs left a folder and when, so the UIDs said
gone are every UID below the folder's UIDNEXT (within the client's known-uids or
the FETCH's set) that is not in the folder now: RFC 7162 3.2.5.1 lets a server
name UIDs the client never saw (it ignores them); those that left long before
`modseq` are named again, which costs bytes, not correctness.

May import: pymap, `pyserver.imap.condstore`.
"""

from __future__ import annotations

from typing import Any

from pymap.imap.state import ConnectionState
from pymap.parsing import Params
from pymap.parsing.exceptions import NotParseable
from pymap.parsing.primitives import List
from pymap.parsing.response import ResponseBad, UntaggedResponse
from pymap.parsing.response.specials import ExpungeResponse
from pymap.parsing.specials import SequenceSet

from pyserver.imap import condstore

__all__ = ["CAPABILITIES", "apply", "enabled"]

CAPABILITIES = [b"QRESYNC"]
_ENABLED = "pyserver_qresync"


def enabled(state: Any) -> bool:
    """Whether the connection (pymap's ConnectionState) enabled QRESYNC."""
    return bool(getattr(state, _ENABLED, False))


def _vanished(uids: list[int], earlier: bool) -> UntaggedResponse:
    listed = bytes(SequenceSet.build(sorted(uids)))
    return UntaggedResponse(b"VANISHED " + (b"(EARLIER) " if earlier else b"") + listed)


def _words(arg: Any) -> list[bytes]:
    """The items of a parenthesised option argument, as bytes (nested lists flattened
    one level: `(QRESYNC (1 5 1:9))` gives [b"1", b"5", b"1:9"])."""
    items = list(arg.value) if arg is not None else []
    if len(items) == 1 and isinstance(items[0], List):
        items = list(items[0].value)
    return [bytes(item).strip() for item in items if not isinstance(item, List)]


def _gone(view: Any, within: SequenceSet | None) -> list[int]:
    """UIDs below the folder's UIDNEXT (and in `within`) that are not in it now."""
    top = int(getattr(view, "uid_next", 1)) - 1
    if top < 1:
        return []
    wanted = within.flatten(top) if within is not None else set(range(1, top + 1))
    return sorted(uid for uid in wanted if 0 < uid <= top and view.current(uid) is None)


def apply() -> None:
    """Add QRESYNC to pymap's connection state (after `condstore.apply`; idempotent)."""
    if getattr(ConnectionState, "pyserver_qresync_added", False):
        return
    condstore.apply()
    originals = {
        name: getattr(ConnectionState, name)
        for name in ("do_enable", "do_select", "do_fetch", "do_command")
    }

    async def do_enable(self: ConnectionState, cmd: Any) -> Any:
        response, updates = await originals["do_enable"](self, cmd)
        if b"QRESYNC" in cmd.names:
            setattr(self, _ENABLED, True)
            condstore.enable(self)
            # one ENABLED answer naming both, when both were asked
            names = [name for name in (b"CONDSTORE", b"QRESYNC") if name in cmd.names]
            response._untagged[:] = [UntaggedResponse(b"ENABLED " + b" ".join(names))]
        return response, updates

    async def do_select(self: ConnectionState, cmd: Any) -> Any:
        asked = cmd.options.get(b"QRESYNC") if cmd.options else None
        if asked is not None and not enabled(self):
            return ResponseBad(cmd.tag, b"QRESYNC: ENABLE QRESYNC first"), None
        closed = enabled(self) and self._selected is not None
        known: tuple[int, int, SequenceSet | None] | None = None
        if asked is not None:
            words = _words(asked)
            try:
                validity, modseq = int(words[0]), int(words[1])
                uids = _uid_set(words[2]) if len(words) > 2 else None
            except (IndexError, ValueError, NotParseable):
                return ResponseBad(cmd.tag, b"QRESYNC: (uidvalidity modseq [uids])"), None
            known = (validity, modseq, uids)
        response, updates = await originals["do_select"](self, cmd)
        if closed:
            response._untagged.insert(0, _closed())
        if known is not None:  # (a refused SELECT raised before this)
            view = await condstore.view_of(self, cmd.mailbox)
            validity, modseq, uids = known
            if validity == view.uid_validity:
                gone = _gone(view, uids)
                if gone:
                    response.add_untagged(_vanished(gone, earlier=True))
                for untagged in condstore.changes_since(view, updates, modseq):
                    response.add_untagged(untagged)
        return response, updates

    async def do_fetch(self: ConnectionState, cmd: Any) -> Any:
        wants = cmd.options.has(b"VANISHED") if cmd.options else False
        if not wants:
            return await originals["do_fetch"](self, cmd)
        if not (enabled(self) and cmd.uid and cmd.options.has(b"CHANGEDSINCE")):
            why = b"VANISHED: UID FETCH with CHANGEDSINCE, after ENABLE QRESYNC"
            return ResponseBad(cmd.tag, why), None
        view = await condstore.view_of(self)
        gone = _gone(view, cmd.sequence_set)
        response, updates = await originals["do_fetch"](self, cmd)
        if gone:
            response._untagged.insert(0, _vanished(gone, earlier=True))
        return response, updates

    async def do_command(self: ConnectionState, cmd: Any) -> Any:
        before = None
        if enabled(self) and self._selected is not None and self._selected._prev is not None:
            before = {seq: uid for uid, seq in self._selected._prev.seqs_cache.items()}
        response = await originals["do_command"](self, cmd)
        if enabled(self):
            _expunges_as_vanished(response, before)
        return response

    ConnectionState.do_enable = do_enable  # type: ignore[attr-defined]
    ConnectionState.do_select = do_select  # type: ignore[method-assign]
    ConnectionState.do_fetch = do_fetch  # type: ignore[method-assign]
    ConnectionState.do_command = do_command  # type: ignore[method-assign]
    ConnectionState.pyserver_qresync_added = True  # type: ignore[attr-defined]


def _closed() -> UntaggedResponse:
    return UntaggedResponse(b"OK [CLOSED] Previous mailbox closed.")


def _uid_set(text: bytes) -> SequenceSet:
    found, _ = SequenceSet.parse(memoryview(text + b" "), Params(uid=True))
    return found


def _expunges_as_vanished(response: Any, before: dict[int, int] | None) -> None:
    """Every `* n EXPUNGE` of the answer as one `* VANISHED uids` (RFC 7162 3.2.10)."""
    untagged = getattr(response, "_untagged", None)
    if not untagged or before is None:
        return
    expunged = [item for item in untagged if isinstance(item, ExpungeResponse)]
    if not expunged:
        return
    uids = [before[item.seq] for item in expunged if item.seq in before]
    first = untagged.index(expunged[0])
    kept = [item for item in untagged if not isinstance(item, ExpungeResponse)]
    if uids:
        kept.insert(first, _vanished(uids, earlier=False))
    untagged[:] = kept
