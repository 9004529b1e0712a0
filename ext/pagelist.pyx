# pagelist.pyx: OP-TEE non-contiguous page lists (OPTEE_MSG_ATTR_NONCONTIG).
#
# Owns: building a list from a page array (what Linux's optee_fill_pages_list
# writes), parsing one as the secure side does (OP-TEE's
# msg_param_mobj_from_noncontig + msg_param_extract_pages) from a read_page
# callback or straight from a FrameTable's storage, and merging a page
# array into physically contiguous segments (the scatterlist rules).
#
# Format: list pages of 4096 bytes; 511 little-endian u64 entries, then a u64
# holding the PA of the next list page.  buf_ptr = PA of the first list page |
# offset of the buffer in its first page.
#
# The C kernels (building a list, the alignment checks) are in psv_pagelist.h.
#
# Concurrency: no shared state; every function holds the GIL except that
# pagelist_build copies without it for lists longer than a few pages.
# The plain-Python twin is poolsvc/_pure/pagelist.py (same checks, same order).
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport malloc, free

# lists of at least this many list pages are copied without the GIL
cdef enum:
    PL_NOGIL_LIST_PAGES = 64


cdef Py_ssize_t _list_pages(Py_ssize_t npages) noexcept nogil:
    return (npages + PL_ENTRIES - 1) // PL_ENTRIES


