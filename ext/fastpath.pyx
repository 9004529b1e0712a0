# fastpath.pyx: the pool service's ALLOC and SHM_CLOSE requests of one CONTEXT
# connection, served end to end without a Python frame in their common cases.
#
#   ShmRequests      one per CONTEXT connection (made at HELLO): the per-client
#                    admission checks of a new shm (max_shms_per_client,
#                    max_bytes_per_client with the RPC-share rule), ALLOC
#                    (dynamic pool: ArenaPages.take + REGISTER_SHM through the
#                    SmcDriver; static pool: RangeAllocator + arena pages lent
#                    to the carve-out frames), the id (IdTable), the Shm, the
#                    daemon's accounting and the DESC reply; SHM_CLOSE (release
#                    of a pool shm, accounting, CLOSED reply)
#   serve_alloc      the daemon's ALLOC and SHM_CLOSE handlers
#   serve_shm_close  (Handlers._op_alloc / _op_shm_close)
#
# What is served here, field by field, is what the Python layers do
# (poolsvc/context.py Context._alloc/_adopt, poolsvc/pools.py, poolsvc/shm.py,
# poolsvc/system.py System.release, poolsvc/service/provider.py describe,
# poolsvc/service/handlers.py): the same objects are made, the same tables
# and counters change, in the same order.  The rare paths call those Python
# layers: a size the API refuses or a closed context (Context.alloc_*_buf
# raises), arena growth (Arena.take / Arena.alloc), a spare segment to drop
# (Arena.drop_spare), a segment the client has not mapped yet (its descriptor
# is sent: Handlers._describe), a registration of more than one list page or
# without DYNAMIC_SHM (Driver.register_run), a refused UNREGISTER_SHM (logged
# by System.unregister_failed), and on SHM_CLOSE any shm but an unshared,
# unviewed pool buffer (Handlers._close_shm), as well as the error messages of
# quota refusals (Handlers._over_quota) and the RPC share (Handlers._rpc_over_limit).
#
# Errors: every check comes before the first change, and a failure after one
# undoes it (as Context._adopt and Pools do), so a refused request leaves the
# System as it was.
#
# Concurrency: the daemon's loop thread only; the GIL is held throughout.
# The plain-Python twin, same replies, errors and state, is poolsvc/_pure/fastpath.py.
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.long cimport PyLong_FromUnsignedLongLong, PyLong_FromLongLong
from cpython.dict cimport PyDict_GetItem, PyDict_DelItem, PyDict_SetItem
from cpython.ref cimport Py_DECREF
from libc.string cimport memcpy, memset

import struct as _struct

cdef object _fp_unpack_alloc = _struct.Struct("<Iq").unpack
cdef object _fp_unpack_cookie = _struct.Struct("<Q").unpack

cdef enum:
    FP_ALLOC_SIZE = 12              # ALLOC body: kind u32, size i64
    FP_COOKIE_SIZE = 8              # SHM_CLOSE body: cookie u64
    FP_DESC_SIZE = 72               # DESC "<QqQQQQQIIIHBB" (docs/protocol.md)
    FP_KIND_USER = 0
    FP_KIND_PRIV = 2
    FP_PRIV_ALIGN = 16              # alloc_priv_buf's alignment (poolsvc/context.py PRIV_ALIGN)
    FP_BACKING_ARENA = 0            # protocol.Backing
    FP_BACKING_STATIC = 1
    FP_BITS_CONTIGUOUS = 1          # protocol.DescBits
    FP_BITS_REGISTERED = 2

# Bound by _fp_bind() on the first ShmRequests (they live in modules that import this one).
cdef object _fp_shm_type = None         # poolsvc.shm.Shm
cdef object _fp_static_run = None       # poolsvc.shm.StaticRun
cdef object _fp_static_backing = None   # poolsvc.shm.StaticBacking
cdef object _fp_check_ret = None        # poolsvc.tee.driver.check_ret
cdef object _fp_tee_error = None        # poolsvc.errors.TeeError
cdef object _fp_limit_error = None      # poolsvc.service.protocol.LimitExceeded
cdef object _fp_kinds_text = None       # "0 (USER), 1 (KERNEL), 2 (PRIV)"
cdef fp_shm_slots _fp_slots
cdef object _fp_closed_freed = PyBytes_FromStringAndSize(b"\x01\0\0\0\0\0\0\0", 8)
cdef object _fp_no_id = -1
cdef object _fp_one = 1
cdef object _fp_zero = 0
cdef object _fp_views_none = ()

