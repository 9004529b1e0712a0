# clientwire.pyx: the client's request/reply path of one connection to the pool
# service, both transports (docs/core.md "The client wire", docs/protocol.md "The
# shm slot").
#
# Owns: ClientSlot (the client's end of a shm slot: publish with a full fence,
# the daemon's "sleeping" word, the adaptive poll-then-sleep wait, the reply
# area read with its bounds check) and ClientWire (the outbox of pipelined
# frames and their reply callbacks, call_frame / drain, the doorbell, sendmsg
# with SCM_RIGHTS, recvmsg into one preallocated buffer with the descriptors
# queued, the reply framing checks).  The channel (poolsvc/service/channel.py)
# keeps connecting, the handshake, fork checks, segments and closing; the
# slot's layout and header checks stay in poolsvc/service/slot.py, whose
# constants are bound here once (_cw_bind).  Plain-Python twin:
# poolsvc/_pure/clientwire.py (same results, errors and messages).
#
# Memory: ClientSlot holds a buffer export of the slot's mmap (so the mmap
# cannot be closed under it) and touches only the first page's words, the
# request area and the reply area, whose bounds were checked against the
# mapping's length.  Blocking sendmsg / recvmsg run without the GIL on
# buffers this object owns or holds an export of; everything else holds it.
#
# Concurrency: an object belongs to one thread at a time (the channel's rule).
# Waits are bounded by the socket's kernel timeouts (SO_RCVTIMEO /
# SO_SNDTIMEO, set by the channel): one system call per blocking wait.
#
# Length: over 600 lines because the slot's end and the connection's are one
# request path whose calls go both ways (the slot's wait sleeps through the
# wire's socket, the wire's exchange publishes through the slot), kept in one
# concern with its twin poolsvc/_pure/clientwire.py.
from collections import deque as _cw_deque

from poolsvc.errors import Closed

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno, EINTR, EAGAIN
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove, memcmp, memset, strerror
from posix.unistd cimport write


cdef extern from "Python.h":
    object PyMemoryView_FromObject(object obj)


# Layout and protocol constants, bound from poolsvc.service.slot / protocol /
# channel by _cw_bind() on the first ClientSlot or ClientWire.
cdef bint cw_bound = False
cdef Py_ssize_t CW_W_REQ_SEQ, CW_W_REQ_LEN, CW_W_CLIENT_SLEEPING
cdef Py_ssize_t CW_W_REP_SEQ, CW_W_REP_LEN, CW_W_DAEMON_SLEEPING, CW_SLOT_WORDS
cdef Py_ssize_t CW_REQ_OFF, CW_REQ_CAP, CW_REP_OFF, CW_REP_CAP
cdef unsigned long long CW_REP_ON_SOCKET, CW_MAX_REPLY_FRAME
cdef double CW_MIN_SPIN, CW_YIELD_CHARGE
cdef long long CW_PROBE_EVERY, CW_MAX_PROBE_GAP
cdef Py_ssize_t CW_MAX_IN_FLIGHT, CW_MAX_FDS, CW_RECV_SIZE
cdef unsigned int CW_DOORBELL, CW_OK, CW_SHM_CLOSE
cdef Py_ssize_t CW_CLOSED_SIZE, CW_DESC_SIZE
cdef unsigned int CW_DESC_SLOW_BITS
cdef bytes CW_DOORBELL_FRAME
cdef object cw_map_client_slot


