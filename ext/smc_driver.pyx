# smc_driver.pyx: the normal world's end of the one-parameter message call
# (OP-TEE's OPTEE_SMC_CALL_WITH_ARG) for the driver's hot path, REGISTER_SHM
# and UNREGISTER_SHM: SmcDriver, Linux's optee driver.  It writes the message
# (layout: smc.pxd) into the message page through the FrameTable, builds a
# page list of up to 511 pages in a fresh list frame backed by a scratch
# storage page, calls the secure world (an SmcEntry directly in C, smc_entry.pyx),
# reads ret/ret_origin back, and zeroes, unmaps and frees the list frame on
# every path.  The list frame is taken and mapped through the owners' inline
# helpers (framealloc.pxd: fa_*, frametable.pxd: ft_*).  Fields and invariants:
# smc_driver.pxd.
#
# Policy stays in Python (poolsvc/system.py): every other message.
#
# Errors follow docs/core.md: arguments are checked before anything changes.
# SmcDriver raises only for bad arguments and for what the pool, the frame
# table or the secure world itself raise.
#
# Concurrency: one thread at a time (the System's); the GIL is held
# throughout.  SmcDriver calls back into Python (the secure world) with a
# list frame taken: a nested register* meanwhile is refused with Busy.
# The plain-Python twin, same checks in the same order, is poolsvc/_pure/smc.py.
from libc.string cimport memset
from cpython.long cimport PyLong_FromUnsignedLongLong

from poolsvc.errors import Busy


cdef int _take_list_frame(FrameAllocator frames, uint64_t *pa) except -1:
    """``frames.alloc_contig(1)``: the lowest free frame, taken."""
    cdef int64_t p = fa_find_run(frames, 1)
    if p < 0:
        pa[0] = frames.alloc_contig(1)      # raises the allocator's OutOfMemory
        return 0
    fa_take_run(frames, p, 1)
    pa[0] = fa_pa(frames, p)
    return 0


cdef int _give_list_frame(FrameAllocator frames, uint64_t pa) except -1:
    """``frames.free_contig(pa, 1)``."""
    cdef int64_t i = fa_used_run(frames, pa, 1)
    if i < 0:
        frames.free_contig(pa, 1)           # raises its error
        return 0
    fa_give_run(frames, i, 1)
    return 0


cdef int _map_list_frame(FrameTable table, uint64_t pa, int32_t sid, int64_t index) except -1:
    """``table.map_range(pa, 1, sid, index)`` (sid and index valid)."""
    cdef Py_ssize_t slot = ft_run_slot(table, pa, 1, False)
    if slot < 0:
        table.map_range(pa, 1, sid, index)  # raises its error
        return 0
    ft_map_run(table, slot, 1, sid, index)
    return 0


cdef int _unmap_list_frame(FrameTable table, uint64_t pa) except -1:
    """``table.unmap_range(pa, 1)``."""
    cdef Py_ssize_t slot = ft_run_slot(table, pa, 1, True)
    if slot < 0:
        table.unmap_range(pa, 1)            # raises its error
        return 0
    ft_unmap_run(table, slot, 1)
    return 0