cdef object _fp_member_descriptor = None   # types.MemberDescriptorType

cdef enum:
    FP_T_OBJECT_EX = 16             # PyMemberDef.type of a __slots__ entry


cdef Py_ssize_t _fp_slot(object cls, str name) except -1:
    """The offset of ``cls``'s object slot ``name`` (InternalError if it has none)."""
    global _fp_member_descriptor
    if _fp_member_descriptor is None:
        import types
        _fp_member_descriptor = types.MemberDescriptorType
    descr = getattr(cls, name, None)
    if type(descr) is not _fp_member_descriptor or \
            (<PyMemberDescrObject *><PyObject *>descr).d_member.type != FP_T_OBJECT_EX:
        raise InternalError(f"{cls.__name__}.{name} is not a __slots__ attribute")
    return (<PyMemberDescrObject *><PyObject *>descr).d_member.offset


cdef int _fp_bind() except -1:
    global _fp_shm_type, _fp_static_run, _fp_static_backing, _fp_check_ret, _fp_tee_error
    global _fp_limit_error, _fp_kinds_text, _fp_member_descriptor
    if _fp_shm_type is not None:
        return 0
    from poolsvc.errors import TeeError
    from poolsvc.service.protocol import AllocKind, LimitExceeded
    from poolsvc.shm import Shm, StaticBacking, StaticRun
    from poolsvc.tee.driver import check_ret
    _fp_slots.context = _fp_slot(Shm, "context")
    _fp_slots.id = _fp_slot(Shm, "id")
    _fp_slots.size = _fp_slot(Shm, "size")
    _fp_slots.offset = _fp_slot(Shm, "offset")
    _fp_slots.flags = _fp_slot(Shm, "flags")
    _fp_slots.pages = _fp_slot(Shm, "_pages")
    _fp_slots.run = _fp_slot(Shm, "_run")
    _fp_slots.paddr = _fp_slot(Shm, "paddr")
    _fp_slots.cookie = _fp_slot(Shm, "cookie")
    _fp_slots.registered = _fp_slot(Shm, "registered")
    _fp_slots.refs = _fp_slot(Shm, "_refs")
    _fp_slots.backing = _fp_slot(Shm, "_backing")
    _fp_slots.views = _fp_slot(Shm, "_views")
    _fp_slots.run_pa = _fp_slot(StaticRun, "pa")
    _fp_slots.run_npages = _fp_slot(StaticRun, "npages")
    _fp_slots.run_segment = _fp_slot(StaticRun, "segment")
    _fp_slots.run_index = _fp_slot(StaticRun, "index")
    _fp_static_run = StaticRun
    _fp_static_backing = StaticBacking
    _fp_check_ret = check_ret
    _fp_tee_error = TeeError
    _fp_limit_error = LimitExceeded
    _fp_kinds_text = ", ".join([f"{k.value} ({k.name})" for k in AllocKind])
    _fp_shm_type = Shm
    return 0


cdef Py_ssize_t _fp_body(object body, char *out, Py_ssize_t want) except -1:
    """Copy a request body of exactly ``want`` bytes into ``out``; its length (the
    caller lets the struct module raise its error for a wrong one)."""
    cdef Py_buffer view
    cdef Py_ssize_t n
    if type(body) is bytes:
        n = PyBytes_GET_SIZE(body)
        if n == want:
            memcpy(out, PyBytes_AS_STRING(body), want)
        return n
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        if n == want:
            memcpy(out, view.buf, want)
    finally:
        PyBuffer_Release(&view)
    return n