cdef int _cw_bind() except -1:
    global cw_bound, CW_W_REQ_SEQ, CW_W_REQ_LEN, CW_W_CLIENT_SLEEPING, CW_W_REP_SEQ, CW_W_REP_LEN
    global CW_W_DAEMON_SLEEPING, CW_SLOT_WORDS, CW_REQ_OFF, CW_REQ_CAP, CW_REP_OFF, CW_REP_CAP
    global CW_YIELD_CHARGE
    global CW_REP_ON_SOCKET, CW_MAX_REPLY_FRAME, CW_MIN_SPIN, CW_PROBE_EVERY, CW_MAX_PROBE_GAP, CW_MAX_IN_FLIGHT
    global CW_MAX_FDS, CW_RECV_SIZE, CW_DOORBELL, CW_DOORBELL_FRAME, cw_map_client_slot
    global CW_OK, CW_SHM_CLOSE, CW_CLOSED_SIZE, CW_DESC_SIZE, CW_DESC_SLOW_BITS
    if cw_bound:
        return 0
    from poolsvc.service import channel as C, protocol as P, slot as S
    CW_W_REQ_SEQ, CW_W_REQ_LEN, CW_W_CLIENT_SLEEPING = S.W_REQ_SEQ, S.W_REQ_LEN, S.W_CLIENT_SLEEPING
    CW_W_REP_SEQ, CW_W_REP_LEN, CW_W_DAEMON_SLEEPING = S.W_REP_SEQ, S.W_REP_LEN, S.W_DAEMON_SLEEPING
    CW_SLOT_WORDS = S.SLOT_WORDS
    CW_REQ_OFF, CW_REQ_CAP, CW_REP_OFF, CW_REP_CAP = S.SLOT_REQ_OFF, S.SLOT_REQ_CAP, S.SLOT_REP_OFF, S.SLOT_REP_CAP
    CW_REP_ON_SOCKET, CW_MIN_SPIN, CW_PROBE_EVERY = S.REP_ON_SOCKET, S.MIN_SPIN, S.PROBE_EVERY
    CW_MAX_PROBE_GAP, CW_YIELD_CHARGE = S.MAX_PROBE_GAP, S.YIELD_CHARGE
    CW_MAX_REPLY_FRAME, CW_MAX_FDS = P.MAX_REPLY_FRAME, P.MAX_FDS_PER_SEND
    CW_DOORBELL, CW_DOORBELL_FRAME = int(P.MsgType.DOORBELL), bytes(P.DOORBELL_FRAME)
    CW_MAX_IN_FLIGHT, CW_RECV_SIZE = C.MAX_IN_FLIGHT, C.RECV_SIZE
    cw_map_client_slot = S.map_client_slot
    CW_OK, CW_SHM_CLOSE = int(P.MsgType.OK), int(P.MsgType.SHM_CLOSE)
    CW_CLOSED_SIZE, CW_DESC_SIZE = P.CLOSED.size, P.DESC.size
    CW_DESC_SLOW_BITS = int(P.DescBits.PAGES_FOLLOW | P.DescBits.NEW_SEGMENT)
    if ((P.COOKIE.format, P.CLOSED.format, P.DESC.format) != ("<Q", "<II", "<QqQQQQQIIIHBB")
            or CW_DESC_SLOW_BITS > 0xFF):
        raise InternalError("the client wire's SHM_CLOSE, CLOSED and DESC layouts disagree with the protocol module")
    if (len(CW_DOORBELL_FRAME) != WIRE_HEADER_SIZE or not 0 < CW_MAX_IN_FLIGHT or CW_RECV_SIZE < 4096
            or not 0 < CW_YIELD_CHARGE or not 0 < CW_PROBE_EVERY <= CW_MAX_PROBE_GAP or CW_MAX_PROBE_GAP % CW_PROBE_EVERY
            or max(CW_W_REQ_SEQ, CW_W_REQ_LEN, CW_W_CLIENT_SLEEPING, CW_W_REP_SEQ, CW_W_REP_LEN,
                   CW_W_DAEMON_SLEEPING) >= CW_SLOT_WORDS):
        raise InternalError("the client wire's constants disagree with the slot and protocol modules")
    cw_bound = True
    return 0


cdef inline str _cw_strerror(int err):
    return (<bytes>strerror(err)).decode("utf-8", "replace")