cdef class SmcDriver:
    """The driver's end of the message call: one-parameter messages and one-list-page
    registrations, written through the frame table.

    ``SmcDriver(table, frames, msg_pa, smc, list_sid=-1, list_index=0)``:
    ``table`` the FrameTable in which ``msg_pa`` (the message page's PA,
    8-byte aligned, its 64 bytes inside one region) is mapped; ``frames`` the
    FrameAllocator list frames come from; ``smc(msg_pa)`` the secure world's
    entry; ``(list_sid, list_index)`` the storage page a list frame is mapped
    onto for the call (-1: none, ``register*`` refused).  The scratch page
    must be all zero, and stays so between calls.
    Errors: BadParameters (wrong types, bad address or ids).
    """

    def __init__(self, table, frames, msg_pa, smc, list_sid=-1, list_index=0):
        cdef long long sid = 0, index = 0
        cdef unsigned long long pa = 0
        if self.busy:
            # the registration in flight must clean up in its own table and allocator
            raise Busy(f"a registration is in flight (list frame {self.list_pa:#x})")
        if not isinstance(table, FrameTable):
            raise BadParameters(f"table must be a FrameTable, not {type(table).__name__}")
        if not isinstance(frames, FrameAllocator):
            raise BadParameters(f"frames must be a FrameAllocator, not {type(frames).__name__}")
        if not callable(smc):
            raise BadParameters(f"smc must be callable, not {type(smc).__name__}")
        if try_u64(msg_pa, &pa) != 1 or pa & 7 or pa > PSV_U64_MAX - SMC_ARG1_SIZE:
            raise BadParameters(f"msg_pa {msg_pa!r} is not an 8-byte aligned address")
        if (try_in_range(list_sid, -1, FT_MAX_STORAGE_ID, &sid) != 1
                or try_in_range(list_index, 0, PSV_FT_MAX_PAGE_INDEX - 1, &index) != 1):
            raise BadParameters(f"list page ({list_sid!r}, {list_index!r}) is not a storage "
                                f"id in -1..{FT_MAX_STORAGE_ID} and a page index")
        self.table = <FrameTable>table
        self.frames = <FrameAllocator>frames
        self.smc = smc
        # the secure world's compiled entry is called in C (same call, no Python frame)
        self.entry = <SmcEntry>smc if type(smc) is SmcEntry else None
        self.msg_pa = pa
        self.msg_pa_obj = PyLong_FromUnsignedLongLong(pa)
        self.list_sid = <int32_t>sid
        self.list_index = index
        self.list_pa = 0
        self.elapsed = 0.0

    @property
    def msg_pa(self):
        """The message page's physical address."""
        return self.msg_pa_obj

    @property
    def has_list_page(self):
        """True if one-list-page registrations (``register``, ``register_run``) are possible."""
        return self.list_sid >= 0

    cdef int post(self, uint32_t cmd, uint64_t attr, uint64_t a, uint64_t b,
                  uint64_t c) except -1:
        """Write the one-parameter message (ret, ret_origin 0) at msg_pa."""
        cdef char msg[SMC_ARG1_SIZE]
        if self.table is None:      # made by __new__ alone: no table to write through
            raise InternalError("SmcDriver is not initialised")
        memset(msg, 0, SMC_ARG1_SIZE)
        psv_store_le32(msg, cmd)
        psv_store_le32(msg + SMC_NUM_PARAMS_OFFSET, 1)
        psv_store_le64(msg + SMC_PARAM_OFFSET, attr)
        psv_store_le64(msg + SMC_PARAM_OFFSET + 8, a)
        psv_store_le64(msg + SMC_PARAM_OFFSET + 16, b)
        psv_store_le64(msg + SMC_PARAM_OFFSET + 24, c)
        ft_copy_small(self.table, self.msg_pa, msg, SMC_ARG1_SIZE, True)
        return 0

    cdef tuple answer(self):
        """``(ret, ret_origin)`` read back from the message."""
        cdef char pair[8]
        ft_copy_small(self.table, self.msg_pa + SMC_RET_OFFSET, pair, 8, False)
        return (psv_load_le32(pair), psv_load_le32(pair + 4))

    cdef int call_secure(self) except -1:
        """``smc(msg_pa)``; an SmcEntry is served without the Python call protocol."""
        if self.entry is not None:
            self.entry.serve(self.msg_pa_obj)
        else:
            self.smc(self.msg_pa_obj)
        return 0

    def call1(self, cmd, attr, a, b, c):
        """Send a one-parameter message: write it, call the secure world, read the answer.

        Params: ``cmd`` a u32; ``attr``, ``a``, ``b``, ``c`` u64 (the parameter).
        Returns ``(ret, ret_origin)``.
        Errors: BadParameters (a field out of range); AddressError (the message
        page unmapped); whatever the secure world raises.
        """
        cdef unsigned long long v = 0
        if try_u64(cmd, &v) != 1 or v > 0xFFFFFFFF:
            raise BadParameters(f"cmd {cmd!r} is not a u32")
        self.post(<uint32_t>v, arg_u64(attr, "attr"), arg_u64(a, "a"), arg_u64(b, "b"),
                  arg_u64(c, "c"))
        self.call_secure()
        return self.answer()

    def unregister(self, cookie):
        """UNREGISTER_SHM of ``cookie`` (a u64): ``call1(5, RMEM_INPUT, 0, 0, cookie)``.

        Returns ``(ret, ret_origin)``; errors as ``call1``.
        """
        return self.unregister_cookie(arg_u64(cookie, "cookie"))

    cdef tuple unregister_cookie(self, uint64_t cookie):
        """``unregister`` of a u64 cookie."""
        self.post(SMC_CMD_UNREGISTER, SMC_ATTR_UNREGISTER, 0, 0, cookie)
        self.call_secure()
        return self.answer()

    @property
    def last_seconds(self):
        """Seconds the last ``register`` / ``register_run`` took, from taking the list
        frame to giving it back (the secure world's work included); 0.0 before any."""
        return self.elapsed

    cdef int check_list(self) except -1:
        if self.table is None:      # made by __new__ alone: no table, no frames
            raise InternalError("SmcDriver is not initialised")
        if self.list_sid < 0:
            raise BadParameters("no scratch list page: a page list needs kernel pages")
        if self.busy:
            raise Busy(f"a registration is in flight (list frame {self.list_pa:#x})")
        return 0

    def register(self, pages, offset, size, cookie):
        """REGISTER_SHM of a buffer of at most 511 pages: its list in one fresh list frame.

        Params: ``pages`` the PAs of the buffer's pages (1-D, 1..511 entries,
        page-aligned); ``offset`` (0..4095) of its first byte in ``pages[0]``;
        ``size`` and ``cookie`` u64.
        Returns ``(ret, ret_origin)`` of the secure world's answer.
        Errors, before anything changes: BadParameters (no scratch page,
        page count, offset, size, cookie), Busy (a registration in flight),
        AlignmentError (an entry, naming index and value); then the
        allocator's OutOfMemory; then whatever the secure world raises (the
        list frame is zeroed, unmapped and freed on every path).
        """
        cdef cnp.ndarray arr
        cdef const unsigned long long *pa
        cdef Py_ssize_t n, bad
        cdef long long off = 0
        cdef uint64_t sz, ck
        self.check_list()
        arr = as_page_array(pages, "pages")
        pa = <const unsigned long long *>cnp.PyArray_DATA(arr)
        n = cnp.PyArray_DIM(arr, 0)
        if n == 0 or n > PL_ENTRIES:
            raise BadParameters(f"{n} pages: one list page holds 1..{PL_ENTRIES}")
        if try_in_range(offset, 0, PSV_PAGE_MASK, &off) != 1:
            raise BadParameters(f"offset {offset!r} is not in 0..4095")
        sz = arg_u64(size, "size")
        ck = arg_u64(cookie, "cookie")
        if psv_or_reduce(pa, n) & PSV_PAGE_MASK:
            bad = _first_misaligned(pa, n)
            raise AlignmentError(f"page-list entry {bad} is {pa[bad]:#x}, not 4 KiB-aligned")
        return self.register_entries(pa, 0, n, <uint64_t>off, sz, ck)

    def register_run(self, pa, npages, offset, size, cookie):
        """``register`` of the physically contiguous pages ``pa``, ``pa + 4096``, ...

        Params: ``pa`` page-aligned, ``npages`` 1..511, the rest as ``register``.
        Returns and errors as ``register`` (BadParameters for a run that
        passes 2**64, AlignmentError for a misaligned ``pa``).
        """
        cdef long long n = 0, off = 0
        cdef uint64_t first, sz, ck
        self.check_list()
        if try_in_range(npages, 1, PL_ENTRIES, &n) != 1:
            raise BadParameters(f"{npages!r} pages: one list page holds 1..{PL_ENTRIES}")
        if try_in_range(offset, 0, PSV_PAGE_MASK, &off) != 1:
            raise BadParameters(f"offset {offset!r} is not in 0..4095")
        sz = arg_u64(size, "size")
        ck = arg_u64(cookie, "cookie")
        first = arg_u64(pa, "pa")
        if first & PSV_PAGE_MASK:
            raise AlignmentError(f"page-list entry 0 is {first:#x}, not 4 KiB-aligned")
        if first > PSV_U64_MAX - (<uint64_t>n << PSV_PAGE_SHIFT) + 1:
            raise BadParameters(f"{n} pages at {first:#x} run past 2**64")
        return self.register_entries(NULL, first, <Py_ssize_t>n, <uint64_t>off, sz, ck)

    cdef tuple register_entries(self, const unsigned long long *entries, uint64_t run_pa, Py_ssize_t n,
                                uint64_t offset, uint64_t size, uint64_t cookie):
        """The list of ``entries[0:n]`` (NULL: ``run_pa + 4096*i``) in a fresh
        list frame, REGISTER_SHM, then the frame zeroed, unmapped and freed."""
        cdef uint64_t list_pa = 0
        cdef char *dst
        cdef Py_ssize_t i
        cdef tuple result
        cdef double t0 = psv_monotonic()
        _take_list_frame(self.frames, &list_pa)
        try:
            _map_list_frame(self.table, list_pa, self.list_sid, self.list_index)
            self.list_pa = list_pa
            self.busy = True
            try:
                dst = self.table.frame_bytes(list_pa, PSV_PAGE_SIZE)
                if entries != NULL:
                    psv_store_le64_array(dst, entries, n)
                else:
                    for i in range(n):
                        psv_store_le64(dst + 8 * i, run_pa + (<uint64_t>i << PSV_PAGE_SHIFT))
                psv_pl_close_page(dst, n, list_pa)    # as pagelist_build closes a page
                self.post(SMC_CMD_REGISTER, SMC_ATTR_REGISTER, list_pa | offset, size, cookie)
                self.call_secure()
                result = self.answer()
            finally:
                self.busy = False
                self.list_pa = 0
                try:
                    memset(self.table.frame_bytes(list_pa, PSV_PAGE_SIZE), 0, PSV_PAGE_SIZE)
                finally:
                    _unmap_list_frame(self.table, list_pa)
        finally:
            _give_list_frame(self.frames, list_pa)
        self.elapsed = psv_monotonic() - t0
        return result
