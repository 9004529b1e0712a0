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
from cpython.ref cimport PyObject
from libc.string cimport memcpy, memset

import struct as _struct

cdef object _fp_unpack_alloc = _struct.Struct("<Iq").unpack
cdef object _fp_unpack_cookie = _struct.Struct("<Q").unpack

cdef enum:
    FP_ALLOC_SIZE = 12              # ALLOC body: kind u32, size i64
    FP_COOKIE_SIZE = 8              # SHM_CLOSE body: cookie u64
    FP_DESC_SIZE = 72               # DESC "<QqQQQQQIIIHBB" (docs/protocol.md)
    FP_KINDS = 3                    # AllocKind: USER, KERNEL, PRIV
    FP_KIND_USER = 0
    FP_KIND_PRIV = 2
    FP_PRIV_ALIGN = 16              # alloc_priv_buf's alignment (poolsvc/context.py PRIV_ALIGN)
    FP_BACKING_ARENA = 0            # protocol.Backing
    FP_BACKING_STATIC = 1
    FP_BITS_CONTIGUOUS = 1          # protocol.DescBits
    FP_BITS_REGISTERED = 2
    FP_REGISTER_CMD = 3             # MsgCmd.REGISTER_SHM, UNREGISTER_SHM (check_ret's cmd)
    FP_UNREGISTER_CMD = 4

# Bound by _fp_bind() on the first ShmRequests (they live in modules that import this one).
cdef object _fp_shm_type = None         # poolsvc.shm.Shm
cdef object _fp_static_run = None       # poolsvc.shm.StaticRun
cdef object _fp_static_backing = None   # poolsvc.shm.StaticBacking
cdef object _fp_check_ret = None        # poolsvc.tee.driver.check_ret
cdef object _fp_tee_error = None        # poolsvc.errors.TeeError
cdef object _fp_limit_error = None      # poolsvc.service.protocol.LimitExceeded
cdef object _fp_kinds_text = None       # "0 (USER), 1 (KERNEL), 2 (PRIV)"
cdef object _fp_closed_kept = PyBytes_FromStringAndSize(b"\0\0\0\0\0\0\0\0", 8)
cdef object _fp_closed_freed = PyBytes_FromStringAndSize(b"\x01\0\0\0\0\0\0\0", 8)
cdef object _fp_no_id = -1
cdef object _fp_views_none = ()


cdef int _fp_bind() except -1:
    global _fp_shm_type, _fp_static_run, _fp_static_backing, _fp_check_ret, _fp_tee_error
    global _fp_limit_error, _fp_kinds_text
    if _fp_shm_type is not None:
        return 0
    from poolsvc.errors import TeeError
    from poolsvc.service.protocol import AllocKind, LimitExceeded
    from poolsvc.shm import Shm, StaticBacking, StaticRun
    from poolsvc.tee.driver import check_ret
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


cdef object _fp_new_shm(object context, object flags, int64_t size, int64_t offset, object cookie,
                        object backing, int64_t first_pa, int64_t npages):
    """``Shm.__init__`` of a contiguous buffer (``run`` given), by attribute stores."""
    cdef object shm = object.__new__(_fp_shm_type)
    shm.context = context
    shm.id = _fp_no_id
    shm.flags = flags
    shm.size = size
    shm.offset = offset
    shm.cookie = cookie
    shm.registered = False
    shm._refs = 1
    shm._backing = backing
    shm._views = _fp_views_none
    shm._pages = None
    shm._run = (first_pa, npages)
    shm.paddr = first_pa + offset
    return shm


