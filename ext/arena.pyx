# arena.pyx: the per-allocation work of a storage arena (poolsvc/memory.py's
# Arena), in one call each way.
#
#   ArenaPages  the storage pages of one owner's segments, with first-fit
#               runs over them, zeroing on free, and the dynamic pool's
#               all-or-nothing pair: take (frames + storage pages + frame
#               table mapping) and give (the reverse, zeroing the pages)
#   ArenaRun    what take hands out and give takes back
#
# Policy stays in Python (Arena): when to grow, how big a segment is, when an
# empty segment goes back to the OS.  Nothing here creates or maps storage;
# a segment's bytes are the buffer the caller attached to the FrameTable.
#
# Errors follow docs/core.md: every check comes before the first change, so
# a failing call leaves the arena, the frames and the table as they were.
# Where a check is one a FrameAllocator or FrameTable method makes, the error
# is raised by calling that method (which then refuses, changing nothing).
# Frames and mappings change only through the owners' inline helpers
# (framealloc.pxd: fa_*, frametable.pxd: ft_*); this file writes only the
# fields of its own types (arena.pxd).
#
# Concurrency: one thread at a time (the System's); the GIL is held
# throughout.  The plain-Python twin, same checks in the same order, is
# poolsvc/_pure/arena.py.
from libc.string cimport memchr, memset
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM
from cpython.bytearray cimport PyByteArray_AS_STRING


cdef class _ArenaSegment:
    """One segment of an ArenaPages (internal)."""

    def __cinit__(self, segment, int32_t sid, int64_t npages, owner):
        self.segment = segment
        self.sid = sid
        self.npages = npages
        self.fm = FreeMap(npages)
        self.taken = bytearray(npages)
        self.owner = owner


@cython.auto_pickle(False)
cdef class ArenaRun:
    """A run handed out by ``ArenaPages.take``: ``pa``, ``npages``, ``segment``, ``index``.

    Frames ``[pa, pa + npages*4096)`` are mapped to storage pages
    ``[index, index + npages)`` of ``segment``.  Read-only; give it back once.
    """

    def __init__(self):
        raise BadParameters("ArenaRun objects are made by ArenaPages.take")

    def __repr__(self):
        return (f"ArenaRun(pa={self.pa:#x}, npages={self.npages}, index={self.index}, "
                f"{'live' if self.live else 'given back'})")