cdef object _fp_new_shm(object context, object flags, object cookie, object backing, fp_desc *d):
    """``Shm.__init__`` of a contiguous buffer (``run`` given), by C-level slot stores."""
    cdef object shm = <object>PyType_GenericAlloc(<PyTypeObject *>_fp_shm_type, 0)
    Py_DECREF(shm)      # the allocation's own reference: the one ``shm`` holds stays
    fp_store(shm, _fp_slots.context, context)
    fp_store(shm, _fp_slots.id, _fp_no_id)
    fp_store(shm, _fp_slots.flags, flags)
    fp_store(shm, _fp_slots.size, PyLong_FromLongLong(d.size))
    fp_store(shm, _fp_slots.offset, PyLong_FromLongLong(d.offset))
    fp_store(shm, _fp_slots.cookie, cookie)
    fp_store(shm, _fp_slots.registered, False)
    fp_store(shm, _fp_slots.refs, _fp_one)
    fp_store(shm, _fp_slots.backing, backing)
    fp_store(shm, _fp_slots.views, _fp_views_none)
    fp_store(shm, _fp_slots.pages, None)
    fp_store(shm, _fp_slots.run, (PyLong_FromLongLong(d.first_pa), PyLong_FromLongLong(d.npages)))
    fp_store(shm, _fp_slots.paddr, PyLong_FromLongLong(d.first_pa + d.offset))
    return shm


