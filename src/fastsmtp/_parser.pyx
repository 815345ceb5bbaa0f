# cython: language_level=3
# boundscheck/wraparound are off in release builds by setup.py, so that
# the debug build (--cython-directives=boundscheck=True,...) can turn them on.
"""The SMTP hot path in C: command lines and DATA content.

Rules of this module:
- It is a small kernel with a Python-shaped API: any buffer in (acquired with
  PyObject_GetBuffer and released in ``finally``, as httptools does), owned
  ``bytes`` out, no exception ever unwinding through C.
- It holds no policy.  Limits come in; violations come out as LineTooLong,
  ``oversize`` and the ``bare_*`` flags; the session picks the reply.
- Every answer here, down to which octets each feed returns, equals the
  answer of _parser_py.py, the pure-Python twin.  The contract is written
  out there; the tests hold both to it.  Change both or neither.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject, Py_XDECREF
from libc.string cimport memchr, memcpy, memmove

# The one LineTooLong, shared with the twin (_parser_common.py).
from fastsmtp._parser_common import LineTooLong

cdef extern from "Python.h":
    # Declared by hand so that the new object stays a raw reference that
    # _PyBytes_Resize may shrink in place once the content length is known.
    PyObject* _bytes_alloc "PyBytes_FromStringAndSize" (const char *v, Py_ssize_t n) except NULL
    char* _bytes_data "PyBytes_AS_STRING" (PyObject *o)
    int _PyBytes_Resize(PyObject **o, Py_ssize_t n) except -1

cdef enum:
    CR = 13
    LF = 10
    DOT = 46
    BARE_LF = 1     # LineReader.bare bits
    BARE_CR = 2

__all__ = ["LineTooLong", "LineReader", "DataReader", "relaxed_wsp", "tag_list", "relaxed_headers", "header_fields", "DEBUG"]

#: True in builds made with FASTSMTP_DEBUG set (the ``_debug_*`` counters count).
DEBUG = FASTSMTP_DEBUG


@cython.final
cdef class LineReader:
    """Split input at CRLF, and only at CRLF (RFC 5321 §2.3.8)."""

    def __cinit__(self):
        self._buf = NULL
        self._cap = 0

    def __init__(self, Py_ssize_t max_length=DEFAULT_MAX_LINE):
        if max_length < 2:
            raise ValueError("max_length must leave room for the CRLF")
        self._max = max_length
        self._reset()
        self.bare = 0

    def __dealloc__(self):
        PyMem_Free(self._buf)

    def __len__(self):
        return self._end - self._start

    def feed(self, data):
        cdef Py_buffer view
        cdef const char *p
        cdef Py_ssize_t n, skipped
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const char *>view.buf
            n = view.len
            if self._discarding:
                skipped = self._skip(p, n)
                p += skipped
                n -= skipped
            if n:
                self._append(p, n)
        finally:
            PyBuffer_Release(&view)

    def readline(self):
        cdef const char *buf = self._buf
        cdef const char *q
        cdef Py_ssize_t start = self._start, j, length
        cdef bytes line
        while self._scan < self._end:
            q = <const char *>memchr(buf + self._scan, LF, <size_t>(self._end - self._scan))
            if q == NULL:
                if FASTSMTP_DEBUG:
                    self._debug_scanned += self._end - self._scan
                self._scan = self._end
                break
            j = q - buf
            if FASTSMTP_DEBUG:
                self._debug_scanned += j + 1 - self._scan
            self._scan = j + 1
            if j == start or buf[j - 1] != CR:
                continue            # a bare LF is content, not an end of line
            length = j + 1 - start
            if length > self._max:
                self._advance(j + 1)
                raise LineTooLong(f"line of {length} octets, limit {self._max}")
            line = PyBytes_FromStringAndSize(buf + start, length - 2)
            self.bare = 0
            if memchr(buf + start, LF, <size_t>(length - 2)) != NULL:
                self.bare |= BARE_LF
            if memchr(buf + start, CR, <size_t>(length - 2)) != NULL:
                self.bare |= BARE_CR
            self._advance(j + 1)
            return line
        length = self._end - start
        if length > self._max:
            # Drop what we hold and, in feed(), the rest of the line up to
            # its CRLF: memory stays bounded by one line however long it is.
            self._discard_cr = buf[self._end - 1] == CR
            self._discarding = True
            self._advance(self._end)
            raise LineTooLong(f"line of more than {self._max} octets")
        return None

    def take(self):
        cdef bytes rest = PyBytes_FromStringAndSize(self._buf + self._start,
                                                    self._end - self._start)
        self._advance(self._end)
        self._discarding = self._discard_cr = False
        return rest

    cdef void _reset(self) noexcept:
        self._start = self._end = self._scan = 0
        self._discarding = self._discard_cr = False

    cdef void _advance(self, Py_ssize_t pos) noexcept:
        self._start = pos
        if pos == self._end:
            self._start = self._end = self._scan = 0
            if self._cap > LINE_BUFFER_SHRINK:
                PyMem_Free(self._buf)
                self._buf = NULL
                self._cap = 0

    cdef Py_ssize_t _skip(self, const char *p, Py_ssize_t n) noexcept:
        # Discard up to and including the CRLF that ends an overlong line;
        # return how many octets of p that took.
        cdef const char *q
        cdef Py_ssize_t i = 0
        if n == 0:
            return 0
        if self._discard_cr and p[0] == LF:
            self._discarding = self._discard_cr = False
            return 1
        while True:
            q = <const char *>memchr(p + i, LF, <size_t>(n - i))
            if q == NULL:
                self._discard_cr = p[n - 1] == CR
                return n
            i = q - p + 1
            if i > 1 and p[i - 2] == CR:
                self._discarding = self._discard_cr = False
                return i

    cdef int _append(self, const char *p, Py_ssize_t n) except -1:
        cdef Py_ssize_t used, cap
        cdef char *buf
        if self._end + n > self._cap:
            used = self._end - self._start
            if used + n <= self._cap and self._start >= used:
                memmove(self._buf, self._buf + self._start, <size_t>used)
            else:
                cap = max(self._cap * 2, used + n, <Py_ssize_t>LINE_BUFFER_MIN)
                buf = <char *>PyMem_Malloc(<size_t>cap)
                if buf == NULL:
                    raise MemoryError()
                if used:
                    memcpy(buf, self._buf + self._start, <size_t>used)
                PyMem_Free(self._buf)
                self._buf = buf
                self._cap = cap
            self._scan -= self._start
            self._end = used
            self._start = 0
        memcpy(self._buf + self._end, p, <size_t>n)
        self._end += n
        return 0


@cython.final
cdef class DataReader:
    """Find the end of DATA (RFC 5321 §4.1.1.4) and undo dot-stuffing (§4.5.2)."""

    def __cinit__(self):
        self._out = NULL

    def __init__(self, Py_ssize_t max_size, bint normalize=False):
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self._max_size = max_size
        self._normalize = normalize
        self.reset()

    def reset(self):
        self.done = self.oversize = self.bare_lf = self.bare_cr = False
        self.size = 0
        self._state = ST_LINE_START

    def feed(self, data):
        cdef Py_buffer view
        cdef PyObject *out = NULL
        cdef Py_ssize_t n, cap, consumed
        if self.done:
            return b"", 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if n == 0:
                return b"", 0
            # Output is at most the input plus a held-back CR; normalizing can
            # double every octet and add a held-back CR and a pending LF.
            cap = 2 * n + 3 if self._normalize else n + 1
            if self.oversize:
                cap = 0
            elif cap > self._max_size - self.size:
                cap = self._max_size - self.size
            if cap > 0:
                out = _bytes_alloc(NULL, cap)
                self._out = _bytes_data(out)
            self._outlen = 0
            consumed = self._scan(<const char *>view.buf, n)
            if self._outlen == 0:
                return b"", consumed
            if self._outlen != cap:
                _PyBytes_Resize(&out, self._outlen)
            return <object>out, consumed
        finally:
            self._out = NULL
            Py_XDECREF(out)
            PyBuffer_Release(&view)

    cdef Py_ssize_t _scan(self, const char *p, Py_ssize_t n) noexcept:
        # Content is copied in runs: p[run:i] is content not yet emitted.
        cdef Py_ssize_t i = 0, j, run = 0
        cdef const char *q
        cdef DataState state = self._state
        # 1. Settle the state the previous feed ended in (n > 0).
        if state == ST_CR:
            if p[0] == LF:
                i = 1
                state = ST_LINE_START
            else:
                self.bare_cr = True
                if self._normalize:
                    self._emit(b"\n", 1)
                state = ST_MID
        elif state == ST_DOT:
            if p[0] == CR:
                if n == 1:
                    self._state = ST_DOT_CR
                    return 1
                if p[1] == LF:
                    self.done = True
                    return 2
            state = ST_MID              # the dot was stuffing: dropped
        elif state == ST_DOT_CR:
            if p[0] == LF:
                self.done = True
                return 1
            self.bare_cr = True
            self._emit(b"\r\n", 2 if self._normalize else 1)
            state = ST_MID
        # 2. One line per turn: memchr to its LF, then look at its two ends.
        while i < n:
            if state == ST_LINE_START:
                if p[i] == DOT:
                    self._emit(p + run, i - run)
                    if i + 1 == n:
                        state = ST_DOT
                        run = n
                        break
                    if p[i + 1] == CR:
                        if i + 2 == n:
                            state = ST_DOT_CR
                            run = n
                            break
                        if p[i + 2] == LF:
                            self.done = True
                            return i + 3
                    i += 1
                    run = i
                state = ST_MID
            q = <const char *>memchr(p + i, LF, <size_t>(n - i))
            if q == NULL:
                run = self._crs(p, run, i, n - 1)
                state = ST_CR if p[n - 1] == CR else ST_MID
                break
            j = q - p
            if j > i and p[j - 1] == CR:
                run = self._crs(p, run, i, j - 1)
                state = ST_LINE_START
            else:
                run = self._crs(p, run, i, j)
                self.bare_lf = True
                if self._normalize:
                    self._emit(p + run, j - run)
                    self._emit(b"\r\n", 2)
                    run = j + 1
                state = ST_MID
            i = j + 1
        self._emit(p + run, n - run)
        self._state = state
        return n

    cdef Py_ssize_t _crs(self, const char *p, Py_ssize_t run,
                         Py_ssize_t a, Py_ssize_t b) noexcept:
        # Every CR in p[a:b] is bare: no LF follows it.  Flag it, and with
        # normalize make it a CRLF.  Returns the new start of the run.
        cdef const char *q
        if b <= a:
            return run
        if self._normalize:
            q = <const char *>memchr(p + a, CR, <size_t>(b - a))
            while q != NULL:
                self.bare_cr = True
                a = q - p + 1
                self._emit(p + run, a - run)
                self._emit(b"\n", 1)
                run = a
                q = <const char *>memchr(p + a, CR, <size_t>(b - a)) if a < b else NULL
        elif not self.bare_cr and memchr(p + a, CR, <size_t>(b - a)) != NULL:
            self.bare_cr = True
        return run

    cdef void _emit(self, const char *src, Py_ssize_t m) noexcept:
        # Count m content octets; copy those that still fit under max_size.
        cdef Py_ssize_t keep
        if m <= 0:
            return
        if not self.oversize:
            keep = self._max_size - self.size
            if keep >= m:
                keep = m
            else:
                self.oversize = True    # RFC 1870 §6.3: refused with 552 at the end
            if keep > 0:
                memcpy(self._out + self._outlen, src, <size_t>keep)
                self._outlen += keep
                if FASTSMTP_DEBUG:
                    self._debug_copies += 1
        self.size += m


# -- DKIM's relaxed body whitespace (RFC 6376 §3.4.4 a) --------------------------


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* 0x80 in each byte of x that is 0, nothing elsewhere: exact, since
       (b & 0x7f) + 0x7f never carries out of its byte. */
    static inline uint64_t fs_zero_bytes(uint64_t x) {
        const uint64_t low7 = 0x7f7f7f7f7f7f7f7fULL;
        return ~(((x & low7) + low7) | x) & 0x8080808080808080ULL;
    }

    #define FS_EACH(c) (0x0101010101010101ULL * (uint64_t)(c))

    /* The first i in [i, end) where relaxed WSP may change something: a TAB,
       or an SP that an SP, TAB or CR follows; end if there is none.  Eight
       octets a step: the word at i+1 lines each octet up with its successor
       (both loads put octet k in the same bits, whatever the byte order),
       and a word with a hit is looked at octet by octet, so no bit tricks
       depend on the byte order. */
    static Py_ssize_t fs_wsp_next(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) {
        uint64_t w, next, hits;
        while (i + 9 <= end) {
            memcpy(&w, p + i, 8);
            memcpy(&next, p + i + 1, 8);
            hits = fs_zero_bytes(w ^ FS_EACH(9))
                 | (fs_zero_bytes(w ^ FS_EACH(32))
                    & (fs_zero_bytes(next ^ FS_EACH(32)) | fs_zero_bytes(next ^ FS_EACH(9))
                       | fs_zero_bytes(next ^ FS_EACH(13))));
            if (hits)
                break;
            i += 8;
        }
        for (; i < end; i++) {
            if (p[i] == 9)
                return i;
            if (p[i] == 32 && i + 1 < end && (p[i + 1] == 32 || p[i + 1] == 9 || p[i + 1] == 13))
                return i;
        }
        return end;
    }
    """
    Py_ssize_t fs_wsp_next(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept nogil


cdef inline bint _wsp(unsigned char c) noexcept nogil:
    return c == 32 or c == 9


cdef inline Py_ssize_t _wsp_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    # The end of the WSP run that starts at i.
    while i < end and _wsp(p[i]):
        i += 1
    return i


cdef inline bint _changes(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    # Whether the WSP run at i is rewritten: it is not one SP, or a CRLF
    # follows it (fs_wsp_next also stops at an SP before a bare CR).
    cdef Py_ssize_t j = _wsp_end(p, i, end)
    return j - i > 1 or p[i] == 9 or (j + 1 < end and p[j] == CR and p[j + 1] == LF)


def relaxed_wsp(bytes data, Py_ssize_t end):
    """data[:end] with each WSP run as one SP and none before a CRLF; None if it is so already.

    One pass in C where the twin makes up to five (finds, replaces, a
    regex), eight octets a step between the runs it rewrites
    (fs_wsp_next), the text between them copied whole.  Only data[:end]
    is looked at: a CRLF split by ``end`` is not seen, as in the twin.
    """
    cdef const unsigned char *p = <const unsigned char *>data
    cdef Py_ssize_t i, o
    cdef PyObject *out = NULL
    if end < 0 or end > len(data):
        raise ValueError("end is outside data")
    # Find the first run that the rewrite changes.  Most text has none and
    # costs one pass.
    i = fs_wsp_next(p, 0, end)
    while i < end and not _changes(p, i, end):
        i = fs_wsp_next(p, i + 1, end)
    if i == end:
        return None
    out = _bytes_alloc(NULL, end)
    try:
        o = _rewrite(p, i, end, <unsigned char *>_bytes_data(out))
        if o != end:
            _PyBytes_Resize(&out, o)   # shrinks in place: out has no other reference yet
        return <object>out
    finally:
        Py_XDECREF(out)   # <object> took a reference of its own


cdef Py_ssize_t _rewrite(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, unsigned char *q) noexcept:
    # p[:i] is canonical already, a run that changes starts at i, and q has
    # room for end octets; the length written.  Each run that changes
    # becomes one SP, or nothing before a CRLF (or one SP at the very end:
    # the caller holds such runs back); what lies between is copied whole.
    cdef Py_ssize_t o = i, run = i, j
    memcpy(q, p, <size_t>i)
    while i < end:
        j = _wsp_end(p, i, end)
        if j - i > 1 or p[i] == 9 or (j + 1 < end and p[j] == CR and p[j + 1] == LF):
            memcpy(q + o, p + run, <size_t>(i - run))
            o += i - run
            if not (j + 1 < end and p[j] == CR and p[j + 1] == LF):
                q[o] = 32
                o += 1
            run = j
        i = fs_wsp_next(p, j, end)
    memcpy(q + o, p + run, <size_t>(end - run))
    return o + end - run


# -- DKIM's tag lists (RFC 6376 §3.2) and relaxed header fields (§3.4.2) -----------


cdef inline bint _fws(unsigned char c) noexcept nogil:
    return c == 32 or c == 9 or c == CR or c == LF


cdef inline bint _alpha(unsigned char c) noexcept nogil:
    return (c | 0x20) >= 97 and (c | 0x20) <= 122


def tag_list(bytes data):
    """The common tag-list as {name: value}, FWS stripped from both; None where the caller must look closer.

    None: an octet outside ASCII or a control octet other than HTAB, CR
    and LF; a spec without "=" that is not an empty last one (after a
    final ";"); a name that is not ALPHA *ALNUM; a name twice.  The
    caller's careful parser then decides, and names the fault.
    """
    cdef const unsigned char *p = <const unsigned char *>data
    cdef Py_ssize_t n = len(data), i, start = 0, end, eq, ns, ne, vs, ve
    cdef unsigned char c
    cdef dict tags = {}
    for i in range(n):
        c = p[i]
        if c >= 0x7F or (c < 0x20 and c != 9 and c != CR and c != LF):
            return None
    while True:
        end = start
        while end < n and p[end] != 59:  # ";"
            end += 1
        eq = start
        while eq < end and p[eq] != 61:  # "="
            eq += 1
        if eq == end:
            # No "=": only the list's very end may be empty (a trailing ";").
            ns = start
            while ns < end and _fws(p[ns]):
                ns += 1
            return tags if end == n and ns == end else None
        ns, ne = start, eq
        while ns < ne and _fws(p[ns]):
            ns += 1
        while ne > ns and _fws(p[ne - 1]):
            ne -= 1
        if ns == ne or not _alpha(p[ns]):
            return None
        for i in range(ns + 1, ne):
            c = p[i]
            if not (_alpha(c) or (c >= 48 and c <= 57)):
                return None
        vs, ve = eq + 1, end
        while vs < ve and _fws(p[vs]):
            vs += 1
        while ve > vs and _fws(p[ve - 1]):
            ve -= 1
        name = (<const char *>p)[ns:ne].decode("ascii")
        if name in tags:
            return None
        tags[name] = (<const char *>p)[vs:ve].decode("ascii")
        if end == n:
            return tags
        start = end + 1


def relaxed_headers(fields):
    """Each field in the relaxed header canonicalisation (RFC 6376 §3.4.2), concatenated.

    Per field: the name (up to the first ":") lower-cased and without WSP
    at its end; the value with every CRLF removed (unfolding), each run of
    SP and HTAB as one SP and none at its ends; then CRLF.  A field with no
    colon is all name.  Any octets, any input: the twin gives the same.
    """
    cdef Py_ssize_t total = 0, n, colon, i, o = 0, name_end
    cdef const unsigned char *p
    cdef unsigned char *q
    cdef unsigned char c
    cdef bint pending, started
    cdef PyObject *out = NULL
    cdef bytes field
    fields = tuple(fields)   # read twice: one sequence, whatever the caller gave
    for field in fields:
        total += len(field) + 3   # at most the field, a colon and CRLF
    out = _bytes_alloc(NULL, total)
    try:
        q = <unsigned char *>_bytes_data(out)
        for field in fields:
            p = <const unsigned char *>field
            n = len(field)
            colon = 0
            while colon < n and p[colon] != 58:  # ":"
                colon += 1
            name_end = colon
            while name_end > 0 and (p[name_end - 1] == 32 or p[name_end - 1] == 9):
                name_end -= 1
            for i in range(name_end):
                c = p[i]
                q[o] = c + 32 if 65 <= c <= 90 else c
                o += 1
            q[o] = 58
            o += 1
            pending = started = False
            i = colon + 1
            while i < n:
                c = p[i]
                if c == CR and i + 1 < n and p[i + 1] == LF:
                    i += 2   # unfolding: the CRLF goes, the WSP after it stays
                    continue
                if c == 32 or c == 9:
                    pending = True
                else:
                    if pending and started:
                        q[o] = 32
                        o += 1
                    pending = False
                    started = True
                    q[o] = c
                    o += 1
                i += 1
            q[o] = CR
            q[o + 1] = LF
            o += 2
        if o != total:
            _PyBytes_Resize(&out, o)
        return <object>out
    finally:
        Py_XDECREF(out)


def header_fields(bytes data, Py_ssize_t end):
    """data[:end], a whole header section without its empty line, as [(name, raw field)]; None if a line is no field.

    A field (RFC 5322 §2.2, §3.6.8): a name of printable ASCII but ":",
    optional WSP (the obsolete "name :", §4.5), ":", the rest of the line
    and its CRLF, then each folded line (one starting with SP or HTAB,
    §2.2.3) with its CRLF.  A bare CR or LF, a line that starts no field,
    or a field cut by ``end``: None, and the caller reads line by line.
    """
    cdef const unsigned char *p = <const unsigned char *>data
    cdef Py_ssize_t pos = 0, start, name_end
    cdef unsigned char c
    cdef list fields = []
    if end < 0 or end > len(data):
        raise ValueError("end is outside data")
    while pos < end:
        start = pos
        while pos < end:
            c = p[pos]
            if c < 33 or c > 126 or c == 58:
                break
            pos += 1
        if pos == start:
            return None
        name_end = pos
        while pos < end and (p[pos] == 32 or p[pos] == 9):
            pos += 1
        if pos == end or p[pos] != 58:
            return None
        while True:   # the line, then each folded line after it
            while pos < end and p[pos] != CR and p[pos] != LF:
                pos += 1
            if pos + 1 >= end or p[pos] != CR or p[pos + 1] != LF:
                return None
            pos += 2
            if pos == end or (p[pos] != 32 and p[pos] != 9):
                break
        fields.append(((<const char *>p)[start:name_end], (<const char *>p)[start:pos]))
    return fields