cdef class ClientSlot:
    """The client's end of one shm slot: publishes requests, waits for replies.

    ``ClientSlot(fd, size, max_spin)`` maps the slot behind ``fd`` (announced as
    ``size`` bytes; ``fd`` stays the caller's to close) and checks it
    (``slot.map_client_slot``: ProtocolError on a size or layout this end does
    not know).  ``max_spin``: the longest polling window in seconds (0: always
    sleep).  The wait policy is docs/protocol.md's "Waiting".
    """

    def __init__(self, int fd, size, double max_spin):
        cdef Py_ssize_t need, mapped
        _cw_bind()
        if self.w != NULL:
            raise BadParameters("this ClientSlot maps a slot already")
        mm, words = cw_map_client_slot(fd, size)
        try:
            PyObject_GetBuffer(mm, &self.view, PyBUF_WRITABLE)
        except BaseException:
            words.release()
            mm.close()
            raise
        need = max(CW_SLOT_WORDS * 8, CW_REQ_OFF + CW_REQ_CAP, CW_REP_OFF + CW_REP_CAP)
        mapped = self.view.len
        if mapped < need:
            PyBuffer_Release(&self.view)
            words.release()
            mm.close()
            raise ProtocolError(f"daemon's shm slot maps {mapped} bytes, the layout needs {need}")
        self.mm = mm
        self.words = words
        self.w = <uint64_t *>self.view.buf
        self.req = <char *>self.view.buf + CW_REQ_OFF
        self.rep = <char *>self.view.buf + CW_REP_OFF
        self.seq = cw_load(&self.w[CW_W_REQ_SEQ])
        self.max_spin = max_spin
        self.expect = 0.0
        self.waits = 0
        self.slept = 0
        self.probe_gap = CW_PROBE_EVERY

    def __dealloc__(self):
        if self.w != NULL:
            PyBuffer_Release(&self.view)
            self.w = NULL

    cdef int _check_mapped(self) except -1:
        if self.w == NULL:
            raise Closed("the shm slot of this connection is closed")
        return 0

    cdef unsigned long long _publish(self, const char *head, Py_ssize_t head_len,
                                     const char *data, Py_ssize_t n) except 0:
        """Write ``head`` then ``data`` into the request area, announce them, fence;
        the request's sequence number."""
        cdef unsigned long long seq
        self._check_mapped()
        if head_len + n > CW_REQ_CAP:
            raise BadParameters(f"request frames of {head_len + n} bytes exceed the slot's request "
                                f"area of {CW_REQ_CAP}")
        if head_len:
            memcpy(self.req, head, head_len)
        if n:
            memcpy(self.req + head_len, data, n)
        cw_store(&self.w[CW_W_REQ_LEN], <uint64_t>(head_len + n))
        seq = self.seq + 1
        self.seq = seq
        cw_store(&self.w[CW_W_REQ_SEQ], seq)
        cw_fence()
        return seq

    def publish(self, data) -> int:
        """Write request frames (at most the request area's capacity) and announce
        them; the request's sequence number (ring when :meth:`daemon_sleeping`)."""
        cdef Py_buffer buf
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            return self._publish(NULL, 0, <const char *>buf.buf, buf.len)
        finally:
            PyBuffer_Release(&buf)

    def daemon_sleeping(self) -> bool:
        """Whether the daemon does not poll this slot, so that a request must ring
        (read after :meth:`publish`'s fence)."""
        self._check_mapped()
        return cw_load(&self.w[CW_W_DAEMON_SLEEPING]) != 0

    def answered(self, unsigned long long seq) -> bool:
        """Whether the reply to request ``seq`` is published."""
        self._check_mapped()
        return cw_load(&self.w[CW_W_REP_SEQ]) == seq

    cdef double _spins(self, bint daemon_asleep) noexcept:
        cdef double expect = self.expect, max_spin = self.max_spin
        if daemon_asleep:
            return 0.0
        if expect > max_spin and (self.probe_gap <= 0 or self.waits % self.probe_gap):
            return 0.0
        return min(max_spin, max(CW_MIN_SPIN, 2 * expect))

    def spins(self, bint daemon_asleep) -> float:
        """The polling window of the next wait in seconds of polling (0: sleep at once)."""
        return self._spins(daemon_asleep)

    cdef int _wait(self, unsigned long long seq, ClientWire wire, object sleep,
                   bint daemon_asleep) except -1:
        """Return once the reply to ``seq`` is published: poll while that pays,
        else sleep (``wire._slot_sleep(seq)`` when ``wire`` is given, else
        ``sleep(seq)``).  The window is the polling's own time: a check (four
        polls and a yield) is charged at most YIELD_CHARGE.  The GIL is
        released only around sched_yield; the mapping is checked after."""
        cdef double last, now, window, spent = 0.0
        cdef unsigned int polls = 0
        cdef bint asleep = False, probe
        self._check_mapped()
        if cw_load(&self.w[CW_W_REP_SEQ]) == seq:
            self.expect *= 0.75
            return 0
        self.waits += 1
        window = self._spins(daemon_asleep)
        probe = window > 0 and self.expect > self.max_spin
        if window:
            last = psv_monotonic()
            while cw_load(&self.w[CW_W_REP_SEQ]) != seq:
                polls += 1
                if not polls & 3:
                    now = psv_monotonic()
                    spent += min(now - last, CW_YIELD_CHARGE)
                    last = now
                    if spent > window:
                        asleep = True
                        break
                    with nogil:  # (lets this process's other threads run, as the twin's yield does)
                        sched_yield()
                    self._check_mapped()  # closed meanwhile by another thread: never read the unmapped words
            if not asleep:
                spent += min(psv_monotonic() - last, CW_YIELD_CHARGE)
        else:
            asleep = True
        if probe:  # a probe pays only while probes catch their replies
            self.probe_gap = min(2 * self.probe_gap, CW_MAX_PROBE_GAP) if asleep else CW_PROBE_EVERY
        if asleep:
            self.slept += 1
            if wire is not None:
                wire._slot_sleep(seq)
            else:
                sleep(seq)
            if window:  # polled in vain, then slept: counts as twice the longest window
                self.expect += (2 * self.max_spin - self.expect) / 4
        elif probe:  # a probe caught its reply: waits are short again
            self.expect = spent
        else:
            self.expect += (spent - self.expect) / 4
        return 0

    def wait(self, unsigned long long seq, sleep, bint daemon_asleep=False) -> None:
        """Return once the reply to ``seq`` is published: poll while that pays,
        else ``sleep(seq)``, which returns once it is (docs/protocol.md "Waiting").

        ``daemon_asleep``: whether :meth:`daemon_sleeping` was true after
        publishing ``seq`` (the caller rang the doorbell).
        """
        self._wait(seq, None, sleep, daemon_asleep)

    cdef int _set_sleeping(self, bint sleeping) except -1:
        self._check_mapped()
        cw_store(&self.w[CW_W_CLIENT_SLEEPING], 1 if sleeping else 0)
        if sleeping:
            cw_fence()
        return 0

    def set_sleeping(self, bint sleeping) -> None:
        """Mark (then fence) or clear the client's "sleeping" word."""
        self._set_sleeping(sleeping)

    cdef unsigned long long _reply_length(self) except? 0xFFFFFFFFFFFFFFFE:
        """W_REP_LEN checked against the reply area (REP_ON_SOCKET passes)."""
        cdef unsigned long long length
        self._check_mapped()
        length = cw_load(&self.w[CW_W_REP_LEN])
        if length != CW_REP_ON_SOCKET and length > <unsigned long long>CW_REP_CAP:
            raise ProtocolError(f"daemon wrote a slot reply of {length} bytes, more than {CW_REP_CAP}")
        return length

    def reply(self):
        """The published reply frames as bytes, or None when they follow on the socket.

        Raises ProtocolError when the daemon announces more than the reply area holds.
        """
        cdef unsigned long long length = self._reply_length()
        if length == CW_REP_ON_SOCKET:
            return None
        return PyBytes_FromStringAndSize(self.rep, <Py_ssize_t>length)

    def close(self) -> None:
        """Unmap the slot (idempotent)."""
        if self.w != NULL:
            PyBuffer_Release(&self.view)
            self.w = NULL
            self.req = NULL
            self.rep = NULL
        if self.words is not None:
            self.words.release()
            self.mm.close()


