# smc_driver.pxd: typed fields of SmcDriver (logic in smc_driver.pyx), the
# normal world's end of the message call.  Included after smc_entry.pxd (it
# calls an SmcEntry in C).
#
# Concurrency: an object belongs to one thread at a time (the System's); no locks.
from libc.stdint cimport uint64_t, int64_t, int32_t, uint32_t


cdef class SmcDriver:
    # The normal world's end: the message page at msg_pa (mapped in table) and,
    # when list_sid >= 0, the storage page (list_sid, list_index) that backs
    # the list frame of one-list-page registrations.  Invariants between calls:
    #   not busy (no list frame taken), the scratch page is all zero
    # During register* (busy): list_pa is a frame taken from ``frames`` (PA 0
    # is a frame like any other) and mapped to the scratch page; on every exit
    # it is zeroed, unmapped and freed.  __init__ is refused while busy.
    cdef FrameTable table
    cdef FrameAllocator frames
    cdef object smc                 # the secure world's entry: smc(msg_pa)
    cdef SmcEntry entry             # smc itself when it is an SmcEntry (called in C), else None
    cdef object msg_pa_obj          # msg_pa as the int passed to smc
    cdef uint64_t msg_pa
    cdef int32_t list_sid           # -1: no scratch page (register* refused)
    cdef int64_t list_index
    cdef uint64_t list_pa           # the list frame in flight (valid while busy)
    cdef bint busy                  # a register* is in flight (list_pa may be 0)
    cdef double elapsed             # seconds the last register* took

    cdef int post(self, uint32_t cmd, uint64_t attr, uint64_t a, uint64_t b,
                  uint64_t c) except -1
    cdef tuple answer(self)
    cdef int call_secure(self) except -1
    cdef int check_list(self) except -1
    cdef tuple unregister_cookie(self, uint64_t cookie)
    cdef tuple register_entries(self, const unsigned long long *entries, uint64_t run_pa,
                                Py_ssize_t n, uint64_t offset, uint64_t size, uint64_t cookie)
