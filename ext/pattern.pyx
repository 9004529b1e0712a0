# pattern.pyx: owner patterns in buffers, the load harness's per-byte work.
#
# Owns: writing a buffer's pattern (its tag repeated from byte 0, cut at the
# buffer's length) and reading it back, whole or by its ends, one buffer or a
# list of them per call:
#
#   _pattern_fill(buf, tag)                      the whole pattern
#   _pattern_mismatch(buf, tag)                  first byte that differs, or -1
#   _pattern_stamp_ends(views, prefix, handles)  the ends of many buffers
#   _pattern_check_ends(views, prefix, handles)  which of them changed
#
# The *ends* of a buffer of n bytes are its first and its last 16 bytes (all of
# it when n <= 32), each as the whole pattern has them.  A batch names the tag
# of buffer i as ``prefix + handles[i].to_bytes(8, "little")``, built here.
#
# The names are private (underscore) on purpose: these are the harness's
# kernels, not part of poolsvc's API (poolsvc/_core.pyi lists the API).
#
# Errors: BadParameters for an empty tag, a prefix that is not 8 bytes, lists of
# different lengths, a handle that is not a u64, or a buffer that is not a
# (writable, for the writes) contiguous buffer; every argument is checked
# before the first byte is written.
#
# Concurrency: none; the GIL is held throughout.  Plain-Python twin:
# poolsvc/_pure/pattern.py (same results and error types).
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from libc.string cimport memcpy, memcmp