cdef class ClientWire:
    """The request path of one connection (docs/core.md "The client wire").

    ``ClientWire(lost, timeout_error, fds, spin=0.0)``: ``lost(why, kind)``
    closes the connection and raises ``kind`` (a Closed) with ``why``;
    ``timeout_error`` is the ``kind`` of a wait that ran out; received
    descriptors are appended to the deque ``fds``; ``spin`` is how long a
    socket wait polls (yielding) before it blocks, in seconds.  No socket
    until :meth:`attach`.
    """

    def __cinit__(self):
        self.fd = -1
        self.bell = -1
        self.closed = True
        self.receiving = False
        self.rbuf = NULL
        self.sbuf = NULL
        self.control = NULL

    def __init__(self, lost, timeout_error, fds, double spin=0.0):
        _cw_bind()
        if self.rbuf != NULL:
            raise BadParameters("this ClientWire is initialised already")
        self.outbox = bytearray()
        self.pending = _cw_deque()
        self.fds = fds
        self.lost = lost
        self.timeout_error = timeout_error
        self.spin = spin
        self.wait_limit = None
        self.slot = None
        self.close_reply = None
        self.close_cookies = None
        self.rcap = CW_RECV_SIZE
        self.rbuf = <char *>malloc(self.rcap)
        self.control_len = CMSG_SPACE(CW_MAX_FDS * sizeof(int))
        self.control = <char *>malloc(self.control_len)
        if self.rbuf == NULL or self.control == NULL:
            raise MemoryError()
        self.rstart = self.rend = 0
        self.slen = self.spos = 0

    def __dealloc__(self):
        free(self.rbuf)
        free(self.sbuf)
        free(self.control)

    def attach(self, int fd) -> None:
        """Use the connected socket ``fd`` (the caller's to close), dropping bytes
        received on an earlier one."""
        self.fd = fd
        self.closed = False
        self.rstart = self.rend = 0
        self.slen = self.spos = 0

    def set_slot(self, ClientSlot slot, int bell) -> None:
        """Send requests through ``slot``; ring the eventfd ``bell`` (-1: DOORBELL
        frames on the socket) when the daemon sleeps."""
        if self.sbuf == NULL:
            self.sbuf = <char *>malloc(CW_REP_CAP)
            if self.sbuf == NULL:
                raise MemoryError()
        self.slot = slot
        self.bell = bell

    def close(self) -> None:
        """Forget the socket, slot and doorbell (their owner closes them); idempotent."""
        self.closed = True
        self.fd = -1
        self.bell = -1
        self.slot = None
        self.slen = self.spos = 0

    cdef int _lose(self, str why, object kind) except -1:
        self.lost(why, kind)
        raise InternalError(f"{self.lost!r} returned instead of raising")

    # -- sending -------------------------------------------------------------------------------
    cdef int _send(self, const char *data, Py_ssize_t n, object fds) except -1:
        """sendmsg all of ``data`` (the caller keeps it alive and unchanged), with
        SCM_RIGHTS of ``fds`` on its first byte."""
        cdef msghdr msg
        cdef iovec iov
        cdef cmsghdr *cmsg
        cdef int *slots
        cdef char *control = NULL
        cdef Py_ssize_t nfds = len(fds) if fds else 0, i, sent = 0
        cdef ssize_t r
        cdef int err, fd = self.fd
        if self.closed:
            raise Closed("connection to the pool service is closed")
        memset(&msg, 0, sizeof(msg))
        iov.iov_base = <void *>data
        iov.iov_len = n
        msg.msg_iov = &iov
        msg.msg_iovlen = 1
        try:
            if nfds:
                control = <char *>malloc(CMSG_SPACE(nfds * sizeof(int)))
                if control == NULL:
                    raise MemoryError()
                memset(control, 0, CMSG_SPACE(nfds * sizeof(int)))
                msg.msg_control = control
                msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int))
                cmsg = CMSG_FIRSTHDR(&msg)
                cmsg.cmsg_level = SOL_SOCKET
                cmsg.cmsg_type = SCM_RIGHTS
                cmsg.cmsg_len = CMSG_LEN(nfds * sizeof(int))
                slots = <int *>CMSG_DATA(cmsg)
                for i in range(nfds):
                    slots[i] = fds[i]
            while True:
                with nogil:
                    r = sendmsg(fd, &msg, MSG_NOSIGNAL)
                if r < 0:
                    err = errno
                    if err == EINTR:
                        PyErr_CheckSignals()
                        continue
                    if err == EAGAIN:
                        self._lose(f"the daemon took no data for {self.wait_limit} s", self.timeout_error)
                    self._lose(f"send failed: {_cw_strerror(err)}", Closed)
                sent += r
                if sent >= n:
                    return 0
                msg.msg_control = NULL
                msg.msg_controllen = 0
                iov.iov_base = <void *>(data + sent)
                iov.iov_len = n - sent
        finally:
            free(control)

    def send(self, data, fds=()) -> None:
        """Send ``data`` (bytes-like) on the socket, with the descriptors ``fds``."""
        cdef Py_buffer buf
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            self._send(<const char *>buf.buf, buf.len, fds)
        finally:
            PyBuffer_Release(&buf)

    def post(self, int msg_type, body, on_reply) -> None:
        """Queue a request without waiting; it leaves with the next call (or
        :meth:`drain`); ``on_reply(type, body)`` runs when its reply is read, in order."""
        cdef Py_buffer buf
        cdef Py_ssize_t at = PyByteArray_GET_SIZE(self.outbox)
        cdef char *out
        PyObject_GetBuffer(body, &buf, PyBUF_SIMPLE)
        try:
            if buf.len > 0xFFFFFFFF or not 0 <= msg_type <= 0xFFFF:
                raise BadParameters(f"request of type {msg_type} with {buf.len} bytes cannot be framed")
            PyByteArray_Resize(self.outbox, at + WIRE_HEADER_SIZE + buf.len)
            out = PyByteArray_AS_STRING(self.outbox) + at
            psv_store_le32(out, <unsigned int>buf.len)
            out[4] = <char>(msg_type & 0xFF)
            out[5] = <char>(msg_type >> 8)
            out[6] = 0
            out[7] = 0
            memcpy(out + WIRE_HEADER_SIZE, buf.buf, buf.len)
        finally:
            PyBuffer_Release(&buf)
        self.pending.append(on_reply)
        if len(self.pending) >= CW_MAX_IN_FLIGHT:
            self.drain()

    def post_close(self, unsigned long long cookie, on_reply, cookies) -> int:
        """Queue SHM_CLOSE of ``cookie`` as :meth:`post` does, with ``cookie``
        appended to the deque ``cookies``; the requests now pending (the caller
        drains at MAX_IN_FLIGHT).  ``on_reply(type, body)`` pops its cookie; this
        wire does so itself, without calling it, for an OK CLOSED that unmaps no
        segment (the latest ``on_reply`` and ``cookies`` are kept for that)."""
        cdef Py_ssize_t at = PyByteArray_GET_SIZE(self.outbox)
        cdef char *out
        PyByteArray_Resize(self.outbox, at + WIRE_HEADER_SIZE + 8)
        out = PyByteArray_AS_STRING(self.outbox) + at
        psv_store_le32(out, 8)
        out[4] = <char>(CW_SHM_CLOSE & 0xFF)
        out[5] = <char>(CW_SHM_CLOSE >> 8)
        out[6] = 0
        out[7] = 0
        psv_store_le64(out + WIRE_HEADER_SIZE, cookie)
        self.close_reply = on_reply
        self.close_cookies = cookies
        self.pending.append(on_reply)
        cookies.append(cookie)
        return len(self.pending)

    def plain_desc(self, body) -> tuple | None:
        """The fields of the shm descriptor ``body`` as ``protocol.DESC.unpack``
        gives them, when it is a plain one (exactly one DESC, no pages follow, no
        new segment); else None (the caller's decoder handles, and checks, it)."""
        cdef Py_buffer buf
        cdef const char *d
        PyObject_GetBuffer(body, &buf, PyBUF_SIMPLE)
        try:
            if buf.len != CW_DESC_SIZE:
                return None
            d = <const char *>buf.buf
            if <unsigned char>d[71] & CW_DESC_SLOW_BITS:
                return None
            return (psv_load_le64(d), <long long>psv_load_le64(d + 8), psv_load_le64(d + 16),
                    psv_load_le64(d + 24), psv_load_le64(d + 32), psv_load_le64(d + 40),
                    psv_load_le64(d + 48), psv_load_le32(d + 56), psv_load_le32(d + 60),
                    psv_load_le32(d + 64), <unsigned int>(<unsigned char>d[68] | (<unsigned char>d[69] << 8)),
                    <unsigned char>d[70], <unsigned char>d[71])
        finally:
            PyBuffer_Release(&buf)

    cdef int _ring(self) except -1:
        """Wake the daemon: the eventfd (EAGAIN: its counter is full, the daemon is
        awake anyway), else a DOORBELL frame on the socket."""
        cdef uint64_t one = 1
        cdef ssize_t r
        cdef int err
        if self.bell < 0:
            return self._send(PyBytes_AS_STRING(CW_DOORBELL_FRAME), WIRE_HEADER_SIZE, None)
        while True:
            r = write(self.bell, &one, sizeof(one))
            if r >= 0:
                return 0
            err = errno
            if err == EINTR:
                PyErr_CheckSignals()
                continue
            if err == EAGAIN:
                return 0
            return self._lose(f"doorbell failed: {_cw_strerror(err)}", Closed)

    # -- the slot ------------------------------------------------------------------------------
    cdef int _slot_exchange(self, const char *data, Py_ssize_t n) except -1:
        """Publish the outbox then ``data`` in the slot (the outbox is emptied), ring
        when the daemon sleeps, wait for the reply and stage it for _read_frame."""
        cdef ClientSlot slot = self.slot
        cdef unsigned long long seq, length = 0
        cdef bint asleep
        if self.closed:
            raise Closed("connection to the pool service is closed")
        seq = slot._publish(PyByteArray_AS_STRING(self.outbox), PyByteArray_GET_SIZE(self.outbox), data, n)
        PyByteArray_Resize(self.outbox, 0)
        asleep = cw_load(&slot.w[CW_W_DAEMON_SLEEPING]) != 0
        if asleep:
            self._ring()
        slot._wait(seq, self, None, asleep)
        try:
            length = slot._reply_length()
        except ProtocolError as exc:
            self._lose(str(exc), Closed)
        if length != CW_REP_ON_SOCKET:  # else the replies follow on the socket
            memcpy(self.sbuf, slot.rep, <size_t>length)
            self.slen = <Py_ssize_t>length
            self.spos = 0
        return 0

    cdef int _slot_sleep(self, unsigned long long seq) except -1:
        """Sleep on the socket until the reply to ``seq`` is in the slot (DOORBELL)."""
        cdef ClientSlot slot = self.slot
        slot._set_sleeping(True)
        try:
            while True:
                slot._check_mapped()
                if cw_load(&slot.w[CW_W_REP_SEQ]) == seq:
                    break
                self._fill()
        finally:
            if self.slot is not None:
                slot._set_sleeping(False)
        return 0

    # -- receiving -----------------------------------------------------------------------------
    cdef Py_ssize_t _recv(self, int flags) except -2:
        """One recvmsg into the receive buffer (room for CW_RECV_SIZE bytes made
        first), its descriptors queued; the byte count, or -1 on EAGAIN."""
        cdef msghdr msg
        cdef iovec iov
        cdef cmsghdr *cmsg
        cdef const int *got
        cdef char *grown
        cdef Py_ssize_t cap, i, count
        cdef ssize_t r
        cdef int err, fd = self.fd
        if self.receiving:  # (another thread: the buffer must not move under its recvmsg)
            raise BadParameters("a ClientWire belongs to one thread at a time: it is receiving already")
        if self.rstart == self.rend:
            self.rstart = self.rend = 0
            if self.rcap > 4 * CW_RECV_SIZE:  # give back what a huge reply took
                grown = <char *>realloc(self.rbuf, CW_RECV_SIZE)
                if grown != NULL:
                    self.rbuf, self.rcap = grown, CW_RECV_SIZE
        if self.rcap - self.rend < CW_RECV_SIZE:
            if self.rstart:
                memmove(self.rbuf, self.rbuf + self.rstart, self.rend - self.rstart)
                self.rend -= self.rstart
                self.rstart = 0
            if self.rcap - self.rend < CW_RECV_SIZE:
                cap = max(2 * self.rcap, self.rend + CW_RECV_SIZE)
                grown = <char *>realloc(self.rbuf, cap)
                if grown == NULL:
                    raise MemoryError()
                self.rbuf, self.rcap = grown, cap
        memset(&msg, 0, sizeof(msg))
        iov.iov_base = self.rbuf + self.rend
        iov.iov_len = self.rcap - self.rend
        msg.msg_iov = &iov
        msg.msg_iovlen = 1
        while True:
            msg.msg_control = self.control
            msg.msg_controllen = self.control_len
            msg.msg_flags = 0
            if flags & MSG_DONTWAIT:
                r = recvmsg(fd, &msg, flags | MSG_CMSG_CLOEXEC)
            else:
                self.receiving = True
                with nogil:
                    r = recvmsg(fd, &msg, flags | MSG_CMSG_CLOEXEC)
                self.receiving = False
            if r >= 0:
                break
            err = errno
            if err == EINTR:
                PyErr_CheckSignals()
                continue
            if err == EAGAIN:
                return -1
            self._lose(f"receive failed: {_cw_strerror(err)}", Closed)
        if msg.msg_controllen:
            cmsg = CMSG_FIRSTHDR(&msg)
            while cmsg != NULL:
                if cmsg.cmsg_level == SOL_SOCKET and cmsg.cmsg_type == SCM_RIGHTS:
                    got = <const int *>CMSG_DATA(cmsg)
                    count = (cmsg.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                    for i in range(count):
                        self.fds.append(got[i])
                cmsg = CMSG_NXTHDR(&msg, cmsg)
        self.rend += r
        return r

    cdef int _fill(self) except -1:
        """Receive what the socket holds (polling up to ``spin`` seconds, then
        waiting up to the timeout); drop DOORBELL frames at the front when a slot
        is attached."""
        cdef Py_ssize_t got = -1
        cdef double deadline
        if self.spin > 0:
            deadline = psv_monotonic() + self.spin
            while True:
                got = self._recv(MSG_DONTWAIT)
                if got >= 0 or psv_monotonic() > deadline:
                    break
                sched_yield()
        if got < 0:
            got = self._recv(0)
            if got < 0:
                self._lose(f"no answer from the daemon within {self.wait_limit} s", self.timeout_error)
        if got == 0:
            self._lose("the daemon closed the connection", Closed)
        if self.slot is not None:
            while (self.rend - self.rstart >= WIRE_HEADER_SIZE
                   and memcmp(self.rbuf + self.rstart, PyBytes_AS_STRING(CW_DOORBELL_FRAME),
                              WIRE_HEADER_SIZE) == 0):
                self.rstart += WIRE_HEADER_SIZE
        return 0

    def fill(self) -> None:
        """Receive once (see the class doc); descriptors go to ``fds``."""
        self._fill()

    cdef int _next_frame(self, unsigned int *msg_type, const char **body, Py_ssize_t *length) except -1:
        """The next reply frame: its type, and its body where it lies (the slot's
        staged replies or the receive buffer; valid until the next receive or
        exchange).  Receives as needed; a malformed frame loses the connection."""
        cdef Py_ssize_t pos, size, end
        cdef unsigned int n, flags
        cdef const char *at
        if self.slen:
            pos = self.spos
            size = self.slen
            if size - pos >= WIRE_HEADER_SIZE:
                at = self.sbuf + pos
                n = psv_load_le32(at)
                flags = <unsigned char>at[6] | (<unsigned int><unsigned char>at[7] << 8)
                end = pos + WIRE_HEADER_SIZE + n
                if not flags and end <= size:
                    if end == size:
                        self.slen = self.spos = 0
                    else:
                        self.spos = end
                    msg_type[0] = <unsigned char>at[4] | (<unsigned int><unsigned char>at[5] << 8)
                    body[0] = at + WIRE_HEADER_SIZE
                    length[0] = n
                    return 0
            self._lose(f"daemon wrote a malformed reply into the slot at byte {pos}", Closed)
        while True:
            if self.rend - self.rstart >= WIRE_HEADER_SIZE:
                at = self.rbuf + self.rstart
                n = psv_load_le32(at)
                flags = <unsigned char>at[6] | (<unsigned int><unsigned char>at[7] << 8)
                if n > CW_MAX_REPLY_FRAME or flags:
                    self._lose(f"daemon sent a malformed header (length {n}, flags {flags:#x})", Closed)
                end = WIRE_HEADER_SIZE + n
                if self.rend - self.rstart >= end:
                    self.rstart += end
                    msg_type[0] = <unsigned char>at[4] | (<unsigned int><unsigned char>at[5] << 8)
                    if msg_type[0] == CW_DOORBELL and self.slot is not None:
                        continue
                    body[0] = at + WIRE_HEADER_SIZE
                    length[0] = n
                    return 0
            self._fill()

    cdef tuple _read_frame(self):
        cdef unsigned int msg_type
        cdef const char *body
        cdef Py_ssize_t length
        self._next_frame(&msg_type, &body, &length)
        return msg_type, PyMemoryView_FromObject(PyBytes_FromStringAndSize(body, length))

    def read_frame(self) -> tuple:
        """The next reply ``(type, body)``: from the slot's staged reply, else the socket."""
        return self._read_frame()

    cdef int _closed_reply(self, object handler) except -1:
        """The reply to a :meth:`post_close`: an OK CLOSED that unmaps no segment
        only drops its cookie here; any other reply goes to ``handler(type, body)``."""
        cdef unsigned int msg_type
        cdef const char *body
        cdef Py_ssize_t length
        self._next_frame(&msg_type, &body, &length)
        if msg_type == CW_OK and length == CW_CLOSED_SIZE and psv_load_le32(body + 4) == 0:
            self.close_cookies.popleft()
            return 0
        handler(msg_type, PyMemoryView_FromObject(PyBytes_FromStringAndSize(body, length)))
        return 0

    cdef int _answer_pending(self) except -1:
        cdef object handler
        cdef int msg_type
        while self.pending:
            handler = self.pending.popleft()
            if handler is self.close_reply and handler is not None:
                self._closed_reply(handler)
                continue
            msg_type, body = self._read_frame()
            handler(msg_type, body)
        return 0

    # -- requests ------------------------------------------------------------------------------
    def call_frame(self, frame, fds=(), bint slot_ok=True) -> tuple:
        """Send one framed request and return its reply ``(type, body)``, the
        replies of earlier pipelined requests handled first.

        Through the slot when there is one and ``slot_ok`` and the outbox and
        ``frame`` fit its request area; else on the socket (the outbox first, on
        its own when ``fds`` ride with ``frame``).
        """
        cdef Py_buffer buf
        cdef Py_ssize_t olen = PyByteArray_GET_SIZE(self.outbox)
        cdef bytes joined
        PyObject_GetBuffer(frame, &buf, PyBUF_SIMPLE)
        try:
            if slot_ok and self.slot is not None and olen + buf.len <= CW_REQ_CAP:
                self._slot_exchange(<const char *>buf.buf, buf.len)
            elif olen and fds:  # descriptors ride on the first byte: send the queue first
                joined = bytes(self.outbox)
                self._send(PyBytes_AS_STRING(joined), olen, None)
                PyByteArray_Resize(self.outbox, 0)
                self._send(<const char *>buf.buf, buf.len, fds)
            elif olen:
                joined = PyBytes_FromStringAndSize(NULL, olen + buf.len)
                memcpy(PyBytes_AS_STRING(joined), PyByteArray_AS_STRING(self.outbox), olen)
                memcpy(PyBytes_AS_STRING(joined) + olen, buf.buf, buf.len)
                PyByteArray_Resize(self.outbox, 0)
                self._send(PyBytes_AS_STRING(joined), olen + buf.len, fds)
            else:
                self._send(<const char *>buf.buf, buf.len, fds)
        finally:
            PyBuffer_Release(&buf)
        self._answer_pending()
        return self._read_frame()

    def drain(self) -> None:
        """Send queued requests and read the replies of every pipelined request."""
        cdef Py_ssize_t olen = PyByteArray_GET_SIZE(self.outbox)
        cdef bytes data
        if olen:
            if self.slot is not None and olen <= CW_REQ_CAP:
                self._slot_exchange(NULL, 0)
            else:
                data = bytes(self.outbox)
                PyByteArray_Resize(self.outbox, 0)
                self._send(PyBytes_AS_STRING(data), olen, None)
        self._answer_pending()
