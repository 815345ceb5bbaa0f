# Declarations of the compiled SMTP parser; the implementation is _parser.pyx.
#
# Tunables are an enum (as uvloop's consts.pxi), so they are C constants with
# no lookup at run time.  Both classes are final: their cdef methods are then
# direct C calls that the compiler may inline.

cimport cython

cdef enum:
    DEFAULT_MAX_LINE = 1024     # octets incl. CRLF: 512 (RFC 5321 §4.5.3.1.4) plus
                                # room for ESMTP parameters, which may raise it (§4.5.3.1)
    LINE_BUFFER_MIN = 4096      # first allocation of a LineReader buffer
    LINE_BUFFER_SHRINK = 65536  # an emptied buffer larger than this is freed

# Where the DATA scanner stands at the end of a feed (RFC 5321 §4.1.1.4).
# Only DOT_CR holds an octet back: that CR is content unless an LF follows.
cdef enum DataState:
    ST_LINE_START = 0   # at the start of data or right after a real CRLF
    ST_MID = 1          # inside a line; the previous octet is not a pending CR
    ST_CR = 2           # inside a line; the last octet was a CR (already emitted)
    ST_DOT = 3          # a '.' at line start (never emitted: end or unstuffed)
    ST_DOT_CR = 4       # '.' CR at line start; the CR is held back


@cython.final
cdef class LineReader:
    cdef char *_buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _start       # first unconsumed octet
    cdef Py_ssize_t _end         # one past the last buffered octet
    cdef Py_ssize_t _scan        # where the LF search resumes
    cdef Py_ssize_t _max         # longest line, CRLF included
    cdef bint _discarding        # dropping an overlong line up to its CRLF
    cdef bint _discard_cr        # ... and the last dropped octet was a CR
    cdef readonly int bare
    cdef readonly Py_ssize_t _debug_scanned   # FASTSMTP_DEBUG builds only

    cdef Py_ssize_t _skip(self, const char *p, Py_ssize_t n) noexcept
    cdef int _append(self, const char *p, Py_ssize_t n) except -1
    cdef void _reset(self) noexcept
    cdef void _advance(self, Py_ssize_t pos) noexcept


@cython.final
cdef class DataReader:
    cdef Py_ssize_t _max_size
    cdef bint _normalize
    cdef readonly bint done
    cdef readonly Py_ssize_t size
    cdef readonly bint oversize
    cdef readonly bint bare_lf
    cdef readonly bint bare_cr
    cdef DataState _state
    cdef char *_out               # output of the feed in progress
    cdef Py_ssize_t _outlen
    cdef readonly Py_ssize_t _debug_copies    # FASTSMTP_DEBUG builds only

    cdef Py_ssize_t _scan(self, const char *p, Py_ssize_t n) noexcept
    cdef Py_ssize_t _crs(self, const char *p, Py_ssize_t run,
                         Py_ssize_t a, Py_ssize_t b) noexcept
    cdef void _emit(self, const char *src, Py_ssize_t m) noexcept
