# userpages.pyx: UserPages, the frames of one registered backing object's
# pages, pinned and released in one call each way (poolsvc/usermem.py's
# per-object ledger), and buffer_address, the address of a caller's buffer.
#
# A registration pins pages [first, first + n) of an object: each page not
# pinned yet gets one of the lowest free frames, mapped in the frame table to
# that page of the storage (a mapping of the object) the caller names; every
# page's reference count goes up.  Releasing is the reverse: counts go down,
# and the frames of pages no registration covers any more are unmapped and
# freed.  Policy (which storage, when a storage is attached or detached)
# stays in Python.
#
# Errors follow docs/core.md: every check comes before the first change.
# Frames are taken and freed through the FrameAllocator's own methods
# (alloc_scattered / free_pages); mappings change through frametable.pxd's
# ft_* helpers.  This file writes only its own type's fields (userpages.pxd).
#
# Concurrency: one thread at a time (the System's); the GIL is held
# throughout.  The plain-Python twin, same checks in the same order, is
# poolsvc/_pure/userpages.py.
from libc.stdlib cimport malloc, realloc
from libc.string cimport memset
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

cdef enum:
    UP_MAX_PAGES = 1 << 30         # first_page + npages <= UP_MAX_PAGES


def buffer_address(obj):
    """The address of the first byte of the non-empty C-contiguous buffer ``obj`` exports.

    Errors: BadParameters (no buffer protocol, not C-contiguous, or empty).
    """
    cdef Py_buffer view
    cdef size_t addr
    cdef bint empty
    try:
        PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
    except (TypeError, BufferError, ValueError):
        raise BadParameters(f"{type(obj).__name__} is not a contiguous buffer") from None
    addr = <size_t>view.buf
    empty = view.len == 0
    PyBuffer_Release(&view)
    if empty:
        raise BadParameters(f"{type(obj).__name__} is an empty buffer")
    return addr


@cython.boundscheck(False)
@cython.wraparound(False)
def page_run_start(pages):
    """``pages[0]`` when the page array holds consecutive frames
    (``pages[i] == pages[0] + i * 4096``), else None.

    Errors: as ``FrameTable.map_pages`` for an array that is not one
    (BadParameters: empty, not 1-D integers).
    """
    cdef cnp.ndarray arr = as_page_array(pages, "pages")
    cdef const uint64_t *pa = <const uint64_t *>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0), i
    if n == 0:
        raise BadParameters("pages is empty")
    for i in range(1, n):
        if pa[i] != pa[0] + <uint64_t>i * PSV_PAGE_SIZE:
            return None
    return pa[0]