cdef bytes _fp_desc_body(object cookie, const fp_desc *d, unsigned int token):
    """The DESC body of a contiguous buffer with no new segment (provider.describe's fast case)."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, FP_DESC_SIZE)
    cdef char *b = PyBytes_AS_STRING(out)
    psv_store_le64(b, <unsigned long long>cookie)
    psv_store_le64(b + 8, <unsigned long long>d.shm_id)
    psv_store_le64(b + 16, <unsigned long long>d.size)
    psv_store_le64(b + 24, <unsigned long long>d.first_pa)
    psv_store_le64(b + 32, <unsigned long long>(d.first_pa + d.offset))
    psv_store_le64(b + 40, <unsigned long long>d.seg_offset)
    psv_store_le64(b + 48, 0)
    psv_store_le32(b + 56, <unsigned int>d.offset)
    psv_store_le32(b + 60, <unsigned int>d.npages)
    psv_store_le32(b + 64, token)
    b[68] = <char>(d.flags & 0xFF)
    b[69] = <char>((d.flags >> 8) & 0xFF)
    b[70] = <char>d.backing
    b[71] = <char>d.bits
    return out


@cython.auto_pickle(False)
cdef class ShmRequests:
    """ALLOC and SHM_CLOSE of one CONTEXT connection of the pool service.

    ``ShmRequests(server, conn)`` once HELLO made ``conn``'s context, quota
    figures (``conn.pinned``), segment tokens and allocation constructors; it
    keeps those and the server's limits (``_max_shms``, ``_max_bytes``).
    Methods: ``alloc`` / ``close`` (a request body in, a reply body out, as
    the daemon's handlers) and ``admit`` (the checks of any new shm).
    """

    def __init__(self, server, conn):
        _fp_bind()
        system = server.system
        ctx = conn.context
        pools = system.pools
        driver = system.driver
        from poolsvc.context import POOL_DYNAMIC, POOL_PRIV, POOL_STATIC
        self.context = ctx
        self.system = system
        self.shms = ctx.shms
        self.pinned = conn.pinned
        self.alloc_sizes = conn.alloc_sizes
        self.registered = conn.registered
        self.alloc_fns = tuple(conn.alloc_fns)
        self.tokens = conn.tokens
        self.token_of = conn.tokens.tokens
        self.arena = ctx.arena
        self.pages = ctx.arena.pages
        self.ids = system.ids
        self.cookies = pools.cookies
        self.driver = driver
        self.smc = driver.smc if driver.list_scratch_page is not None else None
        self.entry = system.tee.entry
        self.pools = pools
        self.dynamic_pool = pools.dynamic_pool
        self.static = pools.static
        self.table = system.memory.table
        self.carveout = pools.carveout
        self.carveout_sid = pools.carveout_sid
        self.static_base = system.config.static_base
        self.max_shms = server._max_shms
        self.max_bytes = server._max_bytes
        self.flags_dynamic, self.flags_static, self.flags_priv = POOL_DYNAMIC, POOL_STATIC, POOL_PRIV
        self.flags_dynamic_i = int(POOL_DYNAMIC)
        self.flags_static_i = int(POOL_STATIC)
        self.flags_priv_i = int(POOL_PRIV)
        self.pool_bytes_slot = _fp_slot(type(conn), "pool_bytes")
        self.allocated_slot = _fp_slot(type(self.pinned), "allocated")
        self.registered_slot = _fp_slot(type(self.pinned), "registered")

    # -- admission -------------------------------------------------------------------

    def admit(self, server, nbytes, what):
        """Refuse one more shm of ``nbytes`` pinned bytes: LimitExceeded when the client
        holds ``max_shms_per_client`` shms, else ``server._over_quota(pinned, what,
        nbytes)`` raises when ``nbytes`` more take it over ``max_bytes_per_client``
        (its RPC memory counted when all live RPC memory could tip the check,
        ``server._rpc_over_limit``).  ``what`` names the request in that error."""
        self.admit_bytes(server, nbytes, what)

    cdef int admit_bytes(self, object server, int64_t nbytes, object what) except -1:
        cdef Py_ssize_t held = len(self.shms)
        cdef int64_t pinned_now
        cdef bint over
        if held >= self.max_shms:
            raise _fp_limit_error(f"client holds {held} shms, the daemon's limit (max_shms_per_client)")
        if self.max_bytes == 0:
            return 0
        pinned = self.pinned
        pinned_now = <int64_t><object>fp_load(pinned, self.allocated_slot) + \
            <int64_t><object>fp_load(pinned, self.registered_slot)
        over = nbytes > self.max_bytes - pinned_now
        if not over and self.entry.rpc_cookies:
            over = server._rpc_over_limit(pinned, pinned_now + nbytes)
        if over:
            server._over_quota(pinned, f"allocating {nbytes} bytes" if what is None else what, nbytes)
        return 0

    # -- ALLOC ------------------------------------------------------------------------

    def alloc(self, server, conn, body):
        """Serve ALLOC ``body`` (kind u32, size i64): the DESC reply body.

        Errors, in this order: struct.error (body length), BadParameters (kind),
        LimitExceeded (max_shms_per_client), the quota's LimitExceeded, then
        those of ``Context.alloc_*_buf``; nothing is kept when one is raised.
        """
        return self.serve_alloc(server, conn, body)

    cdef bytes serve_alloc(self, object server, object conn, object body):
        cdef char buf[FP_ALLOC_SIZE]
        memset(buf, 0, FP_ALLOC_SIZE)
        if _fp_body(body, buf, FP_ALLOC_SIZE) != FP_ALLOC_SIZE:
            _fp_unpack_alloc(body)      # raises struct.error
        return self.alloc_parsed(server, conn, psv_load_le32(buf), <int64_t>psv_load_le64(buf + 4))

    cdef bytes serve_alloc_at(self, object server, object conn, const char *body, Py_ssize_t n):
        """``serve_alloc`` of the body ``body[0:n]`` (run_batch's typed entry: no bytes made)."""
        if n != FP_ALLOC_SIZE:
            _fp_unpack_alloc(PyBytes_FromStringAndSize(body, n))     # raises struct.error
        return self.alloc_parsed(server, conn, psv_load_le32(body), <int64_t>psv_load_le64(body + 4))

    cdef bytes alloc_parsed(self, object server, object conn, unsigned int kind, int64_t size):
        """ALLOC of ``size`` bytes of ``kind``, its body decoded (``serve_alloc``'s checks on)."""
        cdef object shm, nbytes, cookie, backing, segment
        cdef fp_desc desc
        cdef PyObject *token
        cdef int64_t id_c
        if kind >= <unsigned int>len(self.alloc_fns):
            raise BadParameters(f"allocation kind {kind} is not one of {_fp_kinds_text}")
        self.admit_bytes(server, size, None)
        # An open context means an open System (System.closed: the System closes every
        # context first), so the context's flag is the one check (and no Python frame).
        if size <= 0 or self.context.closed or (not self.dynamic_pool and self.static is None):
            shm = self.alloc_fns[kind](size)    # raises as the API does (no pool: its assertion)
            self.account(conn, shm.cookie, shm.size)
            return server._describe(conn, shm, True)
        # Context._adopt: the id reserved first (idr_alloc with NULL, then idr_replace)
        id_c = self.ids.alloc_id(_IDT_RESERVED) if kind == FP_KIND_USER else -1
        try:
            if self.dynamic_pool:
                shm = self.take_dynamic(kind, size, &desc)
            else:
                shm = self.take_static(kind, size, &desc)
        except BaseException:
            if id_c > 0:
                self.ids.remove_id(id_c)
            raise
        cookie = <object>fp_load(shm, _fp_slots.cookie)
        if id_c > 0:
            desc.shm_id = id_c
            fp_store(shm, _fp_slots.id, PyLong_FromLongLong(id_c))
            self.ids.replace_id(id_c, shm)
        PyDict_SetItem(self.shms, cookie, shm)
        nbytes = <object>fp_load(shm, _fp_slots.size)
        self.account(conn, cookie, nbytes)
        backing = <object>fp_load(shm, _fp_slots.backing)
        if type(backing) is ArenaRun:
            segment = (<ArenaRun>backing).segment
        elif type(backing) is _fp_static_run:
            segment = <object>fp_load(backing, _fp_slots.run_segment)
        else:                   # the carve-out's own storage: nothing to map
            return _fp_desc_body(cookie, &desc, 0)
        token = PyDict_GetItem(self.token_of, segment.storage)
        if token == NULL:       # a segment the client has not mapped: its descriptor goes too
            return server._describe(conn, shm, True)
        return _fp_desc_body(cookie, &desc, <unsigned int><object>token)

    cdef int account(self, object conn, object cookie, object nbytes) except -1:
        """The daemon's accounting of a new allocation (``Handlers._close_shm`` undoes it)."""
        fp_store(conn, self.pool_bytes_slot, <object>fp_load(conn, self.pool_bytes_slot) + nbytes)
        fp_store(self.pinned, self.allocated_slot, <object>fp_load(self.pinned, self.allocated_slot) + nbytes)
        PyDict_SetItem(self.alloc_sizes, cookie, nbytes)
        return 0

    cdef object take_dynamic(self, unsigned int kind, int64_t size, fp_desc *desc):
        """Pools.alloc_dynamic: the run, the Shm, REGISTER_SHM unless PRIV (a failure
        gives the run back)."""
        cdef bint priv = kind == FP_KIND_PRIV
        cdef int64_t npages = (size + PSV_PAGE_MASK) >> PSV_PAGE_SHIFT
        cdef ArenaRun run
        found = self.pages.take_run(npages, PyLong_FromLongLong(npages))
        if found is None:       # no segment has room: the Arena grows (policy) and takes
            found = self.arena.take(npages)
        run = <ArenaRun?>found
        cookie = next(self.cookies)
        desc.shm_id = -1
        desc.size = npages << PSV_PAGE_SHIFT
        desc.first_pa = run.pa
        desc.offset = 0
        desc.seg_offset = run.index << PSV_PAGE_SHIFT
        desc.npages = npages
        desc.flags = self.flags_priv_i if priv else self.flags_dynamic_i
        desc.backing = FP_BACKING_ARENA
        desc.bits = FP_BITS_CONTIGUOUS
        shm = _fp_new_shm(self.context, self.flags_priv if priv else self.flags_dynamic, cookie, run, desc)
        if not priv:
            try:
                self.register_run(run.pa, npages, cookie)
            except BaseException:
                self.arena.give(run)
                raise
            fp_store(shm, _fp_slots.registered, True)
            desc.bits = FP_BITS_REGISTERED | FP_BITS_CONTIGUOUS
        return shm

    cdef int register_run(self, int64_t pa, int64_t npages, object cookie) except -1:
        """Driver.register_run of a contiguous run (size: its whole pages)."""
        cdef SmcDriver smc = self.smc
        cdef int64_t size = npages << PSV_PAGE_SHIFT
        cdef tuple answer
        if smc is None or npages > PL_ENTRIES:
            self.driver.register_run(pa, npages, size, cookie)
            return 0
        smc.check_list()
        answer = smc.register_entries(NULL, <uint64_t>pa, <Py_ssize_t>npages, 0, <uint64_t>size,
                                      <uint64_t>cookie)
        if answer[0] != 0:
            _fp_check_ret(SMC_CMD_REGISTER, answer[0], answer[1])
        self.driver.last_register_seconds = smc.elapsed
        return 0

    cdef object take_static(self, unsigned int kind, int64_t size, fp_desc *desc):
        """Pools.alloc_static (the Shm is never registered; a failure gives back what
        was taken)."""
        cdef bint priv = kind == FP_KIND_PRIV
        cdef RangeAllocator static = self.static
        cdef int64_t pa, length, offset, npages, index
        pa = static.take(size, FP_PRIV_ALIGN if priv else PSV_PAGE_SIZE, PyLong_FromLongLong(size),
                         FP_PRIV_ALIGN if priv else PSV_PAGE_SIZE)
        length = static.length_at(pa)
        desc.shm_id = -1
        desc.size = length
        desc.bits = FP_BITS_CONTIGUOUS
        if priv:    # a range of the carve-out's own storage (StaticBacking)
            offset = pa & PSV_PAGE_MASK
            npages = (offset + length + PSV_PAGE_MASK) >> PSV_PAGE_SHIFT
            backing = object.__new__(_fp_static_backing)
            backing.pa = pa
            backing.length = length
            backing.start = pa - self.static_base
            backing.carveout = self.carveout
            desc.first_pa = pa - offset
            desc.offset = offset
            desc.seg_offset = 0
            desc.npages = npages
            desc.flags = self.flags_priv_i
            desc.backing = FP_BACKING_STATIC
            shm = _fp_new_shm(self.context, self.flags_priv, next(self.cookies), backing, desc)
        else:       # arena pages lent to the carve-out frames (StaticRun)
            npages = length >> PSV_PAGE_SHIFT
            try:
                found = self.pages.alloc(npages)
                if found is None:
                    found = self.arena.alloc(npages)
            except BaseException:
                static.release(pa)
                raise
            seg, index = found
            if not ft_remap_run(self.table, <uint64_t>pa, npages, seg.sid, index):
                try:    # the calls themselves, for their errors
                    self.table.unmap_range(pa, npages)
                    try:
                        self.table.map_range(pa, npages, seg.sid, index)
                    except BaseException:
                        self.pools.take_back(pa, npages, False)
                        raise
                except BaseException:
                    self.arena.free(seg, index, npages)
                    static.release(pa)
                    raise
            backing = object.__new__(_fp_static_run)
            fp_store(backing, _fp_slots.run_pa, pa)
            fp_store(backing, _fp_slots.run_npages, npages)
            fp_store(backing, _fp_slots.run_segment, seg)
            fp_store(backing, _fp_slots.run_index, index)
            desc.first_pa = pa
            desc.offset = 0
            desc.seg_offset = index << PSV_PAGE_SHIFT
            desc.npages = npages
            desc.flags = self.flags_static_i
            desc.backing = FP_BACKING_ARENA
            shm = _fp_new_shm(self.context, self.flags_static, next(self.cookies), backing, desc)
        return shm

    # -- SHM_CLOSE ---------------------------------------------------------------------

    def close(self, server, conn, body):
        """Serve SHM_CLOSE ``body`` (cookie u64): the CLOSED reply body.

        Errors: struct.error (body length), ItemNotFound (no such cookie in the
        context), then those of ``Handlers._close_shm``.
        """
        return self.serve_close(server, conn, body)

    cdef bytes serve_close(self, object server, object conn, object body):
        cdef char buf[FP_COOKIE_SIZE]
        memset(buf, 0, FP_COOKIE_SIZE)
        if _fp_body(body, buf, FP_COOKIE_SIZE) != FP_COOKIE_SIZE:
            _fp_unpack_cookie(body)     # raises struct.error
        return self.close_parsed(server, conn, psv_load_le64(buf))

    cdef bytes serve_close_at(self, object server, object conn, const char *body, Py_ssize_t n):
        """``serve_close`` of the body ``body[0:n]`` (run_batch's typed entry: no bytes made)."""
        if n != FP_COOKIE_SIZE:
            _fp_unpack_cookie(PyBytes_FromStringAndSize(body, n))    # raises struct.error
        return self.close_parsed(server, conn, psv_load_le64(body))

    cdef bytes close_parsed(self, object server, object conn, uint64_t cookie_u64):
        """SHM_CLOSE of the cookie ``cookie_u64``, its body decoded (``serve_close``'s checks on)."""
        cdef PyObject *found
        cdef PyObject *views
        cdef object shm, backing, cookie, segment, nbytes
        cdef int64_t pa, npages
        cdef bytes reply
        cdef tuple answer
        cdef SmcDriver smc
        cdef bint dropped = False
        cdef int64_t id_c
        cookie = PyLong_FromUnsignedLongLong(cookie_u64)
        found = PyDict_GetItem(self.shms, cookie)
        if found == NULL:
            raise ItemNotFound(f"no shm with cookie {cookie:#x} in this client's context")
        shm = <object>found
        if type(shm) is not _fp_shm_type:
            return server._close_shm(conn, shm)
        views = fp_load(shm, _fp_slots.views)
        backing = <object>fp_load(shm, _fp_slots.backing)
        if <object>fp_load(shm, _fp_slots.refs) is not _fp_one or views == NULL or <object>views or \
                (type(backing) is not ArenaRun and type(backing) is not _fp_static_run) or \
                (self.registered and cookie in self.registered):
            # shared (shm_from_id), viewed, registered by the client, or a private static buffer
            return server._close_shm(conn, shm)
        # Shm.close: the last reference
        fp_store(shm, _fp_slots.refs, _fp_zero)
        PyDict_DelItem(self.shms, cookie)
        # System.release: unregister, memory back to the pool, the id
        if <object>fp_load(shm, _fp_slots.registered) is True:
            fp_store(shm, _fp_slots.registered, False)
            smc = self.smc
            if smc is None:
                try:
                    self.driver.unregister(cookie)
                except _fp_tee_error as exc:
                    self.system.unregister_failed(cookie, exc)
            else:
                answer = smc.unregister_cookie(<uint64_t>cookie)
                if answer[0] != 0:
                    try:
                        _fp_check_ret(SMC_CMD_UNREGISTER, answer[0], answer[1])
                    except _fp_tee_error as exc:
                        self.system.unregister_failed(cookie, exc)
        if type(backing) is ArenaRun:
            if self.pages.give_run(<ArenaRun>backing) > 1:   # its segment emptied, another is empty too
                self.arena.drop_spare()
                dropped = True
            segment = (<ArenaRun>backing).segment
        else:   # Pools.free_static of a StaticRun
            pa = <object>fp_load(backing, _fp_slots.run_pa)
            npages = <object>fp_load(backing, _fp_slots.run_npages)
            segment = <object>fp_load(backing, _fp_slots.run_segment)
            if not ft_remap_run(self.table, <uint64_t>pa, npages, self.carveout_sid,
                                (pa - self.static_base) >> PSV_PAGE_SHIFT):
                self.table.unmap_range(pa, npages)     # (raises what is wrong)
                self.table.map_range(pa, npages, self.carveout_sid, (pa - self.static_base) >> PSV_PAGE_SHIFT)
            if self.pages.free(segment, <object>fp_load(backing, _fp_slots.run_index), npages) > 1:
                self.arena.drop_spare()
                dropped = True
            self.static.release(pa)
        shm_id = <object>fp_load(shm, _fp_slots.id)
        if shm_id > 0:
            id_c = shm_id
            if self.ids.allocated(id_c):
                self.ids.remove_id(id_c)
            else:
                self.ids.remove(shm_id)     # raises ItemNotFound
        # the daemon's accounting (Handlers._close_shm)
        if self.alloc_sizes:
            nbytes = self.alloc_sizes.pop(cookie, _fp_zero)
            fp_store(conn, self.pool_bytes_slot, <object>fp_load(conn, self.pool_bytes_slot) - nbytes)
            fp_store(self.pinned, self.allocated_slot,
                     <object>fp_load(self.pinned, self.allocated_slot) - nbytes)
        if not dropped:     # the segment lives on (only drop_spare returns one to the OS)
            return _fp_closed_freed
        storage = segment.storage
        if storage.fd >= 0:
            return _fp_closed_freed
        reply = PyBytes_FromStringAndSize(NULL, 8)
        psv_store_le32(PyBytes_AS_STRING(reply), 1)
        psv_store_le32(PyBytes_AS_STRING(reply) + 4, <unsigned int>self.tokens.dropped(storage))
        return reply


def serve_alloc(server, conn, body):
    """The daemon's ALLOC handler: ``conn.shm_requests.alloc(server, conn, body)``."""
    return (<ShmRequests?>conn.shm_requests).serve_alloc(server, conn, body)


def serve_shm_close(server, conn, body):
    """The daemon's SHM_CLOSE handler: ``conn.shm_requests.close(server, conn, body)``."""
    return (<ShmRequests?>conn.shm_requests).serve_close(server, conn, body)
