# frametable.pyx: FrameTable, physical frame -> (storage id, page index),
# and the attached storage buffers that read / write / gather / scatter copy
# through.  Fields, invariants and the inline helpers the other kernels use
# to change it (arena.pyx, smc_driver.pyx, copy.pyx): frametable.pxd.
#
# Concurrency: no locks.  A table belongs to one thread at a time.  The only
# code that runs without the GIL is the copy loop of copy.pyx, which resolves
# every page to a pointer first and counts itself in busy (ft_copy_begin /
# ft_copy_end); attach/detach refuse with Busy while busy > 0, so no storage
# buffer goes away under a running copy.  map/unmap never move storage bytes
# and stay allowed.
#
# Errors follow docs/core.md: validate everything first, then mutate, so a
# failing call leaves the table as it was.  The plain-Python twin, with the
# same checks in the same order, is poolsvc/_pure/tables.py.
cimport cython
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset, memmove, memcpy
from libc.stdint cimport uint64_t, int64_t, int32_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

import numpy as np

from poolsvc.errors import Busy


@cython.auto_pickle(False)
cdef class FrameTable:
    """Maps each frame of the physical address space to ``(storage_id, page_index)``.

    ``FrameTable(regions)``: ``regions`` is a sequence of ``(base_pa, size)``
    pairs, page-aligned, non-overlapping, ``size > 0``; at most 16 regions and
    2**24 frames in all.  Storage ids are ``0 <= sid < 65536``.

    Raises BadParameters (AlignmentError for misaligned values) for bad regions.
    """

    def __cinit__(self):
        self.frame_sid = NULL
        self.frame_index = NULL
        self.storages = NULL
        self.nstorage_slots = 0
        self.nregions = 0
        self.nslots = 0
        self.mapped = 0
        self.busy = 0
        self.views = {}

    def __init__(self, regions):
        cdef list pairs
        cdef Py_ssize_t total = 0, i
        cdef int r
        pairs = as_int_pairs(regions, "regions must be (base_pa, size) pairs of ints")
        if not pairs:
            raise BadParameters("a frame table needs at least one region")
        if len(pairs) > FT_MAX_REGIONS:
            raise BadParameters(f"{len(pairs)} regions, more than the {FT_MAX_REGIONS} "
                                "a frame table holds")
        for base, size in pairs:
            if size <= 0:
                raise BadParameters(f"region at {base:#x} has size {size}, must be > 0")
            if base < 0 or base + size > U64_LIMIT:
                raise BadParameters(f"region {base:#x}+{size:#x} is outside the 64-bit "
                                    "physical address space")
            if base & PSV_PAGE_MASK or size & PSV_PAGE_MASK:
                raise AlignmentError(f"region {base:#x}+{size:#x} is not 4 KiB-aligned")
        ordered = sorted(pairs)
        for i in range(1, len(ordered)):
            if ordered[i][0] < ordered[i - 1][0] + ordered[i - 1][1]:
                raise BadParameters(f"regions {ordered[i - 1][0]:#x}+{ordered[i - 1][1]:#x} and "
                                    f"{ordered[i][0]:#x}+{ordered[i][1]:#x} overlap")
        total_frames = sum(size >> PSV_PAGE_SHIFT for _, size in pairs)
        if total_frames > PSV_FT_MAX_FRAMES:
            raise BadParameters(f"regions cover {total_frames} frames, more than the "
                                f"{PSV_FT_MAX_FRAMES} a frame table holds")
        total = total_frames
        self.frame_sid = <int32_t *>malloc(max(total, 1) * sizeof(int32_t))
        self.frame_index = <int64_t *>calloc(max(total, 1), sizeof(int64_t))
        if self.frame_sid == NULL or self.frame_index == NULL:
            raise OutOfMemory(f"cannot allocate a frame table of {total} frames")
        memset(self.frame_sid, 0xff, total * sizeof(int32_t))   # every slot FT_UNMAPPED
        i = 0
        for r in range(len(pairs)):
            self.rgn[r].base_pfn = pairs[r][0] >> PSV_PAGE_SHIFT
            self.rgn[r].count = pairs[r][1] >> PSV_PAGE_SHIFT
            self.rgn[r].first = i
            i += <Py_ssize_t>self.rgn[r].count
        self.nregions = len(pairs)
        self.nslots = total

    def __dealloc__(self):
        free(self.frame_sid)
        free(self.frame_index)
        free(self.storages)

    # -- internal ----------------------------------------------------------

    cdef Py_ssize_t slot_of(self, uint64_t pa) noexcept nogil:
        return ft_region_slot(self.rgn, self.nregions, pa >> PSV_PAGE_SHIFT)

    cdef int check_ids(self, int64_t storage_id, int64_t first_index, int64_t npages) except -1:
        if npages <= 0:
            raise BadParameters(f"npages is {npages}, must be > 0")
        if storage_id < 0 or storage_id > FT_MAX_STORAGE_ID:
            raise BadParameters(f"storage id {storage_id} is not in 0..{FT_MAX_STORAGE_ID}")
        if first_index < 0 or npages > PSV_FT_MAX_PAGE_INDEX - first_index:
            raise BadParameters(f"page indexes {first_index}..{first_index}+{npages} are not "
                                f"in 0..{PSV_FT_MAX_PAGE_INDEX}")
        return 0

    cdef Py_ssize_t range_slot(self, object pa_obj, object npages_obj, uint64_t *pa_out) except -2:
        """Slot of the first frame of ``npages`` frames at ``pa``, all in one region."""
        cdef unsigned long long pa = 0
        cdef int64_t npages = clamp_i64(npages_obj)
        cdef int r
        if psv_u64_from_obj(pa_obj, &pa) == 0:
            raise AddressError(f"physical address {pa_obj:#x} is outside every region")
        if pa & PSV_PAGE_MASK:
            raise AlignmentError(f"physical address {pa:#x} is not 4 KiB-aligned")
        r = ft_region_index(self.rgn, self.nregions, pa >> PSV_PAGE_SHIFT)
        if r < 0:
            raise AddressError(f"physical address {pa:#x} is outside every region")
        if <uint64_t>npages > self.rgn[r].count - ((pa >> PSV_PAGE_SHIFT) - self.rgn[r].base_pfn):
            raise AddressError(f"{npages} frames at {pa:#x} run past the end of their region "
                               f"({(self.rgn[r].base_pfn + self.rgn[r].count) << PSV_PAGE_SHIFT:#x})")
        pa_out[0] = pa
        return self.rgn[r].first + <Py_ssize_t>((pa >> PSV_PAGE_SHIFT) - self.rgn[r].base_pfn)

    cdef Py_ssize_t page_slot(self, uint64_t pa, Py_ssize_t i) except -2:
        """Slot of page-array entry ``i`` (``pa``): aligned and inside a region."""
        cdef Py_ssize_t slot
        if pa & PSV_PAGE_MASK:
            raise AlignmentError(f"page {i} is {pa:#x}, not 4 KiB-aligned")
        slot = self.slot_of(pa)
        if slot < 0:
            raise AddressError(f"page {i} ({pa:#x}) is outside every region")
        return slot

    cdef char *frame_bytes(self, uint64_t pa, Py_ssize_t end_in_page) except NULL:
        """Address of the bytes of the frame holding ``pa``.

        The frame must be mapped, its storage attached, and the storage must
        hold the frame's first ``end_in_page`` bytes; else AddressError.
        """
        cdef Py_ssize_t slot = self.slot_of(pa)
        cdef int32_t sid
        cdef int64_t start
        if slot < 0:
            raise AddressError(f"physical address {pa:#x} is outside every region")
        sid = self.frame_sid[slot]
        if sid < 0:
            raise AddressError(f"frame {pa & ~<uint64_t>PSV_PAGE_MASK:#x} is not mapped")
        if sid >= self.nstorage_slots or self.storages[sid].base == NULL:
            raise AddressError(f"storage {sid} of frame {pa & ~<uint64_t>PSV_PAGE_MASK:#x} "
                               "is not attached")
        start = self.frame_index[slot] * PSV_PAGE_SIZE
        if start + end_in_page > self.storages[sid].length:
            raise AddressError(f"storage {sid} holds {self.storages[sid].length} bytes; frame "
                               f"{pa & ~<uint64_t>PSV_PAGE_MASK:#x} needs "
                               f"{start + end_in_page}")
        return self.storages[sid].base + start

    cdef int resolve_range(self, uint64_t pa, Py_ssize_t n, char **ptrs) except -1:
        """Fill ``ptrs[k]`` with the address of byte ``pa + k*4096 - pa%4096``'s frame."""
        cdef Py_ssize_t k = 0, done = 0, chunk
        cdef Py_ssize_t off = <Py_ssize_t>(pa & PSV_PAGE_MASK)
        while done < n:
            chunk = min(<Py_ssize_t>PSV_PAGE_SIZE - off, n - done)
            ptrs[k] = self.frame_bytes(pa + <uint64_t>done, off + chunk) + off
            done += chunk
            off = 0
            k += 1
        return 0

    # -- mapping -----------------------------------------------------------

    def map_range(self, pa, npages, storage_id, first_index):
        """Map ``npages`` frames from ``pa`` to ``(storage_id, first_index + i)``.

        Params: ``pa`` page-aligned PA; ``npages > 0``; ``0 <= storage_id < 65536``;
        ``first_index >= 0``.
        Errors: BadParameters (counts, ids, a frame already mapped);
        AddressError (outside every region, or straddling its end);
        AlignmentError (``pa`` misaligned).
        """
        cdef int64_t n = clamp_i64(npages), sid = clamp_i64(storage_id), first = clamp_i64(first_index)
        cdef uint64_t a = 0
        cdef Py_ssize_t slot, k
        self.check_ids(sid, first, n)
        slot = self.range_slot(pa, npages, &a)
        for k in range(n):
            if self.frame_sid[slot + k] != FT_UNMAPPED:
                raise BadParameters(f"frame {a + <uint64_t>k * PSV_PAGE_SIZE:#x} is already mapped")
        for k in range(n):
            self.frame_sid[slot + k] = <int32_t>sid
            self.frame_index[slot + k] = first + k
        self.mapped += n

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def map_pages(self, pages, storage_id, first_index):
        """Map ``pages[i]`` to ``(storage_id, first_index + i)``.

        Params: ``pages`` a non-empty 1-D array-like of page-aligned PAs.
        Errors: as ``map_range``; a PA twice in ``pages``: BadParameters.
        All-or-nothing.
        """
        cdef cnp.ndarray arr = as_page_array(pages, "pages")
        cdef const uint64_t *pa = <const uint64_t *>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0), i, slot, bad = -1
        cdef int64_t sid = clamp_i64(storage_id), first = clamp_i64(first_index)
        self.check_ids(sid, first, n)
        # validation pass: mark each slot -2 ("claimed by this call") so that
        # a duplicate shows; undo the marks on failure
        try:
            for i in range(n):
                slot = self.page_slot(pa[i], i)
                if self.frame_sid[slot] != FT_UNMAPPED:
                    if self.frame_sid[slot] == -2:
                        raise BadParameters(f"page {i} ({pa[i]:#x}) appears twice in the array")
                    raise BadParameters(f"page {i}: frame {pa[i]:#x} is already mapped")
                self.frame_sid[slot] = -2
                bad = i
        except BaseException:
            for i in range(bad + 1):
                self.frame_sid[self.slot_of(pa[i])] = FT_UNMAPPED
            raise
        for i in range(n):
            slot = self.slot_of(pa[i])
            self.frame_sid[slot] = <int32_t>sid
            self.frame_index[slot] = first + i
        self.mapped += n

    def unmap_range(self, pa, npages):
        """Unmap ``npages`` frames from ``pa``; every one must be mapped.

        Errors: BadParameters (``npages <= 0``); AlignmentError; AddressError
        (outside a region, or a frame not mapped).
        """
        cdef int64_t n = clamp_i64(npages)
        cdef uint64_t a = 0
        cdef Py_ssize_t slot, k
        if n <= 0:
            raise BadParameters(f"npages is {n}, must be > 0")
        slot = self.range_slot(pa, npages, &a)
        for k in range(n):
            if self.frame_sid[slot + k] < 0:
                raise AddressError(f"frame {a + <uint64_t>k * PSV_PAGE_SIZE:#x} is not mapped")
        for k in range(n):
            self.frame_sid[slot + k] = FT_UNMAPPED
            self.frame_index[slot + k] = 0
        self.mapped -= n

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def unmap_pages(self, pages):
        """Unmap the frames of a non-empty page array; each must be mapped once.

        Errors: BadParameters (empty array); AlignmentError; AddressError
        (outside a region, not mapped, or twice in the array).  All-or-nothing.
        """
        cdef cnp.ndarray arr = as_page_array(pages, "pages")
        cdef const uint64_t *pa = <const uint64_t *>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0), i, slot, bad = -1
        cdef int32_t sid
        if n <= 0:
            raise BadParameters("pages is empty")
        # validation pass: a mapped sid s is marked as -3 - s and restored on
        # failure; a second sight of a marked slot is a duplicate
        try:
            for i in range(n):
                slot = self.page_slot(pa[i], i)
                sid = self.frame_sid[slot]
                if sid <= -3:
                    raise AddressError(f"page {i} ({pa[i]:#x}) appears twice in the array")
                if sid < 0:
                    raise AddressError(f"page {i}: frame {pa[i]:#x} is not mapped")
                self.frame_sid[slot] = -3 - sid
                bad = i
        except BaseException:
            for i in range(bad + 1):
                slot = self.slot_of(pa[i])
                self.frame_sid[slot] = -3 - self.frame_sid[slot]
            raise
        for i in range(n):
            slot = self.slot_of(pa[i])
            self.frame_sid[slot] = FT_UNMAPPED
            self.frame_index[slot] = 0
        self.mapped -= n

    # -- lookups -----------------------------------------------------------

    def lookup(self, pa):
        """``(storage_id, page_index)`` of the frame holding ``pa`` (any alignment).

        Errors: AddressError when ``pa`` is outside every region or unmapped.
        """
        cdef unsigned long long a = 0
        cdef Py_ssize_t slot = self.mapped_slot(pa, &a)
        return (self.frame_sid[slot], self.frame_index[slot])

    def translate(self, pa):
        """``(storage_id, byte offset in that storage)`` of physical address ``pa``.

        The offset is ``page_index * 4096 + pa % 4096``.
        Errors: AddressError when ``pa`` is outside every region or unmapped.
        """
        cdef unsigned long long a = 0
        cdef Py_ssize_t slot = self.mapped_slot(pa, &a)
        return (self.frame_sid[slot],
                self.frame_index[slot] * PSV_PAGE_SIZE + <int64_t>(a & PSV_PAGE_MASK))

    cdef Py_ssize_t mapped_slot(self, object pa, unsigned long long* a) except -1:
        """The frame slot of a mapped physical address (``*a`` receives it as u64).

        Raises AddressError when ``pa`` is not a u64, is outside every region, or
        its frame is unmapped.
        """
        cdef Py_ssize_t slot
        if psv_u64_from_obj(pa, a) == 0:
            raise AddressError(f"physical address {pa:#x} is outside every region")
        slot = ft_region_slot(self.rgn, self.nregions, a[0] >> PSV_PAGE_SHIFT)
        if slot < 0 or self.frame_sid[slot] < 0:
            self.raise_unmapped(a[0], slot)
        return slot

    cdef int raise_unmapped(self, uint64_t pa, Py_ssize_t slot) except -1:
        if slot < 0:
            raise AddressError(f"physical address {pa:#x} is outside every region")
        raise AddressError(f"physical address {pa:#x} is not mapped")

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def translate_batch(self, pas):
        """The batch form of ``translate``.

        Params: ``pas`` a 1-D array-like of PAs (any alignment).
        Returns ``(storage_ids: ndarray[int32], offsets: ndarray[int64])``.
        Errors: AddressError naming the first address outside or unmapped.
        """
        cdef cnp.ndarray arr = as_page_array(pas, "pas")
        cdef const uint64_t *pa = <const uint64_t *>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0), i, slot = -1
        cdef cnp.ndarray sids = np.empty(n, dtype=np.int32)
        cdef cnp.ndarray offs = np.empty(n, dtype=np.int64)
        cdef int32_t *sid_out = <int32_t *>cnp.PyArray_DATA(sids)
        cdef int64_t *off_out = <int64_t *>cnp.PyArray_DATA(offs)
        cdef const ft_region *rg
        cdef int r = 0
        cdef uint64_t pfn
        cdef bint failed = False
        with nogil:
            for i in range(n):
                pfn = pa[i] >> PSV_PAGE_SHIFT
                rg = &self.rgn[r]
                if pfn - rg.base_pfn >= rg.count:          # not the last region hit
                    r = ft_region_index(self.rgn, self.nregions, pfn)
                    if r < 0:
                        r = 0
                        slot = -1
                        failed = True
                        break
                    rg = &self.rgn[r]
                slot = rg.first + <Py_ssize_t>(pfn - rg.base_pfn)
                if self.frame_sid[slot] < 0:
                    failed = True
                    break
                sid_out[i] = self.frame_sid[slot]
                off_out[i] = self.frame_index[slot] * PSV_PAGE_SIZE + <int64_t>(pa[i] & PSV_PAGE_MASK)
        if failed:
            self.raise_unmapped(pa[i], slot)
        return sids, offs

    def is_mapped(self, pa):
        """True if the frame holding ``pa`` is mapped (False outside every region)."""
        cdef unsigned long long a = 0
        cdef Py_ssize_t slot
        if psv_u64_from_obj(pa, &a) == 0:
            return False
        slot = ft_region_slot(self.rgn, self.nregions, a >> PSV_PAGE_SHIFT)
        return slot >= 0 and self.frame_sid[slot] >= 0

    def region_index(self, pa):
        """Index (in the constructor's order) of the region holding ``pa``, or -1."""
        cdef unsigned long long a = 0
        if psv_u64_from_obj(pa, &a) == 0:
            return -1
        return ft_region_index(self.rgn, self.nregions, a >> PSV_PAGE_SHIFT)

    @property
    def mapped_frames(self):
        """Number of frames currently mapped."""
        return self.mapped

    @property
    def regions(self):
        """The regions as ``[(base_pa, size), ...]`` in the constructor's order."""
        return [(self.rgn[r].base_pfn << PSV_PAGE_SHIFT,
                 self.rgn[r].count << PSV_PAGE_SHIFT) for r in range(self.nregions)]

    # -- storage -----------------------------------------------------------

    def attach(self, storage_id, buffer):
        """Attach the writable buffer holding storage ``storage_id``'s bytes.

        Params: ``buffer`` a writable C-contiguous buffer (mmap, bytearray,
        memoryview, numpy array); it is kept exported (so it cannot be resized
        or closed) until ``detach`` or the table's end.  Re-attaching replaces.
        Errors: BadParameters (id out of range, not a buffer, read-only, not
        contiguous); Busy (a copy is running without the GIL).
        """
        cdef int64_t sid = clamp_i64(storage_id)
        cdef Py_buffer view
        cdef ft_storage *grown
        cdef Py_ssize_t k, new_slots
        if sid < 0 or sid > FT_MAX_STORAGE_ID:
            raise BadParameters(f"storage id {storage_id} is not in 0..{FT_MAX_STORAGE_ID}")
        if self.busy:
            raise Busy(f"cannot attach storage {sid}: a copy is in progress")
        try:
            mv = memoryview(buffer)
        except TypeError:
            raise BadParameters(f"storage {sid}: {type(buffer).__name__} is not a buffer") from None
        if mv.readonly:
            mv.release()
            raise BadParameters(f"storage {sid}: the buffer is read-only")
        if not mv.c_contiguous:
            mv.release()
            raise BadParameters(f"storage {sid}: the buffer is not contiguous")
        if mv.ndim != 1 or mv.format != "B":
            flat = mv.cast("B")
            mv.release()
            mv = flat
        if sid >= self.nstorage_slots:
            new_slots = max(sid + 1, 2 * self.nstorage_slots, 16)
            grown = <ft_storage *>realloc(self.storages, new_slots * sizeof(ft_storage))
            if grown == NULL:
                mv.release()
                raise OutOfMemory(f"cannot grow the storage table to {new_slots} entries")
            for k in range(self.nstorage_slots, new_slots):
                grown[k].base = NULL
                grown[k].length = 0
            self.storages = grown
            self.nstorage_slots = new_slots
        PyObject_GetBuffer(mv, &view, PyBUF_WRITABLE)
        # the memoryview keeps the exporter's buffer (and its address) alive
        self.storages[sid].base = <char *>view.buf
        self.storages[sid].length = view.len
        PyBuffer_Release(&view)
        old = self.views.get(sid)
        self.views[sid] = mv
        if old is not None:
            old.release()

    def detach(self, storage_id):
        """Drop the buffer of storage ``storage_id``.

        Errors: ItemNotFound (none attached); Busy (a copy is running).
        """
        cdef int64_t sid = clamp_i64(storage_id)
        if sid not in self.views:
            raise ItemNotFound(f"storage {storage_id} is not attached")
        if self.busy:
            raise Busy(f"cannot detach storage {sid}: a copy is in progress")
        self.storages[sid].base = NULL
        self.storages[sid].length = 0
        self.views.pop(sid).release()

    def attached(self):
        """The attached storage ids, ascending."""
        return sorted(self.views)

    def read(self, pa, n):
        """``n`` bytes from physical address ``pa``, copied page by page.

        Errors: BadParameters (``n < 0``); AddressError (a page touched is
        outside, unmapped, unattached or beyond its storage's end).
        """
        cdef int64_t count = clamp_i64(n)
        cdef unsigned long long a = 0
        cdef Py_ssize_t npg, k, done = 0, chunk, off
        cdef char **ptrs
        cdef bytes out
        cdef char *dst
        if count < 0:
            raise BadParameters(f"n is {n}, must be >= 0")
        if psv_u64_from_obj(pa, &a) == 0:
            raise AddressError(f"physical address {pa:#x} is outside every region")
        if count == 0:
            return b""
        if count > <int64_t>(PSV_FT_MAX_FRAMES * PSV_PAGE_SIZE) or <uint64_t>(count - 1) > 0xffffffffffffffff - a:
            raise AddressError(f"{n} bytes at {a:#x} run past every region")
        off = <Py_ssize_t>(a & PSV_PAGE_MASK)
        npg = (off + count + PSV_PAGE_MASK) >> PSV_PAGE_SHIFT
        ptrs = <char **>malloc(npg * sizeof(char *))
        if ptrs == NULL:
            raise OutOfMemory(f"cannot allocate {npg} page pointers")
        try:
            self.resolve_range(a, count, ptrs)
            out = PyBytes_FromStringAndSize(NULL, count)
            dst = PyBytes_AS_STRING(out)
            for k in range(npg):
                chunk = min(<Py_ssize_t>PSV_PAGE_SIZE - off, count - done)
                memcpy(dst + done, ptrs[k], chunk)
                done += chunk
                off = 0
        finally:
            free(ptrs)
        return out

    def write(self, pa, data):
        """Copy the bytes-like ``data`` to physical address ``pa``, page by page.

        Errors: BadParameters (``data`` not a contiguous buffer); AddressError
        (as ``read``).  Nothing is written unless every page checks out.
        """
        cdef unsigned long long a = 0
        cdef Py_buffer src
        cdef Py_ssize_t npg, k, done = 0, chunk, off, count
        cdef char **ptrs = NULL
        try:
            PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
        except (TypeError, BufferError, ValueError) as exc:
            raise BadParameters(f"data is not a contiguous buffer: {exc}") from None
        try:
            count = src.len
            if psv_u64_from_obj(pa, &a) == 0:
                raise AddressError(f"physical address {pa:#x} is outside every region")
            if count == 0:
                return None
            if <uint64_t>(count - 1) > 0xffffffffffffffff - a:
                raise AddressError(f"{count} bytes at {a:#x} run past every region")
            off = <Py_ssize_t>(a & PSV_PAGE_MASK)
            npg = (off + count + PSV_PAGE_MASK) >> PSV_PAGE_SHIFT
            ptrs = <char **>malloc(npg * sizeof(char *))
            if ptrs == NULL:
                raise OutOfMemory(f"cannot allocate {npg} page pointers")
            self.resolve_range(a, count, ptrs)
            for k in range(npg):
                chunk = min(<Py_ssize_t>PSV_PAGE_SIZE - off, count - done)
                memmove(ptrs[k], <char *>src.buf + done, chunk)
                done += chunk
                off = 0
        finally:
            free(ptrs)
            PyBuffer_Release(&src)


cdef int ft_copy_small(FrameTable t, uint64_t pa, char *buf, Py_ssize_t n, bint write) except -1:
    """Copy ``n`` (<= 4096) bytes between ``buf`` and physical ``pa`` (to ``pa``
    when ``write``).

    Every page touched is resolved before a byte moves (AddressError as
    ``FrameTable.read`` / ``write`` give it).  ``pa + n`` must not wrap.
    """
    cdef char *ptrs[2]
    cdef Py_ssize_t first = <Py_ssize_t>PSV_PAGE_SIZE - <Py_ssize_t>(pa & PSV_PAGE_MASK)
    if first > n:
        first = n
    t.resolve_range(pa, n, ptrs)
    if write:
        memcpy(ptrs[0], buf, first)
        if first < n:
            memcpy(ptrs[1], buf + first, n - first)
    else:
        memcpy(buf, ptrs[0], first)
        if first < n:
            memcpy(buf + first, ptrs[1], n - first)
    return 0
