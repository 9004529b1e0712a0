# copy.pyx: gather / scatter of a buffer described by a page array, through a
# FrameTable (physical frame -> attached storage bytes), like a DMA engine
# that walks a scatter list.
#
# Owns: gather (frames -> contiguous buffer) and scatter (contiguous buffer ->
# frames).  Every page is resolved to a pointer and checked first (mapped,
# storage attached and long enough); only then are bytes copied, so a failing
# call copies nothing.
#
# Concurrency: the copy loop runs without the GIL for copies of
# CP_NOGIL_BYTES or more.  While it runs the table's ``busy`` count is raised,
# so attach/detach (which could free a storage buffer) refuse with Busy; the
# caller's out/src buffer stays exported (Py_buffer held) for the whole call.
# The plain-Python twin is poolsvc/_pure/copy.py.
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS
from libc.string cimport memmove


cdef Py_ssize_t _copy_setup(FrameTable table, object pages, object offset, object size,
                            object buf, bint writable, Py_buffer *view,
                            char ***ptrs_out, Py_ssize_t *first_off) except -1:
    """Checks shared by gather and scatter; resolves every page to a pointer.

    Returns the byte count and fills ``view`` (to release), ``ptrs_out``
    (malloc'd, one pointer per page: the frame's bytes) and ``first_off``.
    """
    cdef long long off = 0, count = 0
    cdef cnp.ndarray arr
    cdef const unsigned long long *pa
    cdef Py_ssize_t n, npg, i, done, chunk, start
    cdef char **ptrs
    cdef int flags = PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0)
    if psv_i64_from_obj(offset, &off) == 0 or off < 0 or off > PSV_PAGE_MASK:
        raise BadParameters(f"offset {offset} is not in 0..4095")
    psv_i64_from_obj(size, &count)
    if count < 0:
        raise BadParameters(f"size {size} is negative")
    arr = as_page_array(pages, "pages")
    pa = <const unsigned long long *>cnp.PyArray_DATA(arr)
    n = cnp.PyArray_DIM(arr, 0)
    if <unsigned long long>count > <unsigned long long>n * PSV_PAGE_SIZE:
        raise BadParameters(f"{n} pages cannot hold {size} bytes at offset {off}")
    npg = <Py_ssize_t>((<unsigned long long>count + <unsigned long long>off + PSV_PAGE_MASK)
                       >> PSV_PAGE_SHIFT)
    if npg > n:
        raise BadParameters(f"{size} bytes at offset {off} span {npg} pages; "
                            f"only {n} given")
    what = "out" if writable else "src"
    try:
        PyObject_GetBuffer(buf, view, flags)
    except (TypeError, BufferError, ValueError) as exc:
        raise BadParameters(f"{what} is not a {'writable ' if writable else ''}"
                            f"contiguous buffer: {exc}") from None
    ptrs = NULL
    try:
        if view.len < count:
            raise BadParameters(f"{what} holds {view.len} bytes; {count} needed")
        if count > 0:
            ptrs = <char **>malloc(npg * sizeof(char *))
            if ptrs == NULL:
                raise OutOfMemory(f"cannot allocate {npg} page pointers")
            done = 0
            start = off
            for i in range(npg):
                if pa[i] & PSV_PAGE_MASK:
                    raise AlignmentError(f"page {i} is {pa[i]:#x}, not 4 KiB-aligned")
                chunk = min(<Py_ssize_t>PSV_PAGE_SIZE - start, <Py_ssize_t>count - done)
                ptrs[i] = table.frame_bytes(pa[i], start + chunk)
                done += chunk
                start = 0
    except BaseException:
        free(ptrs)
        PyBuffer_Release(view)
        raise
    ptrs_out[0] = ptrs
    first_off[0] = off
    return <Py_ssize_t>count


cdef void _copy_pages(char **ptrs, char *flat, Py_ssize_t count, Py_ssize_t off,
                      bint to_flat) noexcept nogil:
    cdef Py_ssize_t done = 0, chunk, i = 0
    # plain per-page memmove: software prefetch of the next frames measured
    # slower here (random 4 KiB frames, 1 MiB and 64 MiB)
    while done < count:
        chunk = min(<Py_ssize_t>PSV_PAGE_SIZE - off, count - done)
        if to_flat:
            memmove(flat + done, ptrs[i] + off, chunk)
        else:
            memmove(ptrs[i] + off, flat + done, chunk)
        done += chunk
        off = 0
        i += 1


cdef Py_ssize_t _gather_scatter(FrameTable table, object pages, object offset, object size,
                                object buf, bint to_flat) except -1:
    cdef Py_buffer view
    cdef char **ptrs = NULL
    cdef Py_ssize_t off = 0
    cdef Py_ssize_t count = _copy_setup(table, pages, offset, size, buf, to_flat,
                                        &view, &ptrs, &off)
    try:
        if count >= CP_NOGIL_BYTES:
            ft_copy_begin(table)
            with nogil:
                _copy_pages(ptrs, <char *>view.buf, count, off, to_flat)
            ft_copy_end(table)
        elif count > 0:
            _copy_pages(ptrs, <char *>view.buf, count, off, to_flat)
    finally:
        free(ptrs)
        PyBuffer_Release(&view)
    return count


def gather(FrameTable table, pages, offset, size, out):
    """Copy a buffer described by ``(pages, offset)`` out of the frames into ``out``.

    Params: ``table`` the FrameTable translating frames to storage; ``pages``
    the PAs of the buffer's pages; ``offset`` (0..4095) of its first byte in
    ``pages[0]``; ``size`` bytes to copy; ``out`` a writable contiguous buffer
    of at least ``size`` bytes.
    Returns ``size``.
    Errors: BadParameters (offset, negative size, too few pages, ``out`` not
    writable or short); AlignmentError (a page misaligned); AddressError (a
    page unmapped, its storage not attached or too short).  Every page is
    checked before anything is copied.
    """
    return _gather_scatter(table, pages, offset, size, out, True)


def scatter(FrameTable table, pages, offset, size, src):
    """Copy ``size`` bytes of ``src`` into the frames of ``(pages, offset)``.

    The reverse of ``gather``; same params (``src`` any contiguous buffer of
    at least ``size`` bytes), return value and errors.
    """
    return _gather_scatter(table, pages, offset, size, src, False)
