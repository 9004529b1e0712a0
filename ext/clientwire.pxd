# clientwire.pxd: typed fields of ClientSlot and ClientWire (logic in
# clientwire.pyx), the client's end of one connection's request/reply path, and
# the libc and atomic declarations it uses.
#
# Concurrency: an object belongs to one thread of the process that opened the
# connection; no locks.  The slot's words are shared with the daemon: they are
# read and written only through cw_load / cw_store (single 8-byte accesses) and
# ordered by cw_fence (a full barrier).
from libc.stdint cimport uint64_t
from posix.uio cimport iovec


cdef extern from *:
    """
    #include <errno.h>
    #include <sched.h>
    #include <sys/socket.h>
    #include <unistd.h>
    static inline uint64_t cw_load(const uint64_t *word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }
    static inline void cw_store(uint64_t *word, uint64_t v) { __atomic_store_n(word, v, __ATOMIC_RELEASE); }
    static inline void cw_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    uint64_t cw_load(const uint64_t *word) nogil
    void cw_store(uint64_t *word, uint64_t v) nogil
    void cw_fence() nogil


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    enum: SOL_SOCKET
    enum: SCM_RIGHTS
    enum: MSG_DONTWAIT
    enum: MSG_NOSIGNAL
    enum: MSG_CMSG_CLOEXEC


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef class ClientWire


cdef class ClientSlot:
    # The client's end of one slot.  Invariants, while mapped (w != NULL):
    # seq == w[W_REQ_SEQ] (only this end writes it); w, req and rep point into
    # the mapping `view` holds (its length was checked against the layout of
    # slot.py at construction); closed: w == req == rep == NULL, view released.
    cdef readonly object mm             # the mmap (kept mapped by view while w != NULL)
    cdef readonly object words          # memoryview of the first page as u64 words
    cdef Py_buffer view
    cdef uint64_t *w
    cdef char *req
    cdef char *rep
    cdef readonly unsigned long long seq
    cdef public double max_spin         # longest polling window, seconds (0: never polls)
    cdef public double expect           # moving average of recent waits' polling, seconds (see YIELD_CHARGE)
    cdef public long long waits         # waits that did not find the reply at once
    cdef public long long slept         # waits that ended asleep
    cdef public long long probe_gap     # waits from one probe to the next: PROBE_EVERY << k, <= MAX_PROBE_GAP

    cdef int _check_mapped(self) except -1
    cdef unsigned long long _publish(self, const char *head, Py_ssize_t head_len,
                                     const char *data, Py_ssize_t n) except 0
    cdef double _spins(self, bint daemon_asleep) noexcept
    cdef int _wait(self, unsigned long long seq, ClientWire wire, object sleep,
                   bint daemon_asleep) except -1
    cdef int _set_sleeping(self, bint sleeping) except -1
    cdef unsigned long long _reply_length(self) except? 0xFFFFFFFFFFFFFFFE


cdef class ClientWire:
    # One connection's request path.  Invariants: 0 <= rstart <= rend <= rcap
    # (received bytes not yet framed: rbuf[rstart:rend]); 0 <= spos <= slen <=
    # the slot's reply capacity (slot reply frames not yet handed out:
    # sbuf[spos:slen]); fd == -1 once closed; len(pending) == requests sent or
    # queued whose replies are not read yet (beside the one call_frame waits for).
    cdef readonly bytearray outbox      # pipelined request frames not sent yet
    cdef readonly object pending        # deque of their reply callbacks, in order
    cdef readonly object fds            # deque of received descriptors (the channel's)
    cdef readonly ClientSlot slot       # None: socket transport
    cdef readonly int fd
    cdef readonly int bell              # eventfd doorbell (-1: DOORBELL frames)
    cdef readonly bint closed
    cdef bint receiving                 # a blocking recvmsg runs without the GIL
    cdef public object wait_limit       # seconds (None: no bound), for messages
    cdef public double spin             # socket polling window before sleeping, seconds
    cdef readonly object close_reply    # the reply callback of the latest post_close (None: none yet)
    cdef readonly object close_cookies  # the deque its cookies queue in: len(close_cookies) ==
                                        # entries of pending that are close_reply
    cdef object lost                    # lost(why, kind): closes the connection and raises
    cdef object timeout_error           # the `kind` of a wait that ran out
    cdef char *rbuf
    cdef Py_ssize_t rcap, rstart, rend
    cdef char *sbuf
    cdef Py_ssize_t slen, spos
    cdef char *control
    cdef size_t control_len

    cdef int _lose(self, str why, object kind) except -1
    cdef int _send(self, const char *data, Py_ssize_t n, object fds) except -1
    cdef int _ring(self) except -1
    cdef int _slot_exchange(self, const char *data, Py_ssize_t n) except -1
    cdef int _slot_sleep(self, unsigned long long seq) except -1
    cdef Py_ssize_t _recv(self, int flags) except -2
    cdef int _fill(self) except -1
    cdef int _next_frame(self, unsigned int *msg_type, const char **body, Py_ssize_t *length) except -1
    cdef tuple _read_frame(self)
    cdef int _closed_reply(self, object handler) except -1
    cdef int _answer_pending(self) except -1
