# The decoder's C-level fields and the big-endian u32 helpers, shared with
# `_replies.pyx`, which answers cached reads straight out of the decoder's buffer.

cimport cython
from libc.stdint cimport uint32_t


@cython.final
cdef class FrameDecoder:
    # Bytes [_start, _end) of _data are unread.
    cdef unsigned char* _data
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    # The largest length field accepted.
    cdef unsigned long long _limit
    cdef object _max_frame_size
    # Once broken: the error's class and message, raised afresh on every later call.
    cdef object _error_class
    cdef str _error_message

    cdef int _append(self, const unsigned char* chunk, Py_ssize_t size) except -1
    cdef void _consume(self, Py_ssize_t size) noexcept
    cdef int _fail(self, error_class, str message) except -1
    cdef object _next(self)


cdef inline uint32_t _read_u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _write_u32(unsigned char* p, uint32_t value) noexcept nogil:
    p[0] = <unsigned char>(value >> 24)
    p[1] = <unsigned char>(value >> 16)
    p[2] = <unsigned char>(value >> 8)
    p[3] = <unsigned char>value