cdef Py_ssize_t _first_misaligned(const unsigned long long *pages, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if pages[i] & PSV_PAGE_MASK:
            return i
    return -1


cdef cnp.ndarray _check_build_args(object pages, object offset, object list_pa,
                                   uint64_t *list_pa_out):
    """The checks of build and build_into before the entries, in the contract's order."""
    cdef cnp.ndarray arr = as_page_array(pages, "pages")
    cdef const unsigned long long *pa = <const unsigned long long *>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
    cdef long long off = 0
    cdef unsigned long long lpa = 0
    if n == 0:
        raise BadParameters("a page list needs at least one page")
    if psv_i64_from_obj(offset, &off) == 0 or off < 0 or off > PSV_PAGE_MASK:
        raise BadParameters(f"offset {offset} is not in 0..4095")
    if psv_u64_from_obj(list_pa, &lpa) == 0:
        raise BadParameters(f"list_pa {list_pa:#x} is not a 64-bit physical address")
    if lpa & PSV_PAGE_MASK:
        raise AlignmentError(f"list_pa {lpa:#x} is not 4 KiB-aligned")
    # the address just past the list (a full last page's next) must fit in u64
    if <uint64_t>_list_pages(n) > (PSV_U64_MAX - lpa) // PSV_PAGE_SIZE:
        raise SizeOverflow(f"{_list_pages(n)} list pages at {lpa:#x} run past 2**64")
    list_pa_out[0] = lpa
    return arr


cdef int _raise_misaligned_entry(const unsigned long long *pa, Py_ssize_t n) except -1:
    cdef Py_ssize_t bad = _first_misaligned(pa, n)
    raise AlignmentError(f"page-list entry {bad} is {pa[bad]:#x}, not 4 KiB-aligned")


def pagelist_build(pages, offset, list_pa):
    """The OP-TEE non-contiguous page list of a buffer.

    Params: ``pages`` the PAs of the buffer's 4 KiB pages (non-empty 1-D
    array-like, each page-aligned); ``offset`` (0..4095) of the buffer's first
    byte in ``pages[0]`` (it goes into buf_ptr, not into the list); ``list_pa``
    the page-aligned PA of the first list page (the list pages are contiguous).
    Returns ``ceil(n/511) * 4096`` bytes.
    Errors: BadParameters (no pages, bad offset, list_pa not u64);
    AlignmentError (list_pa or an entry misaligned; names index and value);
    SizeOverflow (the list would run past 2**64).
    """
    cdef uint64_t lpa = 0
    cdef cnp.ndarray arr = _check_build_args(pages, offset, list_pa, &lpa)
    cdef const unsigned long long *pa = <const unsigned long long *>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
    cdef Py_ssize_t nlist = _list_pages(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, nlist * PSV_PAGE_SIZE)
    cdef char *dst = PyBytes_AS_STRING(out)
    cdef unsigned long long acc
    # one pass: copy the entries and OR them; a misaligned entry shows in the
    # OR, and then the half-written bytes are dropped
    if nlist >= PL_NOGIL_LIST_PAGES:
        with nogil:
            acc = psv_fill_page_list_or(dst, pa, n, lpa)
    else:
        acc = psv_fill_page_list_or(dst, pa, n, lpa)
    if acc & PSV_PAGE_MASK:
        _raise_misaligned_entry(pa, n)
    return out


def pagelist_build_into(pages, offset, list_pa, out):
    """``pagelist_build`` written into the writable buffer ``out``.

    Params: as ``pagelist_build``; ``out`` a writable contiguous buffer of at
    least ``ceil(n/511) * 4096`` bytes.
    Returns the number of bytes written.
    Errors: those of ``pagelist_build``, then BadParameters (``out`` not a
    writable contiguous buffer, or too short).  Nothing is written on error.
    """
    cdef uint64_t lpa = 0
    cdef cnp.ndarray arr = _check_build_args(pages, offset, list_pa, &lpa)
    cdef const unsigned long long *pa = <const unsigned long long *>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
    cdef Py_ssize_t need = _list_pages(n) * PSV_PAGE_SIZE
    cdef Py_buffer view
    if psv_or_reduce(pa, n) & PSV_PAGE_MASK:        # check before touching out
        _raise_misaligned_entry(pa, n)
    try:
        PyObject_GetBuffer(out, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
    except (TypeError, BufferError, ValueError) as exc:
        raise BadParameters(f"out is not a writable contiguous buffer: {exc}") from None
    try:
        if view.len < need:
            raise BadParameters(f"out holds {view.len} bytes; the list needs {need}")
        with nogil:
            psv_fill_page_list(<char *>view.buf, pa, n, lpa)
    finally:
        PyBuffer_Release(&view)
    return need


cdef Py_ssize_t _parse_ranges_slow(object nonsecure, pl_range **out) except -1:
    """``nonsecure`` ((base, size) pairs) as a malloc'd C array; its length."""
    cdef list pairs
    cdef Py_ssize_t i
    cdef pl_range *ranges
    pairs = as_int_pairs(nonsecure, "nonsecure must be (base, size) pairs of ints")
    for base, size in pairs:
        if base < 0 or size < 0 or base + size > U64_LIMIT:
            raise BadParameters(f"nonsecure range {base:#x}+{size:#x} is outside the "
                                "64-bit address space")
    # Empty ranges hold no page: dropped, so that every kept one has an inclusive
    # end below 2**64 (a base of 2**64 comes only with size 0).
    pairs = [(base, base + size - 1) for base, size in pairs if size]
    ranges = <pl_range *>malloc(max(len(pairs), 1) * sizeof(pl_range))
    if ranges == NULL:
        raise OutOfMemory("cannot allocate the non-secure ranges")
    for i in range(len(pairs)):
        ranges[i].base = pairs[i][0]
        ranges[i].last = pairs[i][1]
    out[0] = ranges
    return len(pairs)


cdef Py_ssize_t _parse_ranges(object nonsecure, pl_range **out) except -1:
    """``nonsecure`` ((base, size) pairs) as a malloc'd C array; its length.

    Fast path for the usual argument, a tuple or list of 2-tuples of exact
    ints that are all valid; anything else (and every error) takes the slow
    path, which gives the contract's messages.
    """
    cdef Py_ssize_t i, n, kept = 0
    cdef pl_range *ranges
    cdef unsigned long long b = 0, sz = 0
    cdef object item
    if type(nonsecure) is not tuple and type(nonsecure) is not list:
        return _parse_ranges_slow(nonsecure, out)
    n = len(nonsecure)
    ranges = <pl_range *>malloc(max(n, 1) * sizeof(pl_range))
    if ranges == NULL:
        raise OutOfMemory("cannot allocate the non-secure ranges")
    for i in range(n):
        item = nonsecure[i]
        if (type(item) is not tuple or len(<tuple>item) != 2
                or type((<tuple>item)[0]) is not int or type((<tuple>item)[1]) is not int
                or psv_u64_from_obj((<tuple>item)[0], &b) != 1
                or psv_u64_from_obj((<tuple>item)[1], &sz) != 1
                or (b > 0 and sz > PSV_U64_MAX - b + 1)):     # base + size > 2**64
            free(ranges)
            return _parse_ranges_slow(nonsecure, out)
        if sz:  # an empty range holds no page
            ranges[kept].base = b
            ranges[kept].last = b + (sz - 1)
            kept += 1
    out[0] = ranges
    return kept


cdef cnp.ndarray _pl_result(unsigned long long ptr, unsigned long long sz, object max_pages):
    """Checks 1-3 of ``pagelist_parse`` (after the u64 conversions), in order;
    the (empty) array of the ``num_pages`` entries."""
    cdef unsigned long long offset = ptr & PSV_PAGE_MASK, num_pages
    cdef long long limit = 0
    cdef cnp.npy_intp dims[1]
    if sz > PSV_U64_MAX - offset:
        raise SizeOverflow(f"size {sz:#x} + offset {offset:#x} overflows u64")
    if sz == 0:
        raise BadParameters("size is 0: the buffer has no pages")
    num_pages = (sz + offset - 1) // PSV_PAGE_SIZE + 1
    if num_pages > PSV_U64_MAX // 8:
        # unreachable with 64-bit sizes (num_pages < 2**52), kept as OP-TEE has it
        raise SizeOverflow(f"{num_pages} pages * 8 bytes overflows u64")
    psv_i64_from_obj(max_pages, &limit)
    if limit < 0 or num_pages > <unsigned long long>limit:
        raise OutOfMemory(f"{num_pages} pages exceed the limit of {max_pages}")
    try:
        dims[0] = <cnp.npy_intp>num_pages
        return cnp.PyArray_EMPTY(1, dims, cnp.NPY_UINT64, 0)
    except (MemoryError, ValueError):
        raise OutOfMemory(f"cannot allocate {num_pages} page entries") from None


cdef int _pl_walk(cnp.ndarray result, unsigned long long ptr, object read_page, FrameTable table,
                  const pl_range *ranges, Py_ssize_t nranges) except -1:
    """Check 4 of ``pagelist_parse``: walk the list from ``ptr``'s list page into
    ``result`` (its length is num_pages).  List pages come from ``table`` or, if
    it is None, from ``read_page``; ``ranges`` NULL: no region check."""
    cdef unsigned long long num_pages = <unsigned long long>cnp.PyArray_DIM(result, 0)
    cdef unsigned long long page_pa, next_pa = 0, v, lo = 0, hi = 0
    cdef Py_ssize_t done = 0, chunk, i, k = 0
    cdef Py_buffer view
    cdef unsigned long long *entries = <unsigned long long *>cnp.PyArray_DATA(result)
    cdef const char *src
    page_pa = ptr & ~<unsigned long long>PSV_PAGE_MASK
    # bounded: every list page yields at least one entry, num_pages in all
    while <unsigned long long>done < num_pages:
        if done > 0:
            if next_pa & PSV_PAGE_MASK:
                raise AlignmentError(f"next pointer of list page {k - 1} ({page_pa:#x}) "
                                     f"is {next_pa:#x}, not 4 KiB-aligned")
            page_pa = next_pa
        if ranges != NULL and not pl_page_inside(ranges, nranges, page_pa):
            raise SecureMemoryError(f"list page {k} at {page_pa:#x} is not in "
                                    "non-secure memory")
        chunk = min(<Py_ssize_t>PL_ENTRIES, <Py_ssize_t>(num_pages - done))
        if table is not None:
            # each u64 is loaded once from the normal world's page into the
            # secure side's own array (and next_pa), and only the copies are checked
            src = table.frame_bytes(page_pa, PSV_PAGE_SIZE)
            psv_load_le64_array(entries + done, src, chunk)
            if chunk == PL_ENTRIES:
                next_pa = psv_load_le64(src + PL_NEXT_OFFSET)
        else:
            data = read_page(page_pa)
            try:
                PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS)
            except (TypeError, BufferError, ValueError) as exc:
                raise BadParameters(f"read_page({page_pa:#x}) did not return a contiguous "
                                    f"buffer: {exc}") from None
            try:
                if view.len < PSV_PAGE_SIZE:
                    raise BadParameters(f"read_page({page_pa:#x}) returned {view.len} bytes, "
                                        "fewer than 4096")
                psv_load_le64_array(entries + done, <const char *>view.buf, chunk)
                if chunk == PL_ENTRIES:
                    next_pa = psv_load_le64(<const char *>view.buf + PL_NEXT_OFFSET)
            finally:
                PyBuffer_Release(&view)
        # fast path: all aligned, and (with ranges) the lowest and highest
        # entry inside one range; else find the first bad entry in order
        if (psv_or_min_max(entries + done, chunk, &lo, &hi) & PSV_PAGE_MASK
                or (ranges != NULL and not pl_span_inside(ranges, nranges, lo, hi))):
            for i in range(done, done + chunk):
                v = entries[i]
                if v & PSV_PAGE_MASK:
                    raise AlignmentError(f"page-list entry {i} is {v:#x}, not 4 KiB-aligned")
                if ranges != NULL and not pl_page_inside(ranges, nranges, v):
                    raise SecureMemoryError(f"page-list entry {i} ({v:#x}) is not in "
                                            "non-secure memory")
        done += chunk
        k += 1
    return 0


cdef object _pagelist_parse(object buf_ptr, object size, object read_page, FrameTable table,
                            object nonsecure, object max_pages):
    """The walk of ``pagelist_parse`` (``table`` None: list pages come from
    ``read_page``) and ``pagelist_parse_frames`` (from ``table``)."""
    cdef unsigned long long ptr = 0, sz = 0
    cdef Py_ssize_t nranges = 0
    cdef pl_range *ranges = NULL
    cdef cnp.ndarray result
    if psv_u64_from_obj(buf_ptr, &ptr) == 0:
        raise BadParameters(f"buf_ptr {buf_ptr:#x} is not a u64")
    if psv_u64_from_obj(size, &sz) == 0:
        raise BadParameters(f"size {size:#x} is not a u64")
    result = _pl_result(ptr, sz, max_pages)
    try:
        if nonsecure is not None:
            nranges = _parse_ranges(nonsecure, &ranges)
        _pl_walk(result, ptr, read_page, table, ranges, nranges)
    finally:
        free(ranges)
    return result


def pagelist_parse(buf_ptr, size, read_page, nonsecure=None, max_pages=1 << 20):
    """The pages of a buffer described by a page list, checked as OP-TEE does.

    Params: ``buf_ptr`` the PA of the first list page | the buffer's offset in
    its first page; ``size`` the buffer's length in bytes; ``read_page(pa)``
    returns the (at least) 4096 bytes of the list page at ``pa``; ``nonsecure``
    None (no region check) or ``(base, size)`` ranges that every list page
    and entry page must lie within; ``max_pages`` the most pages accepted.
    Returns ``ndarray[uint64]`` of ``(size + offset - 1) // 4096 + 1`` pages.
    Errors, in this order: BadParameters (buf_ptr or size not u64);
    SizeOverflow (size + offset); BadParameters (size 0); SizeOverflow
    (num_pages * 8); OutOfMemory (more than ``max_pages``); then, walking:
    SecureMemoryError (a list page outside ``nonsecure``, checked before it is
    read), BadParameters (read_page gave fewer than 4096 bytes or no buffer),
    AlignmentError (a ``next`` pointer or an entry misaligned),
    SecureMemoryError (an entry page outside ``nonsecure``).  Exceptions of
    ``read_page`` propagate.
    """
    return _pagelist_parse(buf_ptr, size, read_page, None, nonsecure, max_pages)


def pagelist_parse_frames(buf_ptr, size, table, nonsecure=None, max_pages=1 << 20):
    """``pagelist_parse`` with the list pages read through a FrameTable.

    Params: as ``pagelist_parse``, with ``table`` (a ``FrameTable``) in place
    of ``read_page``: list page ``pa`` is what ``table.read(pa, 4096)`` would
    return, but no bytes object is made (each entry is loaded once into the
    result, and ``next`` once, before they are checked).
    Errors: BadParameters first if ``table`` is not a FrameTable; then those
    of ``pagelist_parse``, with the AddressError of ``table.read`` in place of
    ``read_page``'s errors (a list page unmapped, unattached or beyond its
    storage).
    """
    if not isinstance(table, FrameTable):
        raise BadParameters(f"table must be a FrameTable, not {type(table).__name__}")
    return _pagelist_parse(buf_ptr, size, None, <FrameTable>table, nonsecure, max_pages)


def pagelist_segments(pages, max_segment=None):
    """Merge runs of physically consecutive pages into ``(pa, length)`` segments.

    Params: ``pages`` a 1-D array-like of page-aligned PAs; ``max_segment``
    None (no cap) or a cap in bytes, rounded down to whole pages.
    Returns a list of ``(pa, length)``; ``[]`` for no pages.
    Errors: BadParameters (``max_segment`` below 4096); AlignmentError (an
    entry misaligned).
    """
    cdef cnp.ndarray arr = as_page_array(pages, "pages")
    cdef const unsigned long long *pa = <const unsigned long long *>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0), i, bad
    cdef unsigned long long cap = PSV_U64_MAX, start, run
    cdef long long ms = 0
    cdef list out = []
    if max_segment is not None:
        psv_i64_from_obj(max_segment, &ms)
        if ms < PSV_PAGE_SIZE:
            raise BadParameters(f"max_segment {max_segment} is below one page (4096)")
        cap = <unsigned long long>ms >> PSV_PAGE_SHIFT
    if n == 0:
        return out
    if psv_or_reduce(pa, n) & PSV_PAGE_MASK:
        bad = _first_misaligned(pa, n)
        raise AlignmentError(f"page {bad} is {pa[bad]:#x}, not 4 KiB-aligned")
    start = pa[0]
    run = 1
    for i in range(1, n):
        if pa[i] == pa[i - 1] + PSV_PAGE_SIZE and pa[i] > pa[i - 1] and run < cap:
            run += 1
        else:
            out.append((start, run << PSV_PAGE_SHIFT))
            start = pa[i]
            run = 1
    out.append((start, run << PSV_PAGE_SHIFT))
    return out