@cython.auto_pickle(False)
cdef class UserPages:
    """The frames of one backing object's pages, with a reference count per page.

    ``UserPages(table, frames)``: ``table`` the FrameTable the object's
    storage is attached to, ``frames`` the FrameAllocator frames come from;
    both of this backend, else BadParameters.
    """

    def __cinit__(self, table, frames):
        if not isinstance(table, FrameTable):
            raise BadParameters(f"table must be a FrameTable, got {type(table).__name__}")
        if not isinstance(frames, FrameAllocator):
            raise BadParameters(f"frames must be a FrameAllocator, got {type(frames).__name__}")
        self.table = <FrameTable>table
        self.frames = <FrameAllocator>frames
        self.pa = NULL
        self.refs = NULL
        self.sid = NULL
        self.n = self.cap = self.pinned = self.nrefs = 0
        self.store_sid = NULL
        self.store_pages = NULL
        self.nstore = self.store_cap = 0

    def __dealloc__(self):
        c_free(self.pa)
        c_free(self.refs)
        c_free(self.sid)
        c_free(self.store_sid)
        c_free(self.store_pages)

    # -- internal ------------------------------------------------------------

    cdef int _grow(self, int64_t n) except -1:
        """Room for ``n`` pages (new pages unpinned)."""
        cdef int64_t cap = max(n, 2 * self.cap, 16), k
        cdef void *p
        if n <= self.n:
            return 0
        if n > self.cap:
            p = realloc(self.pa, <size_t>cap * sizeof(uint64_t))
            if p == NULL:
                raise OutOfMemory(f"cannot grow the ledger to {cap} pages")
            self.pa = <uint64_t *>p
            p = realloc(self.refs, <size_t>cap * sizeof(uint32_t))
            if p == NULL:
                raise OutOfMemory(f"cannot grow the ledger to {cap} pages")
            self.refs = <uint32_t *>p
            p = realloc(self.sid, <size_t>cap * sizeof(int32_t))
            if p == NULL:
                raise OutOfMemory(f"cannot grow the ledger to {cap} pages")
            self.sid = <int32_t *>p
            self.cap = cap
        memset(&self.pa[self.n], 0, <size_t>(n - self.n) * sizeof(uint64_t))
        memset(&self.refs[self.n], 0, <size_t>(n - self.n) * sizeof(uint32_t))
        for k in range(self.n, n):
            self.sid[k] = -1
        self.n = n
        return 0

    cdef Py_ssize_t _store(self, int32_t sid) except -1:
        """Index of ``sid``'s pair in the store arrays, added with a zero count if new."""
        cdef Py_ssize_t i
        cdef Py_ssize_t cap
        cdef void *p
        for i in range(self.nstore):
            if self.store_sid[i] == sid:
                return i
        if self.nstore == self.store_cap:
            cap = max(4, 2 * self.store_cap)
            p = realloc(self.store_sid, <size_t>cap * sizeof(int32_t))
            if p == NULL:
                raise OutOfMemory("cannot grow the ledger's storage counts")
            self.store_sid = <int32_t *>p
            p = realloc(self.store_pages, <size_t>cap * sizeof(int64_t))
            if p == NULL:
                raise OutOfMemory("cannot grow the ledger's storage counts")
            self.store_pages = <int64_t *>p
            self.store_cap = cap
        self.store_sid[self.nstore] = sid
        self.store_pages[self.nstore] = 0
        self.nstore += 1
        return self.nstore - 1

    cdef int _give_frames(self, object freed, const uint64_t *pas, int64_t n) except -1:
        """Free the ``n`` frames ``pas`` (in page order; ``freed`` the same as a page
        array, or None when ``n == 1``); all or nothing (DoubleFree as
        ``frames.free_pages``).  Runs of consecutive frames are given back a run
        at a time when they are few; else one ``free_pages`` call."""
        cdef int64_t i, e, q, nruns = 1
        for i in range(1, n):
            if pas[i] != pas[i - 1] + PSV_PAGE_SIZE:
                nruns += 1
        if freed is not None and nruns * 8 > n:
            self.frames.free_pages(freed)
            return 0
        i = 0
        while i < n:                                       # check every run first
            e = i + 1
            while e < n and pas[e] == pas[e - 1] + PSV_PAGE_SIZE:
                e += 1
            if fa_used_run(self.frames, pas[i], e - i) < 0:
                self.frames.free_pages(np.array([pas[q] for q in range(n)], np.uint64))  # raises
                raise InternalError(f"frames at {pas[i]:#x} should not have been free")
            i = e
        i = 0
        while i < n:
            e = i + 1
            while e < n and pas[e] == pas[e - 1] + PSV_PAGE_SIZE:
                e += 1
            fa_give_run(self.frames, fa_used_run(self.frames, pas[i], e - i), e - i)
            i = e
        return 0

    # -- pinning -------------------------------------------------------------

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def pin(self, first_page, npages, storage_id, storage_first):
        """One more reference to pages ``[first_page, first_page + npages)``;
        each page not pinned yet gets a frame mapped to page
        ``p - storage_first`` of storage ``storage_id``.

        Params: ints with ``0 <= first_page``, ``1 <= npages``,
        ``first_page + npages <= 2**30``, ``0 <= storage_id <= 65535``,
        ``0 <= storage_first <= first_page``.
        Returns: a new numpy uint64 array, the frame of each page.  New frames
        are the lowest free ones, ascending in page order.
        Errors, in this order, nothing changed: BadParameters (the params);
        AddressError (some page is new and the storage is not attached or
        holds fewer than ``first_page + npages - storage_first`` pages);
        OutOfMemory (fewer free frames than new pages, as
        ``frames.alloc_scattered``); BadParameters (a new frame already
        mapped, as ``table.map_pages``).
        """
        cdef long long first = 0, n = 0, sid = 0, sfirst = 0
        cdef int64_t k, q, fresh = 0, end, j, old_n, one = -1
        cdef uint64_t one_pa = 0
        cdef Py_ssize_t length, slot, st = 0
        cdef uint64_t *out
        cdef const uint64_t *new_pa
        cdef uint64_t fpa
        cdef FrameTable t = self.table
        if not try_in_range(first_page, 0, UP_MAX_PAGES - 1, &first):
            raise BadParameters(f"first_page must be in 0..{UP_MAX_PAGES - 1}, got {first_page!r}")
        if not try_in_range(npages, 1, UP_MAX_PAGES - first, &n):
            raise BadParameters(f"npages must be in 1..{UP_MAX_PAGES - first}, got {npages!r}")
        if not try_in_range(storage_id, 0, FT_MAX_STORAGE_ID, &sid):
            raise BadParameters(f"storage id {storage_id!r} is not in 0..{FT_MAX_STORAGE_ID}")
        if not try_in_range(storage_first, 0, first, &sfirst):
            raise BadParameters(f"storage_first must be in 0..{first}, got {storage_first!r}")
        end = first + n
        for k in range(first, min(end, self.n)):
            if self.refs[k] == 0:
                fresh += 1
        if end > self.n:
            fresh += end - max(first, self.n)
        if fresh:
            length = ft_storage_length(t, sid)
            if length < 0:
                raise AddressError(f"storage {sid} is not attached")
            if (end - sfirst) * PSV_PAGE_SIZE > length:
                raise AddressError(f"storage {sid} holds {length} bytes; pages up to "
                                   f"{end - sfirst} need {(end - sfirst) * PSV_PAGE_SIZE}")
            if fresh == 1:                                 # one frame: no array
                one = fa_find_run(self.frames, 1)
                if one < 0:
                    self.frames.alloc_scattered(1)         # raises OutOfMemory
                    raise InternalError("a free frame should have been found")
                fa_take_run(self.frames, one, 1)
                one_pa = fa_pa(self.frames, one)
                new_pa = &one_pa
                taken = None
            else:
                taken = self.frames.alloc_scattered(fresh) # OutOfMemory: nothing taken
                new_pa = <const uint64_t *>cnp.PyArray_DATA(taken)
            old_n = self.n
            try:
                self._grow(end)
                st = self._store(<int32_t>sid)
                # map new frame j to its page, in page order; undone if a frame refuses
                j = 0
                for k in range(first, end):
                    if self.refs[k] == 0:
                        slot = ft_run_slot(t, new_pa[j], 1, False)
                        if slot < 0:
                            for q in range(first, k):
                                if self.refs[q] == 0:
                                    ft_unmap_run(t, ft_run_slot(t, self.pa[q], 1, True), 1)
                                    self.pa[q] = 0
                                    self.sid[q] = -1
                            t.map_pages(np.array([new_pa[q] for q in range(fresh)], np.uint64),
                                        sid, 0)            # raises its error
                            raise InternalError(f"frame {new_pa[j]:#x} should not have been mappable")
                        ft_map_run(t, slot, 1, <int32_t>sid, k - sfirst)
                        self.pa[k] = new_pa[j]
                        self.sid[k] = <int32_t>sid
                        j += 1
            except BaseException:
                self.n = old_n                             # pages past it are unpinned again
                if taken is None:
                    fa_give_run(self.frames, one, 1)
                else:
                    self.frames.free_pages(taken)
                raise
            self.pinned += fresh
            self.store_pages[st] += fresh
        result = np.empty(n, dtype=np.uint64)
        out = <uint64_t *>cnp.PyArray_DATA(result)
        for k in range(first, end):
            self.refs[k] += 1
            out[k - first] = self.pa[k]
        self.nrefs += n
        return result

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def unpin(self, first_page, npages):
        """One reference less to pages ``[first_page, first_page + npages)``;
        the frames of pages left with none are unmapped and freed.

        Returns: the number of frames freed.
        Errors, in this order, nothing changed: BadParameters (params as
        ``pin``); DoubleFree (a page of the range not pinned); AddressError
        (a frame to free not mapped, as ``table.unmap_pages``); DoubleFree (a
        frame to free not in use, as ``frames.free_pages``).
        """
        cdef long long first = 0, n = 0
        cdef int64_t k, q, gone = 0, j
        cdef uint64_t one_pa = 0
        cdef Py_ssize_t st = 0
        cdef Py_ssize_t *slots
        cdef int32_t last
        cdef uint64_t *gpa
        cdef FrameTable t = self.table
        if not try_in_range(first_page, 0, UP_MAX_PAGES - 1, &first):
            raise BadParameters(f"first_page must be in 0..{UP_MAX_PAGES - 1}, got {first_page!r}")
        if not try_in_range(npages, 1, UP_MAX_PAGES - first, &n):
            raise BadParameters(f"npages must be in 1..{UP_MAX_PAGES - first}, got {npages!r}")
        if first + n > self.n:
            raise DoubleFree(f"page {max(first, self.n)} of the object is not pinned")
        for k in range(first, first + n):
            if self.refs[k] == 0:
                raise DoubleFree(f"page {k} of the object is not pinned")
            if self.refs[k] == 1:
                gone += 1
        if gone:
            if gone == 1:                                  # one frame: no array
                freed = None
                gpa = &one_pa
            else:
                freed = np.empty(gone, dtype=np.uint64)
                gpa = <uint64_t *>cnp.PyArray_DATA(freed)
            slots = <Py_ssize_t *>malloc(<size_t>gone * sizeof(Py_ssize_t))
            if slots == NULL:
                raise MemoryError()
            try:
                j = 0
                for k in range(first, first + n):
                    if self.refs[k] == 1:
                        gpa[j] = self.pa[k]
                        slots[j] = ft_run_slot(t, self.pa[k], 1, True)
                        j += 1
                        if slots[j - 1] < 0:
                            t.unmap_pages(np.array([gpa[q] for q in range(j)], np.uint64))  # raises
                            raise InternalError(f"frame {self.pa[k]:#x} should not have been unmappable")
                self._give_frames(freed, gpa, gone)
                last = -2
                j = 0
                for k in range(first, first + n):
                    if self.refs[k] == 1:
                        ft_unmap_run(t, slots[j], 1)
                        j += 1
                        if self.sid[k] != last:
                            last = self.sid[k]
                            st = self._store(last)
                        self.store_pages[st] -= 1
                        self.pa[k] = 0
                        self.sid[k] = -1
            finally:
                c_free(slots)
            self.pinned -= gone
        for k in range(first, first + n):
            self.refs[k] -= 1
        self.nrefs -= n
        return gone

    # -- reading -------------------------------------------------------------

    def storage_pages(self, storage_id):
        """Pinned pages mapped to storage ``storage_id`` (0 for any other int)."""
        cdef long long sid = 0
        cdef Py_ssize_t i
        if not try_in_range(storage_id, 0, FT_MAX_STORAGE_ID, &sid):
            return 0
        for i in range(self.nstore):
            if self.store_sid[i] == sid:
                return self.store_pages[i]
        return 0

    def refs_array(self):
        """The reference count of each page of the ledger (numpy uint32, a copy)."""
        if self.n == 0:
            return np.zeros(0, dtype=np.uint32)
        return np.array(<uint32_t[:self.n]> self.refs)

    def frames_array(self):
        """The frame of each page of the ledger, 0 when unpinned (numpy uint64, a copy)."""
        if self.n == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.array(<uint64_t[:self.n]> self.pa)

    @property
    def npages(self):
        """Pages the ledger covers (the highest page ever pinned, plus one)."""
        return self.n

    @property
    def pinned_pages(self):
        """Pages with a reference."""
        return self.pinned

    @property
    def references(self):
        """The sum of the pages' references."""
        return self.nrefs
