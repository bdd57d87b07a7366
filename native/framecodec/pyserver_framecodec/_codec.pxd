# The decoder's C-level fields, shared with `_replies.pyx`, which answers cached reads
# straight out of the decoder's buffer.

cimport cython


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
