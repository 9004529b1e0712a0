# smc.pxd: typed fields of SmcDriver and SmcEntry (logic in smc.pyx), and the
# layout of the one-parameter ``struct optee_msg_arg`` they exchange.
#
# Message (little-endian, OP-TEE's ABI): u32 cmd, func, session, cancel_id,
# pad, ret, ret_origin, num_params (32 bytes), then one parameter: u64 attr,
# a, b, c (32 bytes).  ``ret`` is at byte 20, ``ret_origin`` at 24.
#
# Concurrency: an object belongs to one thread at a time (the System's); no locks.
from libc.stdint cimport uint64_t, int64_t, int32_t, uint32_t

cdef extern from *:
    """
    /* A u32 as little-endian bytes at an address of any alignment, and back. */
    static inline void psv_store_le32(char *dst, unsigned int v) {
    #if !PSV_LITTLE_ENDIAN
        v = __builtin_bswap32(v);
    #endif
        memcpy(dst, &v, 4);
    }

    static inline unsigned int psv_load_le32(const char *src) {
        unsigned int v;
        memcpy(&v, src, 4);
    #if !PSV_LITTLE_ENDIAN
        v = __builtin_bswap32(v);
    #endif
        return v;
    }

    /* Seconds of the monotonic clock (time.perf_counter's clock on Linux). */
    #include <time.h>
    static inline double psv_monotonic(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    """
    void psv_store_le32(char *dst, unsigned int v) noexcept nogil
    unsigned int psv_load_le32(const char *src) noexcept nogil
    double psv_monotonic() noexcept nogil

cdef enum:
    SMC_ARG1_SIZE = 64              # header (32) + one parameter (32)
    SMC_NUM_PARAMS_OFFSET = 28
    SMC_RET_OFFSET = 20             # ret, then ret_origin at 24
    SMC_PARAM_OFFSET = 32           # attr, a, b, c at 32, 40, 48, 56
    SMC_CMD_REGISTER = 4            # OPTEE_MSG_CMD_REGISTER_SHM
    SMC_CMD_UNREGISTER = 5          # OPTEE_MSG_CMD_UNREGISTER_SHM
    SMC_ATTR_REGISTER = 0x20A       # TMEM_OUTPUT | NONCONTIG
    SMC_ATTR_UNREGISTER = 0x5       # RMEM_INPUT
    SMC_CAP_DYNAMIC_SHM = 1 << 2
    SMC_ORIGIN_TEE = 3


cdef class RegisteredShm:
    # A shared-memory object the normal world registered (OP-TEE's mobj_reg_shm),
    # the value of the secure world's cookie table:
    #   size == len(pages) * 4096 - offset;  inflight == running calls' params using it
    # Plain public fields (a compiled struct, so that the entry builds one in C).
    cdef public object cookie, pages, offset, size, inflight


cdef class SmcEntry:
    # The secure world's end.  Messages are accepted where the secure world's
    # _read_arg accepts them: [dynamic_lo, dynamic_hi) page-aligned, or
    # [static_lo, static_hi) 8-byte aligned, the whole 64 bytes inside.
    # ranges[0:nranges]: the non-secure memory every list and entry page must
    # lie in (malloc'd once).  The fetched fields are the secure side's own
    # copy of the last message (fetched: not yet checked).
    cdef FrameTable table
    cdef pl_range *ranges
    cdef Py_ssize_t nranges
    cdef uint64_t static_lo, static_hi, dynamic_lo, dynamic_hi
    cdef bint fetched
    cdef uint32_t cmd
    cdef uint64_t attr, a, b, c
    # The secure world's state that __call__ (call_with_arg) updates, set by bind():
    # the cookie tables (shms: cookie -> RegisteredShm; rpc_cookies: cookies of RPC
    # memory), the generic path for every other message, and the stats object whose
    # ``errors`` dict counts refusals.  None until bound (__call__: InternalError).
    cdef dict shms
    cdef dict rpc_cookies
    cdef object generic
    cdef object stats
    cdef object rpc_port            # the RPC server or None: its call_done after each call
    cdef object caps_obj            # the capability bits as set; dynamic_shm = caps & DYNAMIC_SHM
    cdef bint dynamic_shm
    cdef int64_t ncalls             # messages __call__ took (fast path) or counted for others

    cdef int take(self, uint32_t cmd) except -1
    cdef int fetch(self, object arg_pa, unsigned long long *pa) except -2
    cdef RegisteredShm check_register(self, bint dynamic_shm, dict registered, dict rpc_shms)
    cdef object check_unregister(self, dict registered)
    cdef int serve(self, object arg_pa) except -1


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
    cdef tuple register_entries(self, const unsigned long long *entries, uint64_t run_pa,
                                Py_ssize_t n, uint64_t offset, uint64_t size, uint64_t cookie)
