# slotserve.pxd: declarations for slotserve.pyx, the daemon's end of a shm slot
# request (serve_slot, ring_doorbell, ready_slots, serve_ready).  Included after fastpath.pxd
# (it calls ShmRequests' typed entries) and clientwire.pxd (it uses cw_load /
# cw_store / cw_fence on the slot's words).
#
# Layout (poolsvc/service/slot.py, checked against it when the first request
# is served): byte offsets of the words and areas of a slot mapping.
#
# Concurrency: the daemon's loop thread only; the slot's words are shared with
# the client process and are read and written only through cw_load / cw_store.

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)

cdef enum:
    SS_HEADER_SIZE = 8
    SS_REQ_SEQ = 8 * 8              # W_REQ_SEQ, W_REQ_LEN, W_CLIENT_SLEEPING (client line)
    SS_REQ_LEN = 9 * 8
    SS_CLIENT_SLEEPING = 10 * 8
    SS_REP_SEQ = 16 * 8             # W_REP_SEQ, W_REP_LEN (daemon line)
    SS_REP_LEN = 17 * 8
    SS_REQ_OFF = 4096               # SLOT_REQ_OFF, SLOT_REQ_CAP
    SS_REQ_CAP = 32 << 10
    SS_REP_OFF = SS_REQ_OFF + SS_REQ_CAP
    SS_REP_CAP = 64 << 10
    SS_SLOT_BYTES = SS_REP_OFF + SS_REP_CAP
    SS_READY = 2                    # connection.READY
    SS_OK = 3                       # MsgType.OK, ERROR, PING, BATCH, ALLOC, SHM_CLOSE
    SS_ERROR = 4
    SS_PING = 8
    SS_ALLOC = 16
    SS_SHM_CLOSE = 18
    SS_OWN_NONE = 0                 # what serves a frame (_ss_owner)
    SS_OWN_PING = 1
    SS_OWN_ALLOC = 2
    SS_OWN_CLOSE = 3

# Offsets of the Connection slots the kernel reads and writes (fastpath.pxd's fp_load / fp_store).
ctypedef struct ss_conn_slots:
    Py_ssize_t state, batch, words, slot, seq, out_bytes, out, handlers, shm_requests, requests, fileno
    Py_ssize_t served_at