cdef int _pt_buffer(object buf, Py_buffer *view, bint writable) except -1:
    try:
        PyObject_GetBuffer(buf, view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
    except (TypeError, BufferError, ValueError) as exc:
        raise BadParameters(f"{type(buf).__name__} is not a {'writable ' if writable else ''}"
                            f"contiguous buffer: {exc}") from None
    return 0


cdef inline void _pt_fill(char *dst, Py_ssize_t n, const char *tag, Py_ssize_t size) noexcept:
    """``dst[0:n]`` = the pattern of ``tag`` (one copy of the tag, then doubling)."""
    cdef Py_ssize_t done = n if n < size else size
    cdef Py_ssize_t k
    memcpy(dst, tag, done)
    while done < n:
        k = done if done <= n - done else n - done
        memcpy(dst + done, dst, k)
        done += k


cdef inline Py_ssize_t _pt_mismatch(const char *src, Py_ssize_t n, const char *tag,
                                    Py_ssize_t size) noexcept:
    """The first offset of ``src[0:n]`` that differs from the pattern, or -1."""
    cdef Py_ssize_t pos = 0, k, i
    while pos < n:
        k = size if size <= n - pos else n - pos
        if memcmp(src + pos, tag, k) != 0:
            for i in range(k):
                if src[pos + i] != tag[i]:
                    return pos + i
        pos += k
    return -1


cdef inline void _pt_ends(char *buf, Py_ssize_t n, const char *tag, bint write, bint *same) noexcept:
    """Write (``write``) or compare (into ``same``) the ends of a buffer of ``n`` bytes
    with the pattern of the 16-byte ``tag``."""
    cdef char tail[PT_TAG_SIZE]
    cdef Py_ssize_t phase, head
    if n <= 2 * PT_TAG_SIZE:
        if write:
            _pt_fill(buf, n, tag, PT_TAG_SIZE)
        else:
            same[0] = _pt_mismatch(buf, n, tag, PT_TAG_SIZE) < 0
        return
    # the tail starts at n - 16, which is (n - 16) % 16 == n % 16 into the tag
    phase = n & (PT_TAG_SIZE - 1)
    head = PT_TAG_SIZE - phase
    memcpy(tail, tag + phase, head)
    memcpy(tail + head, tag, phase)
    if write:
        memcpy(buf, tag, PT_TAG_SIZE)
        memcpy(buf + n - PT_TAG_SIZE, tail, PT_TAG_SIZE)
    else:
        same[0] = memcmp(buf, tag, PT_TAG_SIZE) == 0 and \
            memcmp(buf + n - PT_TAG_SIZE, tail, PT_TAG_SIZE) == 0


cdef int _pt_tag_args(object prefix, list views, list handles, char *tag) except -1:
    """Check the batch arguments; copy the prefix into ``tag``."""
    if type(prefix) is not bytes or len(<bytes>prefix) != PT_PREFIX_SIZE:
        raise BadParameters(f"prefix must be {PT_PREFIX_SIZE} bytes, got {prefix!r}")
    if len(views) != len(handles):
        raise BadParameters(f"{len(views)} buffers but {len(handles)} handles")
    memcpy(tag, <const char *><bytes>prefix, PT_PREFIX_SIZE)
    return 0


def _pattern_fill(buf, tag):
    """Write ``tag`` repeated from byte 0 over the whole of ``buf`` (cut at its end).

    ``buf``: a writable contiguous buffer; ``tag``: non-empty bytes.  Raises
    BadParameters for anything else (nothing written then).
    """
    cdef Py_buffer view
    if type(tag) is not bytes or not tag:
        raise BadParameters(f"tag must be non-empty bytes, got {tag!r}")
    _pt_buffer(buf, &view, True)
    try:
        _pt_fill(<char *>view.buf, view.len, <const char *><bytes>tag, len(<bytes>tag))
    finally:
        PyBuffer_Release(&view)


def _pattern_mismatch(buf, tag):
    """The first offset where ``buf`` differs from ``tag`` repeated from byte 0, or -1.

    ``buf``: a contiguous buffer; ``tag``: non-empty bytes.  Raises BadParameters
    for anything else.
    """
    cdef Py_buffer view
    cdef Py_ssize_t at
    if type(tag) is not bytes or not tag:
        raise BadParameters(f"tag must be non-empty bytes, got {tag!r}")
    _pt_buffer(buf, &view, False)
    try:
        at = _pt_mismatch(<const char *>view.buf, view.len, <const char *><bytes>tag, len(<bytes>tag))
    finally:
        PyBuffer_Release(&view)
    return at


def _pattern_stamp_ends(list views not None, prefix, list handles not None):
    """Write the ends of each ``views[i]``'s pattern, with the tag ``prefix`` +
    ``handles[i]`` (u64, little-endian); a buffer of at most 32 bytes gets all of it.

    ``views``: writable contiguous buffers; ``prefix``: 8 bytes; ``handles``:
    u64 ints, one per view.  Raises BadParameters (nothing written) for
    anything else.
    """
    cdef char tag[PT_TAG_SIZE]
    cdef Py_ssize_t i, n = len(views)
    cdef Py_buffer *bufs
    cdef unsigned long long *ids
    cdef Py_ssize_t got = 0
    _pt_tag_args(prefix, views, handles, tag)
    bufs = <Py_buffer *>malloc((n + 1) * sizeof(Py_buffer))
    ids = <unsigned long long *>malloc((n + 1) * sizeof(unsigned long long))
    if bufs == NULL or ids == NULL:
        free(bufs)
        free(ids)
        raise MemoryError()
    try:
        for i in range(n):          # every argument first: nothing is written if one is refused
            ids[i] = arg_u64(handles[i], "handle")
            _pt_buffer(views[i], &bufs[i], True)
            got += 1
        for i in range(n):
            psv_store_le64(tag + PT_PREFIX_SIZE, ids[i])
            _pt_ends(<char *>bufs[i].buf, bufs[i].len, tag, True, NULL)
    finally:
        for i in range(got):
            PyBuffer_Release(&bufs[i])
        free(bufs)
        free(ids)


def _pattern_check_ends(list views not None, prefix, list handles not None):
    """The indices ``i``, in order, whose ``views[i]`` ends differ from the pattern
    of the tag ``prefix`` + ``handles[i]`` (all of it for at most 32 bytes).

    Arguments as ``_pattern_stamp_ends`` (the buffers need not be writable);
    raises BadParameters for a bad one.
    """
    cdef char tag[PT_TAG_SIZE]
    cdef Py_ssize_t i, n = len(views)
    cdef Py_buffer view
    cdef bint same = True
    cdef list bad = []
    _pt_tag_args(prefix, views, handles, tag)
    for i in range(n):
        psv_store_le64(tag + PT_PREFIX_SIZE, arg_u64(handles[i], "handle"))
        _pt_buffer(views[i], &view, False)
        _pt_ends(<char *>view.buf, view.len, tag, False, &same)
        PyBuffer_Release(&view)
        if not same:
            bad.append(i)
    return bad
