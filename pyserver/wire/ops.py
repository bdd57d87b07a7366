"""Operation codes of the wire protocol (docs/protocol.md is the reference)."""

from __future__ import annotations

from enum import IntEnum


class Op(IntEnum):
    PING = 1
    HELLO = 2
    SEND = 10
    DELIVER = 11
    # a mail a user sent out came back undelivered (the MTA proxy read a bounce)
    OUTBOUND_SETTLE = 12
    LIST_THREADS = 20
    GET_THREAD = 21
    GET_MESSAGE = 22
    COUNTS = 23
    SEARCH = 24
    # a folder's messages by UID (the IMAP gateway)
    FOLDER_MESSAGES = 25
    MARK_READ = 30
    MARK_UNREAD = 31
    MOVE = 32
    DELETE = 33
    MARK_SEEN = 34
    # the user's phone for texts and which messages go to it (the SMS gateway)
    SET_SMS = 35
    SUBSCRIBE = 40
    UNSUBSCRIBE = 41
    FRIEND_ADD = 50
    FRIEND_REMOVE = 51
    BLOCK = 52
    UNBLOCK = 53
    STATS = 60
    HEALTH = 61
    # a user's past, from the log (pyserver.app.history, docs/history.md)
    HISTORY = 65
    SHOW_AT = 66
    RESTORE = 67
    # a cached image outdated by a write around the server (pyserver import)
    REFRESH = 68
    # Ranges kept for the other services of a cell, each adding its own codes:
    # 70-79 discovery, 80-89 blobs, 90-99 user index, 100-109 dirty service,
    # 110-119 between app servers, 120-129 the SMS gateway.
    # discovery: user -> cell -> owner (pyserver discovery)
    LOOKUP = 70
    CELL_RING = 71
    CELLS = 72
    # blobs: attachments, long bodies, raw mail (pyserver.blobs)
    GET_BLOB = 80
    # user index service (pyserver userindex)
    RELATION = 90
    FRIENDS = 91
    INDEX_FRIEND_ADD = 92
    INDEX_FRIEND_REMOVE = 93
    # memcache dirty service (pyserver dirty)
    DIRTY = 100
    # between the app servers of a cell (pyserver node)
    DELIVER_COPY = 110
    # the SMS gateway (pyserver sms): an app server's texted copy, to the SMSC
    SMS_SUBMIT = 120


# Operations a user-token connection may not use.
SERVICE_ONLY: frozenset[Op] = frozenset({Op.DELIVER, Op.FRIEND_ADD, Op.FRIEND_REMOVE, Op.STATS})
# Copies of SENDs between app servers travel on service connections only.
SERVICE_ONLY |= {Op.DELIVER_COPY, Op.OUTBOUND_SETTLE, Op.SMS_SUBMIT}
# The user index and dirty services serve trusted tiers only.
SERVICE_ONLY |= {Op.RELATION, Op.FRIENDS, Op.INDEX_FRIEND_ADD, Op.INDEX_FRIEND_REMOVE, Op.DIRTY}
# Discovery answers trusted tiers only (the web tier, the MTA proxy, gateways, app servers).
SERVICE_ONLY |= {Op.LOOKUP, Op.CELL_RING, Op.CELLS}
# A user's past and its restore are operators' tools.
SERVICE_ONLY |= {Op.HISTORY, Op.SHOW_AT, Op.RESTORE}
# Only the tools that write a cell's store around its servers drop cached images.
SERVICE_ONLY |= {Op.REFRESH}
# Operations answered without a HELLO.
NO_HELLO: frozenset[Op] = frozenset({Op.PING, Op.HELLO})