cdef bytes _fp_desc(object cookie, object shm_id, int64_t size, int64_t first_pa, int64_t paddr,
                    int64_t seg_offset, int64_t offset, int64_t npages, unsigned int token,
                    int flags, int backing, int bits):
    """The DESC body of a contiguous buffer with no new segment (provider.describe's fast case)."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, FP_DESC_SIZE)
    cdef char *d = PyBytes_AS_STRING(out)
    psv_store_le64(d, <unsigned long long>cookie)
    psv_store_le64(d + 8, <unsigned long long><long long>shm_id)
    psv_store_le64(d + 16, <unsigned long long>size)
    psv_store_le64(d + 24, <unsigned long long>first_pa)
    psv_store_le64(d + 32, <unsigned long long>paddr)
    psv_store_le64(d + 40, <unsigned long long>seg_offset)
    psv_store_le64(d + 48, 0)
    psv_store_le32(d + 56, <unsigned int>offset)
    psv_store_le32(d + 60, <unsigned int>npages)
    psv_store_le32(d + 64, token)
    d[68] = <char>(flags & 0xFF)
    d[69] = <char>((flags >> 8) & 0xFF)
    d[70] = <char>backing
    d[71] = <char>bits
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
        self.entry = system.tee._entry
        self.pools = pools
        self.dynamic_pool = pools.dynamic_pool
        self.static = pools.static
        self.table = system.memory.table
        self.carveout = pools.carveout
        self.carveout_sid = pools._carveout_sid
        self.static_base = system.config.static_base
        self.max_shms = server._max_shms
        self.max_bytes = server._max_bytes
        self.flags_dynamic, self.flags_static, self.flags_priv = POOL_DYNAMIC, POOL_STATIC, POOL_PRIV
        self.flags_dynamic_i = int(POOL_DYNAMIC)
        self.flags_static_i = int(POOL_STATIC)
        self.flags_priv_i = int(POOL_PRIV)

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
        pinned_now = <int64_t>pinned.allocated + <int64_t>pinned.registered
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
        cdef unsigned int kind
        cdef int64_t size
        cdef object shm
        memset(buf, 0, FP_ALLOC_SIZE)
        if _fp_body(body, buf, FP_ALLOC_SIZE) != FP_ALLOC_SIZE:
            _fp_unpack_alloc(body)      # raises struct.error
        kind = psv_load_le32(buf)
        size = <int64_t>psv_load_le64(buf + 4)
        if kind >= <unsigned int>len(self.alloc_fns):
            raise BadParameters(f"allocation kind {kind} is not one of {_fp_kinds_text}")
        self.admit_bytes(server, size, None)
        if size <= 0 or self.context.closed or self.system._closed:
            shm = self.alloc_fns[kind](size)    # raises as the API does
        elif self.dynamic_pool:
            shm = self.take_dynamic(kind, size)
        else:
            shm = self.take_static(kind, size)
        nbytes = shm.size
        conn.pool_bytes += nbytes
        pinned = self.pinned
        pinned.allocated += nbytes
        self.alloc_sizes[shm.cookie] = nbytes
        return self.describe(server, conn, shm)

    cdef object take_dynamic(self, unsigned int kind, int64_t size):
        """Context._adopt of Pools.alloc_dynamic: id reserved first, run, Shm,
        REGISTER_SHM unless PRIV, then the id's object and the context's table."""
        cdef bint with_id = kind == FP_KIND_USER
        cdef bint priv = kind == FP_KIND_PRIV
        cdef int64_t npages = (size + PSV_PAGE_MASK) >> PSV_PAGE_SHIFT
        cdef object shm_id = self.ids.alloc(None) if with_id else _fp_no_id
        cdef ArenaRun run
        try:
            found = self.pages.take(npages)
            if found is None:       # no segment has room: the Arena grows (policy) and takes
                found = self.arena.take(npages)
            run = <ArenaRun?>found
            cookie = next(self.cookies)
            shm = _fp_new_shm(self.context, self.flags_priv if priv else self.flags_dynamic,
                              npages << PSV_PAGE_SHIFT, 0, cookie, run, run.pa, npages)
            if not priv:
                try:
                    self.register_run(run.pa, npages, cookie)
                except BaseException:
                    self.arena.give(run)
                    raise
                shm.registered = True
        except BaseException:
            if with_id:
                self.ids.remove(shm_id)
            raise
        if with_id:
            shm.id = shm_id
            self.ids.replace(shm_id, shm)
        PyDict_SetItem(self.shms, cookie, shm)
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
            _fp_check_ret(FP_REGISTER_CMD, answer[0], answer[1])
        self.driver.last_register_seconds = smc.elapsed
        return 0

    cdef object take_static(self, unsigned int kind, int64_t size):
        """Context._adopt of Pools.alloc_static (the Shm is never registered)."""
        cdef bint with_id = kind == FP_KIND_USER
        cdef bint priv = kind == FP_KIND_PRIV
        cdef RangeAllocator static = self.static
        cdef object shm_id = self.ids.alloc(None) if with_id else _fp_no_id
        cdef int64_t pa, length, offset, npages
        try:
            pa = static.alloc(size, FP_PRIV_ALIGN if priv else PSV_PAGE_SIZE)
            length = static.allocation_at(pa)[1]
            if priv:
                offset = pa & PSV_PAGE_MASK
                npages = (offset + length + PSV_PAGE_MASK) >> PSV_PAGE_SHIFT
                backing = object.__new__(_fp_static_backing)
                backing.pa = pa
                backing.length = length
                backing.start = pa - self.static_base
                backing.carveout = self.carveout
                shm = _fp_new_shm(self.context, self.flags_priv, length, offset, next(self.cookies),
                                  backing, pa - offset, npages)
            else:
                npages = length >> PSV_PAGE_SHIFT
                try:
                    found = self.pages.alloc(npages)
                    if found is None:
                        found = self.arena.alloc(npages)
                except BaseException:
                    static.free(pa)
                    raise
                segment, index = found
                try:
                    self.table.unmap_range(pa, npages)
                    try:
                        self.table.map_range(pa, npages, segment.sid, index)
                    except BaseException:
                        self.pools._take_back(pa, npages, False)
                        raise
                except BaseException:
                    self.arena.free(segment, index, npages)
                    static.free(pa)
                    raise
                backing = object.__new__(_fp_static_run)
                backing.pa = pa
                backing.npages = npages
                backing.segment = segment
                backing.index = index
                shm = _fp_new_shm(self.context, self.flags_static, length, 0, next(self.cookies), backing,
                                  pa, npages)
        except BaseException:
            if with_id:
                self.ids.remove(shm_id)
            raise
        if with_id:
            shm.id = shm_id
            self.ids.replace(shm_id, shm)
        PyDict_SetItem(self.shms, shm.cookie, shm)
        return shm

    cdef bytes describe(self, object server, object conn, object shm):
        """The DESC body of a fresh pool shm: built here for a buffer in a segment the
        client maps (or in the carve-out), else by ``server._describe`` (which sends
        the segment's descriptor, or closes the shm when it fails)."""
        cdef object backing = shm._backing
        cdef object run = shm._run
        cdef int64_t offset = shm.offset
        cdef int flags = self.flags_priv_i
        cdef object token
        cdef PyObject *found
        flags_obj = shm.flags
        if flags_obj is self.flags_dynamic:
            flags = self.flags_dynamic_i
        elif flags_obj is self.flags_static:
            flags = self.flags_static_i
        elif flags_obj is not self.flags_priv:
            flags = int(flags_obj)
        if type(backing) is ArenaRun:
            segment = (<ArenaRun>backing).segment
            seg_offset = (<ArenaRun>backing).index * PSV_PAGE_SIZE + offset
        elif type(backing) is _fp_static_run:
            segment = backing.segment
            seg_offset = <int64_t>backing.index * PSV_PAGE_SIZE + offset
        else:
            return _fp_desc(shm.cookie, shm.id, shm.size, run[0], shm.paddr, 0, offset, run[1], 0,
                            flags, FP_BACKING_STATIC,
                            (FP_BITS_REGISTERED | FP_BITS_CONTIGUOUS) if shm.registered else FP_BITS_CONTIGUOUS)
        found = PyDict_GetItem(self.token_of, segment.storage)
        if found == NULL:
            return server._describe(conn, shm, True)
        token = <object>found
        return _fp_desc(shm.cookie, shm.id, shm.size, run[0], shm.paddr, seg_offset, offset, run[1],
                        token, flags, FP_BACKING_ARENA,
                        (FP_BITS_REGISTERED | FP_BITS_CONTIGUOUS) if shm.registered else FP_BITS_CONTIGUOUS)

    # -- SHM_CLOSE ---------------------------------------------------------------------

    def close(self, server, conn, body):
        """Serve SHM_CLOSE ``body`` (cookie u64): the CLOSED reply body.

        Errors: struct.error (body length), ItemNotFound (no such cookie in the
        context), then those of ``Handlers._close_shm``.
        """
        return self.serve_close(server, conn, body)

    cdef bytes serve_close(self, object server, object conn, object body):
        cdef char buf[FP_COOKIE_SIZE]
        cdef PyObject *found
        cdef object shm, backing, cookie
        cdef int64_t pa, npages
        cdef bytes reply
        cdef tuple answer
        cdef SmcDriver smc
        memset(buf, 0, FP_COOKIE_SIZE)
        if _fp_body(body, buf, FP_COOKIE_SIZE) != FP_COOKIE_SIZE:
            _fp_unpack_cookie(body)     # raises struct.error
        cookie = PyLong_FromUnsignedLongLong(psv_load_le64(buf))
        found = PyDict_GetItem(self.shms, cookie)
        if found == NULL:
            raise ItemNotFound(f"no shm with cookie {cookie:#x} in this client's context")
        shm = <object>found
        if type(shm) is not _fp_shm_type or shm._refs != 1 or shm._views or (
                self.registered and cookie in self.registered):
            return server._close_shm(conn, shm)
        backing = shm._backing
        if type(backing) is not ArenaRun and type(backing) is not _fp_static_run:
            return server._close_shm(conn, shm)
        # Shm.close: the last reference
        shm._refs = 0
        PyDict_DelItem(self.shms, cookie)
        # System.release: unregister, memory back to the pool, the id
        if shm.registered:
            shm.registered = False
            smc = self.smc
            if smc is None:
                try:
                    self.driver.unregister(cookie)
                except _fp_tee_error as exc:
                    self.system.unregister_failed(cookie, exc)
            else:
                answer = smc.unregister(cookie)
                if answer[0] != 0:
                    try:
                        _fp_check_ret(FP_UNREGISTER_CMD, answer[0], answer[1])
                    except _fp_tee_error as exc:
                        self.system.unregister_failed(cookie, exc)
        if type(backing) is ArenaRun:
            if self.pages.give(backing) > 1:   # its segment emptied, and another is empty too
                self.arena.drop_spare()
            segment = (<ArenaRun>backing).segment
        else:   # Pools.free_static of a StaticRun
            pa = backing.pa
            npages = backing.npages
            segment = backing.segment
            self.table.unmap_range(pa, npages)
            self.table.map_range(pa, npages, self.carveout_sid, (pa - self.static_base) >> PSV_PAGE_SHIFT)
            if self.pages.free(segment, backing.index, npages) > 1:
                self.arena.drop_spare()
            self.static.free(pa)
        shm_id = shm.id
        if shm_id > 0:
            self.ids.remove(shm_id)
        # the daemon's accounting (Handlers._close_shm)
        if self.alloc_sizes:
            nbytes = self.alloc_sizes.pop(cookie, 0)
            conn.pool_bytes -= nbytes
            pinned = self.pinned
            pinned.allocated -= nbytes
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