@cython.auto_pickle(False)
cdef class ArenaPages:
    """Runs of storage pages over an owner's segments, first-fit.

    ``ArenaPages(table, frames)``: ``table`` the FrameTable the segments'
    storage is attached to (and that ``take`` maps frames in), ``frames`` the
    FrameAllocator ``take`` takes frames from; both of this backend, else
    BadParameters.
    """

    def __cinit__(self, table, frames):
        if not isinstance(table, FrameTable):
            raise BadParameters(f"table must be a FrameTable, got {type(table).__name__}")
        if not isinstance(frames, FrameAllocator):
            raise BadParameters(f"frames must be a FrameAllocator, got {type(frames).__name__}")
        self.table = <FrameTable>table
        self.frames = <FrameAllocator>frames
        self.segs = []
        self.pages_total_ = 0
        self.free_pages_ = 0
        self.nempty = 0

    # -- internal ------------------------------------------------------------

    cdef _ArenaSegment _find_segment(self, object segment):
        """The record of ``segment`` (by identity), or None."""
        cdef Py_ssize_t i
        cdef _ArenaSegment s
        for i in range(PyList_GET_SIZE(self.segs)):
            s = <_ArenaSegment>PyList_GET_ITEM(self.segs, i)
            if s.segment is segment:
                return s
        return None

    cdef _ArenaSegment _first_fit(self, int64_t n, int64_t *index):
        """The first segment with ``n`` free pages in a row, and where; or None."""
        cdef Py_ssize_t i
        cdef _ArenaSegment s
        cdef int64_t p
        for i in range(PyList_GET_SIZE(self.segs)):
            s = <_ArenaSegment>PyList_GET_ITEM(self.segs, i)
            if s.fm.nfree >= n:
                p = s.fm.find(n, 0)
                if p >= 0:
                    index[0] = p
                    return s
        return None

    cdef char *_storage_run(self, _ArenaSegment s, int64_t index, int64_t n) except NULL:
        """Address of storage pages ``[index, index + n)`` of ``s`` (AddressError if
        its storage is not attached or too short)."""
        cdef int32_t sid = s.sid
        cdef Py_ssize_t length = ft_storage_length(self.table, sid)
        if length < 0:
            raise AddressError(f"storage {sid} of the segment is not attached")
        if (index + n) * PSV_PAGE_SIZE > length:
            raise AddressError(f"storage {sid} holds {length} bytes; pages "
                               f"{index}..{index + n} need {(index + n) * PSV_PAGE_SIZE}")
        return ft_storage_page(self.table, sid, index)

    cdef Py_ssize_t _took(self, _ArenaSegment s, int64_t index, int64_t n) except -1:
        if s.fm.nfree == s.npages:
            self.nempty -= 1
        s.fm.set_range(index, n)
        self.free_pages_ -= n
        return 0

    cdef Py_ssize_t _freed(self, _ArenaSegment s, int64_t index, int64_t n) except -1:
        """Mark a run free; 0 if ``s`` still holds pages, else the empty-segment count."""
        s.fm.clear_range(index, n)
        self.free_pages_ += n
        if s.fm.nfree == s.npages:
            self.nempty += 1
            return self.nempty
        return 0

    # -- segments ------------------------------------------------------------

    def add(self, segment, storage_id, npages):
        """Append a segment of ``npages`` zeroed storage pages, attached as ``storage_id``.

        Params: ``segment`` any object (``alloc`` and ``take`` hand it back);
        ``0 <= storage_id < 65536`` attached to the table with at least
        ``npages * 4096`` bytes; ``1 <= npages <= 2**30``.
        Errors: BadParameters (the segment already here, ids, the storage
        already backing a segment here, counts, storage not attached or too
        short).
        """
        cdef int64_t n = 0, sid = 0
        cdef Py_ssize_t i, length
        cdef int rn = arg_i64(npages, &n, "npages")
        cdef int rs = arg_i64(storage_id, &sid, "storage_id")
        if self._find_segment(segment) is not None:
            raise BadParameters("the segment is already in this arena")
        if rs != ARG_FITS or sid < 0 or sid > FT_MAX_STORAGE_ID:
            raise BadParameters(f"storage id {storage_id} is not in 0..{FT_MAX_STORAGE_ID}")
        for i in range(PyList_GET_SIZE(self.segs)):
            # two segments on one storage would hand out the same bytes twice
            if (<_ArenaSegment>PyList_GET_ITEM(self.segs, i)).sid == sid:
                raise BadParameters(f"storage {sid} already backs a segment of this arena")
        if rn != ARG_FITS or n <= 0 or n > FM_MAX_BITS:
            raise BadParameters(f"npages must be in 1..{FM_MAX_BITS}, got {npages}")
        length = ft_storage_length(self.table, sid)
        if length < 0:
            raise BadParameters(f"storage {sid} is not attached to the frame table")
        if length < n * PSV_PAGE_SIZE:
            raise BadParameters(f"storage {sid} holds {length} bytes, "
                                f"fewer than {n} pages")
        self.segs.append(_ArenaSegment(segment, <int32_t>sid, n, self))
        self.pages_total_ += n
        self.free_pages_ += n
        self.nempty += 1

    def remove(self, segment):
        """Forget a segment, whatever it holds (its runs can no longer be given back).

        Errors: ItemNotFound (not in this arena).
        """
        cdef _ArenaSegment s = self._find_segment(segment)
        if s is None:
            raise ItemNotFound("the segment is not in this arena")
        self.segs.remove(s)
        s.owner = None
        self.pages_total_ -= s.npages
        self.free_pages_ -= s.fm.nfree
        if s.fm.nfree == s.npages:
            self.nempty -= 1

    def segments(self):
        """The segments, in search order."""
        return [(<_ArenaSegment>s).segment for s in self.segs]

    def used(self, segment):
        """Pages of ``segment`` handed out (ItemNotFound if not here)."""
        cdef _ArenaSegment s = self._find_segment(segment)
        if s is None:
            raise ItemNotFound("the segment is not in this arena")
        return s.npages - s.fm.nfree

    @property
    def pages_total(self):
        """Pages in all segments; ``free_pages + used_pages == pages_total``."""
        return self.pages_total_

    @property
    def free_pages(self):
        return self.free_pages_

    @property
    def used_pages(self):
        return self.pages_total_ - self.free_pages_

    @property
    def empty_segments(self):
        """Segments with no page handed out."""
        return self.nempty

    # -- storage pages only --------------------------------------------------

    def alloc(self, npages):
        """The first run of ``npages`` free pages, segment by segment, lowest index first.

        Returns ``(segment, index)``, or None when no segment has such a run
        (nothing changed).  Errors: BadParameters (``npages <= 0``, not an int).
        """
        cdef int64_t n = 0, index = 0
        cdef int r = arg_i64(npages, &n, "npages")
        cdef _ArenaSegment s
        if r == ARG_BELOW or (r == ARG_FITS and n <= 0):
            raise BadParameters(f"npages must be > 0, got {npages}")
        if r == ARG_ABOVE:
            return None
        s = self._first_fit(n, &index)
        if s is None:
            return None
        self._took(s, index, n)
        return (s.segment, index)

    def free(self, segment, index, npages):
        """Zero and free storage pages ``[index, index + npages)`` of ``segment``.

        Returns 0 if the segment still holds pages, else the number of empty
        segments now (>= 1).  Errors, in this order: ItemNotFound (segment not
        here); BadParameters (``npages <= 0``, not ints); AddressError (run
        outside the segment, storage not attached or too short); DoubleFree
        (a page of the run not handed out); BadParameters (a page of a live
        run of ``take``: its frames still map it, only ``give`` frees it).
        """
        cdef _ArenaSegment s = self._find_segment(segment)
        cdef int64_t i = 0, n = 0, q
        cdef int ri, rn
        cdef char *data
        cdef char *taken
        cdef const char *hit
        if s is None:
            raise ItemNotFound("the segment is not in this arena")
        ri = arg_i64(index, &i, "index")
        rn = arg_i64(npages, &n, "npages")
        if rn == ARG_BELOW or (rn == ARG_FITS and n <= 0):
            raise BadParameters(f"npages must be > 0, got {npages}")
        if ri != ARG_FITS or rn != ARG_FITS or i < 0 or n > s.npages or i > s.npages - n:
            raise AddressError(f"pages {index}..+{npages} are outside the segment's "
                               f"{s.npages} pages")
        data = self._storage_run(s, i, n)
        q = s.fm.first_free(i, n)
        if q >= 0:
            raise DoubleFree(f"storage page {q} of the segment is not in use")
        taken = PyByteArray_AS_STRING(s.taken)
        hit = <const char *>memchr(taken + i, 1, <size_t>n)
        if hit != NULL:
            raise BadParameters(f"storage page {hit - taken} of the segment belongs to a run of take "
                                "(its frames still map it): give the run back instead")
        memset(data, 0, <size_t>(n * PSV_PAGE_SIZE))
        return self._freed(s, i, n)

    # -- the dynamic pool: frames + storage pages + mapping ----------------------

    def take(self, npages):
        """``frames.alloc_contig(npages)``, storage pages by ``alloc``, and the
        frames mapped to those pages, all or nothing.

        Returns an ArenaRun, or None when no segment has a run of ``npages``
        free pages (nothing changed; grow and call again).  Errors: those of
        ``frames.alloc_contig`` (checked first: BadParameters, OutOfMemory) and
        of ``table.map_range``; nothing is taken when one is raised.
        """
        cdef int64_t n = 0
        if arg_i64(npages, &n, "npages") != ARG_FITS:
            self.frames.alloc_contig(npages)    # raises BadParameters or OutOfMemory
            raise InternalError(f"alloc_contig({npages}) should have failed")
        return self.take_run(n, npages)

    cdef object take_run(self, int64_t n, object npages):
        """``take`` of ``n`` pages (``npages``, the same count, names it in errors)."""
        cdef FrameAllocator frames = self.frames
        cdef FrameTable t = self.table
        cdef int64_t p, index = 0
        cdef uint64_t pa
        cdef Py_ssize_t slot
        cdef _ArenaSegment s
        cdef ArenaRun run
        p = fa_find_run(frames, n)
        if p < 0:
            frames.alloc_contig(npages)     # raises BadParameters or OutOfMemory
            raise InternalError(f"alloc_contig({npages}) should have failed")
        s = self._first_fit(n, &index)
        if s is None:
            return None
        pa = fa_pa(frames, p)
        slot = ft_run_slot(t, pa, n, False)
        if slot < 0:
            t.map_range(pa, n, s.sid, index)    # raises its error
            t.unmap_range(pa, n)
            raise InternalError(f"frames at {pa:#x} should not have been mappable")
        fa_take_run(frames, p, n)
        self._took(s, index, n)
        memset(PyByteArray_AS_STRING(s.taken) + index, 1, <size_t>n)
        ft_map_run(t, slot, n, s.sid, index)
        run = ArenaRun.__new__(ArenaRun)
        run.pa = <int64_t>pa
        run.npages = n
        run.segment = s.segment
        run.index = index
        run.seg = s
        run.live = True
        return run

    def give(self, run):
        """Undo ``take``: zero the storage pages, unmap the frames, free both.

        Returns as ``free``.  Errors, in this order: BadParameters (not an
        ArenaRun); DoubleFree (given back already); ItemNotFound (its segment
        was removed, or belongs to another arena); AddressError (storage not
        attached or too short; a frame not mapped, as ``table.unmap_range``);
        DoubleFree (a frame not in use, as ``frames.free_contig``).
        """
        if type(run) is not ArenaRun:
            raise BadParameters(f"run must be an ArenaRun, got {type(run).__name__}")
        return self.give_run(<ArenaRun>run)

    cdef Py_ssize_t give_run(self, ArenaRun r) except -1:
        """``give`` of an ArenaRun."""
        cdef _ArenaSegment s
        cdef FrameAllocator frames = self.frames
        cdef FrameTable t = self.table
        cdef int64_t n, i, q
        cdef uint64_t pa
        cdef Py_ssize_t slot
        cdef char *data
        if not r.live:
            raise DoubleFree(f"the run at {r.pa:#x} was given back already")
        s = r.seg
        if s.owner is not self:
            raise ItemNotFound("the run's segment is not in this arena")
        n = r.npages
        data = self._storage_run(s, r.index, n)
        q = s.fm.first_free(r.index, n)
        if q >= 0:
            raise DoubleFree(f"storage page {q} of the segment is not in use")
        pa = <uint64_t>r.pa
        slot = ft_run_slot(t, pa, n, True)
        if slot < 0:
            t.unmap_range(pa, n)                # raises its error
            raise InternalError(f"frames at {pa:#x} should not have been unmappable")
        i = fa_used_run(frames, pa, n)
        if i < 0:
            frames.free_contig(pa, n)           # raises its error
            raise InternalError(f"frames at {pa:#x} should not have been free")
        memset(data, 0, <size_t>(n * PSV_PAGE_SIZE))
        ft_unmap_run(t, slot, n)
        fa_give_run(frames, i, n)
        r.live = False
        memset(PyByteArray_AS_STRING(s.taken) + r.index, 0, <size_t>n)
        return self._freed(s, r.index, n)
