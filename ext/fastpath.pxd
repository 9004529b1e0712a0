# fastpath.pxd: typed fields of ShmRequests (logic in fastpath.pyx), the pool
# service's ALLOC and SHM_CLOSE of one CONTEXT connection.  Included last from
# _core.pxd (it names ArenaPages, IdTable, SmcDriver, SmcEntry, RangeAllocator
# and FrameTable).
#
# Concurrency: an object belongs to the daemon's loop thread; no locks.
from libc.stdint cimport int64_t, int32_t


cdef class ShmRequests:
    # What one connection's requests touch, bound at HELLO.  Invariants, while
    # the connection's context is open:
    #   shms is context.shms;  pages is context.arena.pages;  token_of is tokens.tokens
    #   pinned is conn.pinned;  alloc_sizes is conn.alloc_sizes;  registered is conn.registered
    #   smc is None  <=>  the driver has no scratch list page (no DYNAMIC_SHM)
    #   static is None  <=>  the dynamic pool serves allocations
    cdef object context
    cdef object system
    cdef dict shms
    cdef object pinned
    cdef dict alloc_sizes
    cdef dict registered
    cdef tuple alloc_fns
    cdef object tokens              # provider.SegmentTokens
    cdef dict token_of              # Storage -> token of the segments the client maps
    cdef object arena               # memory.Arena (growth, spare segments: Python)
    cdef ArenaPages pages
    cdef IdTable ids
    cdef object cookies             # the System's cookie iterator
    cdef object driver              # tee.driver.Driver
    cdef SmcDriver smc
    cdef SmcEntry entry             # the secure world's entry: its RPC memory table
    cdef RangeAllocator static
    cdef FrameTable table
    cdef object pools
    cdef object carveout            # the static pool's Storage (None: dynamic pool)
    cdef int32_t carveout_sid
    cdef int64_t static_base
    cdef bint dynamic_pool
    cdef int64_t max_shms
    cdef int64_t max_bytes          # 0: no byte quota
    cdef object flags_dynamic, flags_static, flags_priv   # ShmFlags of the constructors
    cdef int flags_dynamic_i, flags_static_i, flags_priv_i

    cdef int admit_bytes(self, object server, int64_t nbytes, object what) except -1
    cdef object take_dynamic(self, unsigned int kind, int64_t size)
    cdef object take_static(self, unsigned int kind, int64_t size)
    cdef int register_run(self, int64_t pa, int64_t npages, object cookie) except -1
    cdef bytes describe(self, object server, object conn, object shm)
    cdef bytes serve_alloc(self, object server, object conn, object body)
    cdef bytes serve_close(self, object server, object conn, object body)
