# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Ready-made replies to cached reads, answered straight out of a `FrameDecoder`'s buffer.

Its twin is `pyserver.pure.replies`: same API, same bytes out. The app server fills the
table with the reply payloads of reads it answered in Python (COUNTS, the first page of
LIST_THREADS and GET_THREAD), keyed by the request's op and exact payload bytes; the
mailbox forgets a user's entries whenever that user's cached image changes or leaves the
cache. `answer()` then replies to the leading run of buffered request frames that hit,
in one call that creates no Python object per request: frames are parsed in place, the
key is looked up in an open-addressing C hash table and the reply frames are written to
one output buffer. It stops at the first frame it cannot answer, which the Python
dispatcher then handles as before.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from pyserver_framecodec._codec cimport FrameDecoder, _read_u32, _write_u32

from pyserver import framedef

cdef extern from "Python.h":
    # CPython's keyed (SipHash) hash of a byte string: collisions cannot be chosen by a
    # client that does not know the process's hash key.
    Py_hash_t _Py_HashBytes(const void* src, Py_ssize_t size)

__all__ = ["ReplyTable"]

cdef enum:
    VERSION = 1
    KIND_REQUEST = 0
    KIND_REPLY = 1
    LENGTH_PREFIX_SIZE = 4
    HEADER_SIZE = 12
    MIN_FRAME_LENGTH = 8
    # Ops the table may hold: every cached read of the protocol is below this.
    OP_LIMIT = 256
    FIRST_CAPACITY = 1024
    # Bytes counted for an entry beyond its payload and reply (slot, objects, index).
    ENTRY_OVERHEAD = 160

cdef enum SlotState:
    EMPTY = 0
    LIVE = 1
    DELETED = 2

for _name, _value in (
    ("VERSION", VERSION),
    ("KIND_REQUEST", KIND_REQUEST),
    ("KIND_REPLY", KIND_REPLY),
    ("HEADER_SIZE", HEADER_SIZE),
    ("MIN_FRAME_LENGTH", MIN_FRAME_LENGTH),
):
    if getattr(framedef, _name) != _value:
        raise ImportError(f"pyserver_framecodec is out of date: framedef.{_name} changed")

# An emptied output buffer above this size is freed rather than kept for the next call.
cdef Py_ssize_t OUT_KEEP = 262144
cdef unsigned long long MAX_USER_ID = 0xFFFFFFFFFFFFFFFF


cdef struct Slot:
    SlotState state
    uint64_t hash
    unsigned int op
    unsigned long long user
    PyObject* payload  # owned reference to the request payload (bytes)
    PyObject* reply  # owned reference to the reply payload (bytes)
    bint read  # asked for since it was put (`answer`, or put with read=True)


cdef inline uint64_t _key_hash(unsigned int op, const unsigned char* payload, Py_ssize_t size):
    cdef uint64_t h = <uint64_t>_Py_HashBytes(payload, size)
    return h ^ ((<uint64_t>op + 1) * <uint64_t>0x9E3779B97F4A7C15)


