# fastpath.pxd: typed fields of ShmRequests (logic in fastpath.pyx), the pool
# service's ALLOC and SHM_CLOSE of one CONTEXT connection.  Included last from
# _core.pxd (it names ArenaPages, IdTable, SmcDriver, SmcEntry, RangeAllocator
# and FrameTable).
#
# Concurrency: an object belongs to the daemon's loop thread; no locks.
from libc.stdint cimport int64_t, int32_t, uint64_t
from cpython.ref cimport PyObject, PyTypeObject, Py_INCREF, Py_XDECREF


cdef extern from "Python.h":
    # A __slots__ attribute's descriptor (CPython's member descriptor): where the
    # slot sits in the instance.  fastpath.pyx reads the offsets of the slots it
    # stores, once, and checks each is an object slot (T_OBJECT_EX).
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    PyObject *PyType_GenericAlloc(PyTypeObject *type, Py_ssize_t nitems) except NULL


# A slot of an instance by its offset: the C-level attribute store and load of
# an object whose type has that slot (the caller checked the type).
cdef inline void fp_store(object obj, Py_ssize_t offset, object value) noexcept:
    cdef PyObject **slot = <PyObject **>((<char *><PyObject *>obj) + offset)
    cdef PyObject *old = slot[0]
    Py_INCREF(value)
    slot[0] = <PyObject *>value
    Py_XDECREF(old)


cdef inline PyObject *fp_load(object obj, Py_ssize_t offset) noexcept:
    """The slot's object (borrowed), or NULL when unset."""
    return (<PyObject **>((<char *><PyObject *>obj) + offset))[0]


# Offsets of the slots of poolsvc.shm.Shm and StaticRun that the kernel writes and reads.
ctypedef struct fp_shm_slots:
    Py_ssize_t context, id, size, offset, flags, pages, run, paddr, cookie, registered, refs
    Py_ssize_t backing, views
    Py_ssize_t run_pa, run_npages, run_segment, run_index       # StaticRun


# What a DESC reply says of a buffer allocated here (contiguous, no page array).
ctypedef struct fp_desc:
    int64_t shm_id
    int64_t size
    int64_t first_pa
    int64_t offset                  # of the buffer in its first page
    int64_t seg_offset              # of the buffer in its storage segment
    int64_t npages
    int flags
    int backing                     # protocol.Backing
    int bits                        # protocol.DescBits


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
    cdef Py_ssize_t pool_bytes_slot     # Connection.pool_bytes
    cdef Py_ssize_t allocated_slot      # Pinned.allocated
    cdef Py_ssize_t registered_slot     # Pinned.registered

    cdef int admit_bytes(self, object server, int64_t nbytes, object what) except -1
    cdef object take_dynamic(self, unsigned int kind, int64_t size, fp_desc *desc)
    cdef object take_static(self, unsigned int kind, int64_t size, fp_desc *desc)
    cdef int register_run(self, int64_t pa, int64_t npages, object cookie) except -1
    cdef int account(self, object conn, object cookie, object nbytes) except -1
    cdef bytes serve_alloc(self, object server, object conn, object body)
    cdef bytes serve_alloc_at(self, object server, object conn, const char *body, Py_ssize_t n)
    cdef bytes alloc_parsed(self, object server, object conn, unsigned int kind, int64_t size)
    cdef bytes serve_close(self, object server, object conn, object body)
    cdef bytes serve_close_at(self, object server, object conn, const char *body, Py_ssize_t n)
    cdef bytes close_parsed(self, object server, object conn, uint64_t cookie)
