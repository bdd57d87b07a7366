# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""The wire-frame codec of DESIGN.md ("Wire protocol") in Cython, on the server's hot path.

Its twin is `pyserver.pure.frame`: same API, same bytes out, same errors and messages.
The layout and the `Frame` class come from `pyserver.framedef`.

The decoder owns one C buffer: bytes `[_start, _end)` are unread. Feeding appends at
`_end` (sliding the unread bytes to the front or growing the buffer when full), so a
large frame arriving in many small chunks is copied a bounded number of times; frames
are parsed by pointer arithmetic straight out of it.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check, PyLong_FromUnsignedLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from libc.stdint cimport uint32_t
from libc.string cimport memcpy, memmove

from pyserver.errors import BadFrameVersion, FrameError, FrameTooLarge
from pyserver import framedef
from pyserver.framedef import DEFAULT_MAX_FRAME_SIZE, Frame


cdef extern from "Python.h":
    # Declared here with its real C signature (Cython's own takes an object).
    object PyType_GenericAlloc(PyTypeObject* type, Py_ssize_t nitems)

__all__ = ["encode_frame", "FrameDecoder"]

# The layout as C constants, checked against framedef at import below.
cdef enum:
    VERSION = 1
    KIND_EVENT = 3
    LENGTH_PREFIX_SIZE = 4
    HEADER_SIZE = 12
    MIN_FRAME_LENGTH = 8
    MAX_OP = 0xFFFF

cdef unsigned long long MAX_REQUEST_ID = 0xFFFFFFFF
cdef unsigned long long MAX_FRAME_LENGTH = 0xFFFFFFFF

# Buffer sizing: the first allocation, and the capacity above which an emptied buffer is
# freed, so one huge frame does not pin its memory for the connection's lifetime.
cdef Py_ssize_t MIN_CAPACITY = 16384
cdef Py_ssize_t SHRINK_ABOVE = 262144

for _name, _value in (
    ("VERSION", VERSION),
    ("KIND_EVENT", KIND_EVENT),
    ("LENGTH_PREFIX_SIZE", LENGTH_PREFIX_SIZE),
    ("HEADER_SIZE", HEADER_SIZE),
    ("MIN_FRAME_LENGTH", MIN_FRAME_LENGTH),
    ("MAX_OP", MAX_OP),
    ("MAX_REQUEST_ID", MAX_REQUEST_ID),
    ("MAX_FRAME_LENGTH", MAX_FRAME_LENGTH),
):
    if getattr(framedef, _name) != _value:
        raise ImportError(f"pyserver_framecodec is out of date: framedef.{_name} changed")

# Frames are built by filling a freshly allocated Frame directly, skipping the Python-level
# `Frame.__new__`. That is only sound while Frame is a plain tuple subclass with no extra
# fields; otherwise fall back to `tuple.__new__`.
cdef bint _FILL_FRAME_DIRECTLY = (
    Frame.__bases__ == (tuple,)
    and Frame.__basicsize__ == tuple.__basicsize__
    and Frame.__itemsize__ == tuple.__itemsize__
    and len(Frame._fields) == 4
)
cdef object _tuple_new = tuple.__new__
cdef object _frame_class = Frame


cdef inline object _make_frame(object kind, object op, object request_id, object payload):
    cdef object frame
    if not _FILL_FRAME_DIRECTLY:
        return _tuple_new(Frame, (kind, op, request_id, payload))
    frame = PyType_GenericAlloc(<PyTypeObject*>_frame_class, 4)
    # PyTuple_SET_ITEM steals a reference; Cython passes borrowed ones.
    Py_INCREF(kind)
    PyTuple_SET_ITEM(frame, 0, kind)
    Py_INCREF(op)
    PyTuple_SET_ITEM(frame, 1, op)
    Py_INCREF(request_id)
    PyTuple_SET_ITEM(frame, 2, request_id)
    Py_INCREF(payload)
    PyTuple_SET_ITEM(frame, 3, payload)
    return frame