@cython.final
@cython.auto_pickle(False)
cdef class ReplyTable:
    """ReplyTable(max_bytes: int = 64 MiB, per_user: int = 32)

    Reply payloads of cached reads keyed by (op, request payload bytes), each tagged
    with the user it belongs to. `max_bytes` bounds the whole table (it is emptied when a
    put would pass it), `per_user` the entries of one user (its entries are dropped when
    a put would pass it), so no client can grow it without bound.
    """

    cdef Slot* _slots
    cdef Py_ssize_t _capacity  # a power of two
    cdef Py_ssize_t _live
    cdef Py_ssize_t _deleted
    cdef Py_ssize_t _nbytes
    cdef Py_ssize_t _max_bytes
    cdef Py_ssize_t _per_user
    # user -> list of (op, payload) keys held for it, for `forget`
    cdef dict _by_user
    cdef unsigned long long _hits[OP_LIMIT]
    cdef unsigned char* _out
    cdef Py_ssize_t _out_capacity

    def __cinit__(self):
        self._slots = NULL
        self._capacity = 0
        self._out = NULL
        self._out_capacity = 0
        memset(self._hits, 0, sizeof(self._hits))

    def __init__(self, max_bytes=64 << 20, per_user=32):
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, not {max_bytes!r}")
        if not isinstance(per_user, int) or per_user < 1:
            raise ValueError(f"per_user must be a positive int, not {per_user!r}")
        self._max_bytes = max_bytes
        self._per_user = per_user
        self._by_user = {}
        self._release_all()
        self._slots = <Slot*>PyMem_Malloc(FIRST_CAPACITY * sizeof(Slot))
        if self._slots == NULL:
            raise MemoryError()
        memset(self._slots, 0, FIRST_CAPACITY * sizeof(Slot))
        self._capacity = FIRST_CAPACITY

    def __dealloc__(self):
        self._release_all()
        PyMem_Free(self._out)

    cdef void _release_all(self) noexcept:
        """Drop every entry's references and free the slots."""
        cdef Py_ssize_t i
        if self._slots != NULL:
            for i in range(self._capacity):
                if self._slots[i].state == LIVE:
                    Py_DECREF(<object>self._slots[i].payload)
                    Py_DECREF(<object>self._slots[i].reply)
            PyMem_Free(self._slots)
        self._slots = NULL
        self._capacity = 0
        self._live = 0
        self._deleted = 0
        self._nbytes = 0

    # ---- the hash table ----

    cdef Slot* _find(self, unsigned int op, const unsigned char* payload, Py_ssize_t size,
                     uint64_t h) noexcept:
        """The live slot of (op, payload), or NULL."""
        cdef Py_ssize_t mask = self._capacity - 1
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>mask)
        cdef Slot* slot
        while True:
            slot = &self._slots[i]
            if slot.state == EMPTY:
                return NULL
            if (
                slot.state == LIVE
                and slot.hash == h
                and slot.op == op
                and PyBytes_GET_SIZE(<object>slot.payload) == size
                and memcmp(PyBytes_AS_STRING(<object>slot.payload), payload, size) == 0
            ):
                return slot
            i = (i + 1) & mask

    cdef Slot* _find_key(self, unsigned int op, object payload) noexcept:
        """The live slot of a held key (op, payload bytes), or NULL."""
        cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(payload)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
        return self._find(op, data, size, _key_hash(op, data, size))

    cdef void _insert_new(self, uint64_t h, unsigned int op, unsigned long long user,
                          object payload, object reply, bint read) noexcept:
        """Place an entry known to be absent (the table has room)."""
        cdef Py_ssize_t mask = self._capacity - 1
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>mask)
        while self._slots[i].state == LIVE:
            i = (i + 1) & mask
        if self._slots[i].state == DELETED:
            self._deleted -= 1
        Py_INCREF(payload)
        Py_INCREF(reply)
        self._slots[i].state = LIVE
        self._slots[i].hash = h
        self._slots[i].op = op
        self._slots[i].user = user
        self._slots[i].payload = <PyObject*>payload
        self._slots[i].reply = <PyObject*>reply
        self._slots[i].read = read
        self._live += 1

    cdef int _make_room(self) except -1:
        """Rehash (growing when half full) so one more entry keeps the load under 3/4."""
        cdef Py_ssize_t old_capacity = self._capacity
        cdef Slot* old = self._slots
        cdef Py_ssize_t capacity = old_capacity
        cdef Py_ssize_t i
        if (self._live + self._deleted + 1) * 4 < old_capacity * 3:
            return 0
        if (self._live + 1) * 2 >= old_capacity:
            capacity = old_capacity * 2
        self._slots = <Slot*>PyMem_Malloc(capacity * sizeof(Slot))
        if self._slots == NULL:
            self._slots = old
            raise MemoryError()
        memset(self._slots, 0, capacity * sizeof(Slot))
        self._capacity = capacity
        self._live = 0
        self._deleted = 0
        for i in range(old_capacity):
            if old[i].state == LIVE:
                # the references move with the entry
                self._place_moved(old[i])
        PyMem_Free(old)
        return 0

    cdef void _place_moved(self, Slot entry) noexcept:
        cdef Py_ssize_t mask = self._capacity - 1
        cdef Py_ssize_t i = <Py_ssize_t>(entry.hash & <uint64_t>mask)
        while self._slots[i].state != EMPTY:
            i = (i + 1) & mask
        self._slots[i] = entry
        self._live += 1

    cdef void _delete(self, Slot* slot) noexcept:
        self._nbytes -= (
            PyBytes_GET_SIZE(<object>slot.payload) + PyBytes_GET_SIZE(<object>slot.reply)
            + ENTRY_OVERHEAD
        )
        Py_DECREF(<object>slot.payload)
        Py_DECREF(<object>slot.reply)
        slot.payload = NULL
        slot.reply = NULL
        slot.state = DELETED
        self._live -= 1
        self._deleted += 1

    # ---- the Python API ----

    def put(self, user, op, payload, reply, read=True):
        """put(user: int, op: int, payload: bytes, reply: bytes, read: bool = True) -> None

        Remember `reply` as the answer to request `payload` of `op`, for `user`'s
        connections and service connections only. `read`: it answers a read just made
        (False: it was answered again after a write, and nobody has asked for it since;
        see `held`).
        """
        cdef Py_ssize_t size
        cdef uint64_t h
        cdef Slot* slot
        cdef list keys
        if type(user) is not int or not 1 <= user <= MAX_USER_ID:
            raise ValueError(f"user must be a user id in 1..2**64-1, not {user!r}")
        if type(op) is not int or not 0 <= op < OP_LIMIT:
            raise ValueError(f"op must be an int in 0..{OP_LIMIT - 1}, not {op!r}")
        if type(payload) is not bytes or type(reply) is not bytes:
            raise TypeError("payload and reply must be bytes")
        size = PyBytes_GET_SIZE(payload) + PyBytes_GET_SIZE(reply) + ENTRY_OVERHEAD
        if size > self._max_bytes:
            return  # larger than the whole table: not worth holding
        h = _key_hash(op, <const unsigned char*>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        slot = self._find(op, <const unsigned char*>PyBytes_AS_STRING(payload),
                          PyBytes_GET_SIZE(payload), h)
        if slot != NULL:
            self._forget_key(slot.user, op, payload)
            self._delete(slot)
        keys = self._by_user.get(user)
        if keys is not None and len(keys) >= self._per_user:
            self.forget(user)
            keys = None
        if self._nbytes + size > self._max_bytes:
            self.clear()
            keys = None
        self._make_room()
        self._insert_new(h, op, user, payload, reply, bool(read))
        self._nbytes += size
        if keys is None:
            self._by_user[user] = [(op, payload)]
        else:
            keys.append((op, payload))

    cdef int _forget_key(self, unsigned long long user, unsigned int op, object payload) except -1:
        keys = self._by_user.get(user)
        if keys is not None:
            try:
                keys.remove((op, payload))
            except ValueError:
                pass
            if not keys:
                del self._by_user[user]
        return 0

    def held(self, user, read_only=False):
        """held(user: int, read_only: bool = False) -> list[tuple[int, bytes]]

        The (op, request payload) keys of the replies held for `user`, oldest first;
        with `read_only`, only those asked for since they were put.
        """
        cdef Slot* slot
        cdef unsigned int op
        keys = self._by_user.get(user, ())
        if not read_only:
            return list(keys)
        found = []
        for op, payload in keys:
            slot = self._find_key(op, payload)
            if slot != NULL and slot.read:
                found.append((op, payload))
        return found

    def forget(self, user):
        """forget(user: int) -> None

        Drop every reply held for `user` (its image changed or left the cache).
        """
        cdef Slot* slot
        cdef unsigned int op
        keys = self._by_user.pop(user, None)
        if keys is None:
            return
        for op, payload in keys:
            slot = self._find_key(op, payload)
            if slot != NULL:
                self._delete(slot)

    def clear(self):
        """clear() -> None

        Drop every reply (the server stopped serving, or the table is full).
        """
        self._release_all()
        self._by_user.clear()
        self._slots = <Slot*>PyMem_Malloc(FIRST_CAPACITY * sizeof(Slot))
        if self._slots == NULL:
            raise MemoryError()
        memset(self._slots, 0, FIRST_CAPACITY * sizeof(Slot))
        self._capacity = FIRST_CAPACITY

    def __len__(self):
        return self._live

    @property
    def nbytes(self):
        """Bytes held, counted as payload + reply + a fixed overhead per entry."""
        return self._nbytes

    def hits(self):
        """hits() -> dict[int, int]

        Requests answered by `answer`, by op, since the table was made.
        """
        cdef int op
        return {op: self._hits[op] for op in range(OP_LIMIT) if self._hits[op]}

    cdef int _reserve(self, Py_ssize_t needed) except -1:
        cdef Py_ssize_t capacity
        cdef unsigned char* grown
        if needed <= self._out_capacity:
            return 0
        capacity = max(needed, 2 * self._out_capacity, 4096)
        grown = <unsigned char*>PyMem_Realloc(self._out, capacity)
        if grown == NULL:
            raise MemoryError()
        self._out = grown
        self._out_capacity = capacity
        return 0

    def answer(self, object decoder_object, scope=0):
        """answer(decoder: FrameDecoder, scope: int = 0) -> bytes | None

        The reply frames to the leading buffered requests the table holds, consumed from
        `decoder`; None when the first one is not held. `scope` is the user a user-token
        connection may read (0 for a service connection, which may read any): a reply
        held for another user is not given, exactly as the Python path refuses it.
        Incomplete, malformed, non-request or request-id-0 frames are left in the decoder
        for the Python path, which answers or rejects them as before. The decoder of the
        pure twin is not read here: None.
        """
        cdef unsigned long long c_scope = scope
        cdef Py_ssize_t used = 0
        cdef Py_ssize_t unread, reply_size, payload_size
        cdef const unsigned char* p
        cdef unsigned char* out
        cdef uint32_t length, request_id
        cdef unsigned int op
        cdef Slot* slot
        cdef object result
        cdef FrameDecoder decoder
        if type(decoder_object) is not FrameDecoder:
            return None
        decoder = <FrameDecoder>decoder_object
        if decoder._error_class is not None:
            return None
        while True:
            unread = decoder._end - decoder._start
            if unread < HEADER_SIZE:
                break
            p = decoder._data + decoder._start
            length = _read_u32(p)
            if (
                length < MIN_FRAME_LENGTH
                or length > decoder._limit
                or unread < LENGTH_PREFIX_SIZE + <Py_ssize_t>length
                or p[4] != VERSION
                or p[5] != KIND_REQUEST
            ):
                break
            request_id = _read_u32(p + 8)
            op = (p[6] << 8) | p[7]
            if request_id == 0 or op >= OP_LIMIT:
                break
            payload_size = length - MIN_FRAME_LENGTH
            slot = self._find(op, p + HEADER_SIZE, payload_size,
                              _key_hash(op, p + HEADER_SIZE, payload_size))
            if slot == NULL or (c_scope != 0 and slot.user != c_scope):
                break
            reply_size = PyBytes_GET_SIZE(<object>slot.reply)
            self._reserve(used + HEADER_SIZE + reply_size)
            out = self._out + used
            _write_u32(out, <uint32_t>(MIN_FRAME_LENGTH + reply_size))
            out[4] = VERSION
            out[5] = KIND_REPLY
            out[6] = <unsigned char>(op >> 8)
            out[7] = <unsigned char>op
            _write_u32(out + 8, request_id)
            memcpy(out + HEADER_SIZE, PyBytes_AS_STRING(<object>slot.reply), reply_size)
            used += HEADER_SIZE + reply_size
            slot.read = True
            self._hits[op] += 1
            decoder._consume(LENGTH_PREFIX_SIZE + <Py_ssize_t>length)
        if used == 0:
            return None
        result = PyBytes_FromStringAndSize(<char*>self._out, used)
        if self._out_capacity > OUT_KEEP:
            PyMem_Free(self._out)
            self._out = NULL
            self._out_capacity = 0
        return result
