# smc_entry.pxd: typed fields of SmcEntry and RegisteredShm (logic in
# smc_entry.pyx), the secure world's end of the message call.
#
# Concurrency: an object belongs to one thread at a time (the System's); no locks.
from libc.stdint cimport uint64_t, int64_t, uint32_t


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
    # strict_mode: poolsvc's stricter rules (Config.strict; True at first).  Not strict,
    # the entry follows OP-TEE 4.0: a reused cookie shadows the older registration (kept
    # in shadow: cookie -> [older RegisteredShm, oldest first]), UNREGISTER_SHM's attr is
    # not looked at, size 0 at an offset is one page, ret_origin is left unwritten, and
    # without DYNAMIC_SHM the two commands go to the generic path (EBADCMD there).
    cdef bint strict_mode
    cdef dict shadow

    cdef int take(self, uint32_t cmd) except -1
    cdef int fetch(self, object arg_pa, unsigned long long *pa) except -2
    cdef RegisteredShm check_register(self, bint dynamic_shm, dict registered, dict rpc_shms)
    cdef object check_unregister(self, dict registered)
    cdef object serve(self, object arg_pa)
    cdef object peek_origin(self, unsigned long long pa)