cdef unsigned long long _check_field(
    object value, str name, unsigned long long limit, str what
) except? 0xFFFFFFFFFFFFFFFF:
    cdef int overflow = 0
    cdef long long number
    if not PyLong_Check(value):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    number = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow != 0 or number < 0 or <unsigned long long>number > limit:
        raise ValueError(f"{name} {value} is out of range: {what}")
    return <unsigned long long>number


cdef object _contiguous(object data):
    """`data` itself, or a bytes copy if it is a memoryview the buffer protocol cannot
    hand out flat (non-contiguous)."""
    if isinstance(data, memoryview) and not data.c_contiguous:
        return data.tobytes()
    return data


def encode_frame(kind, op, request_id, payload):
    """encode_frame(kind: int, op: int, request_id: int, payload: bytes) -> bytes

    The wire bytes of one frame; ValueError if a field does not fit its slot.
    """
    cdef unsigned long long c_kind = _check_field(
        kind, "kind", KIND_EVENT, "must be 0 (request), 1 (reply), 2 (error) or 3 (event)"
    )
    cdef unsigned long long c_op = _check_field(
        op, "op", MAX_OP, "must fit in an unsigned 16-bit field"
    )
    cdef unsigned long long c_request_id = _check_field(
        request_id, "request_id", MAX_REQUEST_ID, "must fit in an unsigned 32-bit field"
    )
    cdef Py_buffer view
    cdef unsigned char* out
    cdef object frame
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"payload must be bytes, bytearray or memoryview, not {type(payload).__name__}"
        )
    payload = _contiguous(payload)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        if <unsigned long long>view.len > MAX_FRAME_LENGTH - MIN_FRAME_LENGTH:
            raise ValueError(
                f"payload of {view.len} bytes is too large: the frame length must fit in 32 bits"
            )
        frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + view.len)
        out = <unsigned char*>PyBytes_AS_STRING(frame)
        _write_u32(out, <uint32_t>(MIN_FRAME_LENGTH + view.len))
        out[4] = VERSION
        out[5] = <unsigned char>c_kind
        out[6] = <unsigned char>(c_op >> 8)
        out[7] = <unsigned char>c_op
        _write_u32(out + 8, <uint32_t>c_request_id)
        if view.len:
            memcpy(out + HEADER_SIZE, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return frame


@cython.final
@cython.auto_pickle(False)
cdef class FrameDecoder:
    """FrameDecoder(max_frame_size: int = DEFAULT_MAX_FRAME_SIZE)

    Incremental frame decoder: `feed()` chunks as they arrive, then drain `next_frame()`.

    After a malformed frame the decoder is broken: the stream can no longer be trusted,
    so every later `next_frame()` raises the same error again. Frames before the bad one
    are returned normally.
    """

    # Its fields are declared in _codec.pxd.

    def __cinit__(self):
        self._data = NULL
        self._capacity = 0
        self._start = 0
        self._end = 0

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        if not isinstance(max_frame_size, int):
            raise TypeError(f"max_frame_size must be an int, not {type(max_frame_size).__name__}")
        if max_frame_size < MIN_FRAME_LENGTH:
            raise ValueError(
                f"max_frame_size {max_frame_size} is below {MIN_FRAME_LENGTH}, "
                "the length of a frame with an empty payload"
            )
        self._max_frame_size = max_frame_size
        # The length field is 32 bits, so a larger limit is no limit at all.
        self._limit = min(max_frame_size, MAX_FRAME_LENGTH)
        self._start = 0
        self._end = 0
        self._error_class = None
        self._error_message = None

    def __dealloc__(self):
        PyMem_Free(self._data)

    @property
    def max_frame_size(self):
        """The largest length field accepted (the frame minus its 4-byte length prefix)."""
        return self._max_frame_size

    @property
    def buffered(self):
        """The number of bytes held: fed but not yet returned in a frame."""
        return self._end - self._start

    def feed(self, data):
        """feed(data: bytes | bytearray | memoryview) -> None

        Buffer a chunk of the stream; a frame may be split anywhere.
        """
        cdef Py_buffer view
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"feed() takes bytes, bytearray or memoryview, not {type(data).__name__}"
            )
        data = _contiguous(data)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            # A broken stream is untrusted; holding more of it helps no one.
            if view.len and self._error_class is None:
                self._append(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _append(self, const unsigned char* chunk, Py_ssize_t size) except -1:
        cdef Py_ssize_t unread = self._end - self._start
        cdef Py_ssize_t capacity
        cdef unsigned char* grown
        if self._end + size > self._capacity:
            if self._start >= unread and unread + size <= self._capacity:
                # Slide the unread bytes to the front: they are no more than the bytes
                # consumed since the last slide, which keeps the copying linear.
                memmove(self._data, self._data + self._start, unread)
            else:
                capacity = max(2 * self._capacity, unread + size, MIN_CAPACITY)
                grown = <unsigned char*>PyMem_Malloc(capacity)
                if grown == NULL:
                    raise MemoryError()
                memcpy(grown, self._data + self._start, unread)
                PyMem_Free(self._data)
                self._data = grown
                self._capacity = capacity
            self._start = 0
            self._end = unread
        memcpy(self._data + self._end, chunk, size)
        self._end += size
        return 0

    cdef void _consume(self, Py_ssize_t size) noexcept:
        self._start += size
        if self._start == self._end:
            self._start = 0
            self._end = 0
            if self._capacity > SHRINK_ABOVE:
                PyMem_Free(self._data)
                self._data = NULL
                self._capacity = 0

    cdef int _fail(self, error_class, str message) except -1:
        self._error_class = error_class
        self._error_message = message
        raise error_class(message)

    cdef object _next(self):
        cdef Py_ssize_t unread = self._end - self._start
        cdef const unsigned char* p
        cdef uint32_t length
        cdef object frame
        if self._error_class is not None:
            raise self._error_class(self._error_message)
        if unread < LENGTH_PREFIX_SIZE:
            return None
        p = self._data + self._start
        length = _read_u32(p)
        if length > self._limit:
            self._fail(
                FrameTooLarge,
                f"frame length {length} is over the limit of {self._max_frame_size} bytes",
            )
        if length < MIN_FRAME_LENGTH:
            self._fail(
                FrameError,
                f"frame length {length} is under {MIN_FRAME_LENGTH}, the size of the header",
            )
        if unread < HEADER_SIZE:
            return None
        if p[4] != VERSION:
            self._fail(
                BadFrameVersion, f"frame version {p[4]} is not supported (expected {VERSION})"
            )
        if p[5] > KIND_EVENT:
            self._fail(FrameError, f"frame kind {p[5]} is unknown (expected 0 to {KIND_EVENT})")
        if unread < LENGTH_PREFIX_SIZE + <Py_ssize_t>length:
            return None
        frame = _make_frame(
            p[5],
            (p[6] << 8) | p[7],
            PyLong_FromUnsignedLong(_read_u32(p + 8)),
            PyBytes_FromStringAndSize(<char*>p + HEADER_SIZE, length - MIN_FRAME_LENGTH),
        )
        self._consume(LENGTH_PREFIX_SIZE + <Py_ssize_t>length)
        return frame

    def next_frame(self):
        """next_frame() -> Frame | None

        The next whole frame, or None if more bytes are needed.
        """
        return self._next()

    def __iter__(self):
        """Yield the whole frames buffered, stopping when more bytes are needed."""
        return _FrameIterator(self)


@cython.final
@cython.auto_pickle(False)
cdef class _FrameIterator:
    """Iterator over a decoder's buffered frames; once exhausted (or after an error) it
    stays exhausted, like a generator."""

    cdef FrameDecoder _decoder

    def __cinit__(self, FrameDecoder decoder not None):
        self._decoder = decoder

    def __iter__(self):
        return self

    def __next__(self):
        cdef FrameDecoder decoder = self._decoder
        cdef object frame
        if decoder is None:
            raise StopIteration
        self._decoder = None
        frame = decoder._next()
        if frame is None:
            raise StopIteration
        self._decoder = decoder
        return frame
