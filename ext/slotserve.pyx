# slotserve.pyx: the daemon's end of one shm slot request, served end to end
# when every frame in it is one this kernel owns.
#
#   serve_slot      the request in a connection's slot (Server._serve_slot): the
#                   checks of the slot (sequence, length), the copy of the request
#                   out of the shared mapping, the frame loop (each header checked,
#                   the max_output rule), the requests it owns (PING; ALLOC and
#                   SHM_CLOSE through ShmRequests' typed entries serve_alloc_at /
#                   serve_close_at), the daemon's accounting of each (the
#                   connection's request count, the metrics' ring and count), the
#                   reply area, rep_len, rep_seq, the fence, client_sleeping and
#                   the DOORBELL
#   ring_doorbell   the DOORBELL of a sleeping client: one non-blocking send(2)
#                   when nothing is queued on its socket, else queued as any reply
#   ready_slots     the polling scan: which polled slots hold a sequence other
#                   than the one last served
#   serve_ready     the loop's turn: every ready polled slot served
#
# A frame it does not own (BATCH, every other type, a handler that is not the
# daemon's own), a bad frame header, replies over max_output, descriptors to
# send with the reply, or replies that do not fit the reply area: serve_slot
# hands the rest of the request over to the Python frame loop
# (SlotServing._slot_frames) at the frame where it stopped, with the replies
# so far, which is where that loop would stand: the replies, accounting,
# STATS and error messages are the Python path's.  The error body of a
# request that raises comes from the daemon (Handlers' _failed / _error).
#
# The plain-Python twin, same results and calls, is poolsvc/_pure/slotserve.py;
# the contract is docs/core.md, "The daemon's slot requests".
#
# Concurrency: the daemon's loop thread only; the GIL is held throughout.  The
# client writes its line of the slot at any moment: each word is read once per
# decision (cw_load), the request is copied out before it is parsed, and the
# mapping's buffer is held only while the kernel reads or writes it (never
# across a call into the daemon, which may close the slot).
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_Next
from cpython.long cimport PyLong_AsUnsignedLongLong, PyLong_AsLongLong, PyLong_FromUnsignedLongLong
from cpython.method cimport PyMethod_Check, PyMethod_GET_FUNCTION, PyMethod_GET_SELF
from cpython.object cimport PyObject
from libc.stdint cimport uint64_t
from libc.stdlib cimport malloc
from libc.string cimport memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

# Bound by _ss_bind() on the first request (they live in modules that import this one).
cdef object _ss_ping_fn = None          # Handlers._op_ping
cdef object _ss_doorbell = None         # protocol.DOORBELL_FRAME
cdef ss_conn_slots _ss_slots
cdef char *_ss_out = NULL               # the reply frames of the request being served


cdef int _ss_bind() except -1:
    global _ss_ping_fn, _ss_doorbell, _ss_out
    if _ss_ping_fn is not None:
        return 0
    from poolsvc.service import protocol as P, slot as S
    from poolsvc.service.connection import READY, Connection
    from poolsvc.service.handlers import Handlers
    if (S.W_REQ_SEQ * 8, S.W_REQ_LEN * 8, S.W_CLIENT_SLEEPING * 8, S.W_REP_SEQ * 8, S.W_REP_LEN * 8,
            S.SLOT_REQ_OFF, S.SLOT_REQ_CAP, S.SLOT_REP_OFF, S.SLOT_REP_CAP, S.SLOT_BYTES, READY,
            P.HEADER_SIZE, int(P.MsgType.OK), int(P.MsgType.ERROR), int(P.MsgType.PING),
            int(P.MsgType.ALLOC), int(P.MsgType.SHM_CLOSE)) != \
            (SS_REQ_SEQ, SS_REQ_LEN, SS_CLIENT_SLEEPING, SS_REP_SEQ, SS_REP_LEN, SS_REQ_OFF, SS_REQ_CAP,
             SS_REP_OFF, SS_REP_CAP, SS_SLOT_BYTES, SS_READY, SS_HEADER_SIZE, SS_OK, SS_ERROR, SS_PING,
             SS_ALLOC, SS_SHM_CLOSE):
        raise InternalError("ext/slotserve.pxd does not match the slot layout of poolsvc/service/slot.py")
    _ss_slots.state = _fp_slot(Connection, "state")
    _ss_slots.batch = _fp_slot(Connection, "batch")
    _ss_slots.words = _fp_slot(Connection, "words")
    _ss_slots.slot = _fp_slot(Connection, "slot")
    _ss_slots.seq = _fp_slot(Connection, "seq")
    _ss_slots.out_bytes = _fp_slot(Connection, "out_bytes")
    _ss_slots.out = _fp_slot(Connection, "out")
    _ss_slots.handlers = _fp_slot(Connection, "handlers")
    _ss_slots.shm_requests = _fp_slot(Connection, "shm_requests")
    _ss_slots.requests = _fp_slot(Connection, "requests")
    _ss_slots.fileno = _fp_slot(Connection, "fileno")
    _ss_slots.served_at = _fp_slot(Connection, "served_at")
    _ss_out = <char *>malloc(SS_REP_CAP)
    if _ss_out == NULL:
        raise MemoryError()
    _ss_doorbell = P.DOORBELL_FRAME
    _ss_ping_fn = Handlers._op_ping
    return 0


cdef inline object _ss_get(object conn, Py_ssize_t offset):
    """A Connection slot's value (every slot is set by Connection.__init__)."""
    return <object>fp_load(conn, offset)


cdef inline long long _ss_now_ns() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int _ss_owner(object handlers, object key, unsigned int msg_type, object server,
                   object conn) except -1:
    """Which request of the kernel serves a frame of ``msg_type`` on ``conn``: the
    daemon's own handler of it (bound to ``server``) with, for ALLOC and
    SHM_CLOSE, a compiled ShmRequests; SS_OWN_NONE for anything else."""
    cdef PyObject *found
    cdef object handler, fn
    if type(handlers) is not dict:
        return SS_OWN_NONE
    found = PyDict_GetItem(handlers, key)
    if found == NULL:
        return SS_OWN_NONE
    handler = <object>found
    if not PyMethod_Check(handler) or <object>PyMethod_GET_SELF(handler) is not server:
        return SS_OWN_NONE
    fn = <object>PyMethod_GET_FUNCTION(handler)
    if msg_type == SS_PING:
        return SS_OWN_PING if fn is _ss_ping_fn else SS_OWN_NONE
    if type(_ss_get(conn, _ss_slots.shm_requests)) is not ShmRequests:
        return SS_OWN_NONE
    if msg_type == SS_ALLOC and fn is serve_alloc:
        return SS_OWN_ALLOC
    if msg_type == SS_SHM_CLOSE and fn is serve_shm_close:
        return SS_OWN_CLOSE
    return SS_OWN_NONE


cdef int _ss_record(object metrics, object key, long long ns) except -1:
    """One request of type ``key`` served in ``ns`` ns: its latency ring and its count
    (``Metrics.record``, inlined for a type whose ring exists)."""
    cdef PyObject *found = PyDict_GetItem(metrics.rings, key)
    cdef PyObject *count
    cdef object ring, n, ops
    if found == NULL:
        metrics.record(key, ns)
        return 0
    ring = <object>found
    n = ring.count
    ring.samples[n % ring.size] = ns
    ring.count = n + 1
    ring.total_ns += ns
    ops = metrics.ops
    count = PyDict_GetItem(ops, key)
    PyDict_SetItem(ops, key, (<object>count + 1) if count != NULL else 1)
    return 0


cdef inline void _ss_put_header(char *at, Py_ssize_t length, unsigned int msg_type) noexcept:
    psv_store_le32(at, <unsigned int>length)
    at[4] = <char>(msg_type & 0xFF)
    at[5] = <char>(msg_type >> 8)
    at[6] = 0
    at[7] = 0


cdef bytes _ss_frame(bytes body, unsigned int msg_type):
    """The reply frame of ``body``."""
    cdef Py_ssize_t r = PyBytes_GET_SIZE(body)
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, SS_HEADER_SIZE + r)
    _ss_put_header(PyBytes_AS_STRING(frame), r, msg_type)
    memcpy(PyBytes_AS_STRING(frame) + SS_HEADER_SIZE, PyBytes_AS_STRING(body), r)
    return frame


cdef tuple _ss_hand_over(bytes data, Py_ssize_t pos, Py_ssize_t n, object more):
    """``(data, pos, out)`` for the Python frame loop: the replies so far (``n`` bytes
    of the kernel's buffer, then ``more`` unless None)."""
    cdef bytearray out = PyByteArray_FromStringAndSize(_ss_out, n)
    if more is not None:
        out += more
    return (data, pos, out)


cdef int _ss_violation(object server, object conn, str why) except -1:
    server._violation(conn, ProtocolError(why))
    server._flush(conn)
    return 0


def serve_slot(server, conn, bells):
    """Serve the request published in ``conn``'s slot, if a new one is.

    Returns False when there is nothing to serve now (no new sequence, the
    connection is not READY with a mapped slot and no BATCH in slices, or the
    client has more than ``max_output`` unread on its socket); True when the
    request was served (or was a violation: ERROR queued, connection closing);
    else ``(data, pos, out)``: the request's bytes, the first frame not served
    and the reply frames so far, for ``SlotServing._slot_frames`` to go on with
    (``conn.seq`` is the request's sequence then).  ``bells``: a list that
    receives the connection when its client is to be rung (the loop rings them
    all once every ready slot is served), or None to ring at once.
    """
    _ss_bind()
    return _ss_serve(server, conn, bells)


cdef object _ss_serve(object server, object conn, object bells):
    """``serve_slot`` (bound)."""
    cdef Py_buffer view
    cdef char *base
    cdef const char *src
    cdef uint64_t seq, cur, length, sleeping
    cdef unsigned long long max_frame, blen
    cdef long long max_output, t0
    cdef Py_ssize_t pos = 0, start, n = 0, r
    cdef unsigned int msg_type, flags, reply_type
    cdef int owner
    cdef object cur_obj, handlers, metrics, reqs, key, slot
    cdef bytes reply
    cdef bytes data
    cdef Py_ssize_t held
    if _ss_get(conn, _ss_slots.words) is None or _ss_get(conn, _ss_slots.state) != SS_READY or \
            _ss_get(conn, _ss_slots.batch) is not None:
        return False
    slot = _ss_get(conn, _ss_slots.slot)
    cur_obj = _ss_get(conn, _ss_slots.seq)
    cur = PyLong_AsUnsignedLongLong(cur_obj)
    max_output = server._max_output
    PyObject_GetBuffer(slot.mm, &view, PyBUF_WRITABLE)
    try:
        if view.len < SS_SLOT_BYTES:
            raise InternalError(f"shm slot mapping of {view.len} bytes, expected {SS_SLOT_BYTES}")
        base = <char *>view.buf
        seq = cw_load(<uint64_t *>(base + SS_REQ_SEQ))
        if seq == cur:
            return False
        if seq != cur + 1 or cur == <uint64_t>-1:
            data = None
        elif PyLong_AsLongLong(_ss_get(conn, _ss_slots.out_bytes)) > max_output:
            return False    # the client must read its socket first
        else:
            length = cw_load(<uint64_t *>(base + SS_REQ_LEN))
            data = PyBytes_FromStringAndSize(base + SS_REQ_OFF, <Py_ssize_t>length) \
                if SS_HEADER_SIZE <= length <= SS_REQ_CAP else None  # a copy: the client may scribble
    finally:
        PyBuffer_Release(&view)
    if data is None:    # (the slot is not held: a violation drops it)
        if seq != cur + 1 or cur == <uint64_t>-1:
            _ss_violation(server, conn, f"slot request sequence {seq}, expected {cur_obj + 1}")
        else:
            _ss_violation(server, conn, f"slot request length {length} is outside "
                                        f"{SS_HEADER_SIZE}..{SS_REQ_CAP}")
        return True
    fp_store(conn, _ss_slots.seq, PyLong_FromUnsignedLongLong(seq))
    # the frames, from the private copy
    src = PyBytes_AS_STRING(data)
    length = <uint64_t>PyBytes_GET_SIZE(data)
    max_frame = server._max_frame
    handlers = _ss_get(conn, _ss_slots.handlers)
    metrics = server.metrics
    while <uint64_t>pos < length:
        if length - pos < SS_HEADER_SIZE:
            return _ss_hand_over(data, pos, n, None)    # (a violation: the Python loop says so)
        blen = psv_load_le32(src + pos)
        msg_type = <unsigned char>src[pos + 4] | (<unsigned int><unsigned char>src[pos + 5] << 8)
        flags = <unsigned char>src[pos + 6] | (<unsigned int><unsigned char>src[pos + 7] << 8)
        if blen > max_frame or flags or length - pos - SS_HEADER_SIZE < blen or n > max_output:
            return _ss_hand_over(data, pos, n, None)
        key = msg_type
        owner = _ss_owner(handlers, key, msg_type, server, conn)
        if owner == SS_OWN_NONE:
            return _ss_hand_over(data, pos, n, None)
        start = pos + SS_HEADER_SIZE
        pos = start + <Py_ssize_t>blen
        t0 = _ss_now_ns()
        fp_store(conn, _ss_slots.requests, _ss_get(conn, _ss_slots.requests) + 1)
        reply_type = SS_OK
        reply = None
        if owner == SS_OWN_PING and n + SS_HEADER_SIZE + <Py_ssize_t>blen <= SS_REP_CAP:
            memcpy(_ss_out + n + SS_HEADER_SIZE, src + start, blen)     # the body, echoed
            r = <Py_ssize_t>blen
        else:
            held = len(server._reply_fds)
            reqs = _ss_get(conn, _ss_slots.shm_requests)
            try:
                if owner == SS_OWN_PING:
                    reply = PyBytes_FromStringAndSize(src + start, <Py_ssize_t>blen)
                elif owner == SS_OWN_ALLOC:
                    reply = (<ShmRequests>reqs).serve_alloc_at(server, conn, src + start, pos - start)
                else:
                    reply = (<ShmRequests>reqs).serve_close_at(server, conn, src + start, pos - start)
            except Exception as exc:
                reply_type = SS_ERROR
                reply = server._failed(conn, key, exc, held)
            r = len(reply)
        _ss_record(metrics, key, _ss_now_ns() - t0)
        if n + SS_HEADER_SIZE + r > SS_REP_CAP:     # too long for the slot: the Python loop queues it
            return _ss_hand_over(data, pos, n, _ss_frame(reply, reply_type))
        _ss_put_header(_ss_out + n, r, reply_type)
        if reply is not None:
            memcpy(_ss_out + n + SS_HEADER_SIZE, PyBytes_AS_STRING(reply), r)
        n += SS_HEADER_SIZE + r
        if _ss_get(conn, _ss_slots.state) != SS_READY:
            return _ss_hand_over(data, <Py_ssize_t>length, n, None)     # no further frame runs
    # the reply
    slot = _ss_get(conn, _ss_slots.slot)
    if server._reply_fds or slot is None or _ss_get(conn, _ss_slots.words) is None:
        return _ss_hand_over(data, pos, n, None)    # descriptors go on the socket first
    PyObject_GetBuffer(slot.mm, &view, PyBUF_WRITABLE)
    try:
        if view.len < SS_SLOT_BYTES:
            raise InternalError(f"shm slot mapping of {view.len} bytes, expected {SS_SLOT_BYTES}")
        base = <char *>view.buf
        memcpy(base + SS_REP_OFF, _ss_out, n)
        cw_store(<uint64_t *>(base + SS_REP_LEN), <uint64_t>n)
        cw_store(<uint64_t *>(base + SS_REP_SEQ), seq)
        cw_fence()
        sleeping = cw_load(<uint64_t *>(base + SS_CLIENT_SLEEPING))
    finally:
        PyBuffer_Release(&view)
    if sleeping:
        if _ss_get(conn, _ss_slots.out):
            server._queue(conn, _ss_doorbell)
        elif bells is not None:
            bells.append(conn)
        else:
            ring_doorbell(server, conn)
    if _ss_get(conn, _ss_slots.out):
        server._flush(conn)
    return True


def ring_doorbell(server, conn):
    """Send the DOORBELL frame to ``conn``'s client: one non-blocking send(2) when
    nothing is queued on its socket; what is not sent that way (a full socket, an
    error) is queued and written as any reply (``server._queue``, ``server._write``)."""
    cdef Py_ssize_t sent = 0
    cdef int fd
    _ss_bind()
    if not _ss_get(conn, _ss_slots.out):
        fd = _ss_get(conn, _ss_slots.fileno)
        sent = send(fd, PyBytes_AS_STRING(_ss_doorbell), SS_HEADER_SIZE, MSG_DONTWAIT | MSG_NOSIGNAL)
        if sent == SS_HEADER_SIZE:
            return
        if sent < 0:
            sent = 0
    server._queue(conn, _ss_doorbell[sent:])
    server._write(conn)


def ready_slots(dict polled not None):
    """The connections of ``polled`` (keys: connections with a mapped slot) whose
    slot's ``req_seq`` differs from ``conn.seq``, in ``polled``'s order."""
    _ss_bind()
    return _ss_ready(polled)


def serve_ready(server, dict polled not None, list bells not None, now):
    """The loop's turn over the polled slots: serve each one ``ready_slots(polled)``
    gives (``serve_slot(server, conn, bells)``, and ``server._slot_frames`` for the
    rest of a request handed over), and set ``conn.served_at = now`` for each one
    served.  Returns how many were served."""
    cdef object conn, done
    cdef Py_ssize_t served = 0
    _ss_bind()
    for conn in _ss_ready(polled):
        done = _ss_serve(server, conn, bells)
        if done is False:
            continue
        if done is not True:
            server._slot_frames(conn, (<tuple>done)[0], (<tuple>done)[1], (<tuple>done)[2],
                                _ss_get(conn, _ss_slots.seq))
        served += 1
        fp_store(conn, _ss_slots.served_at, now)
    return served


cdef list _ss_ready(dict polled):
    """``ready_slots`` (bound)."""
    cdef Py_ssize_t at = 0
    cdef PyObject *key
    cdef PyObject *value
    cdef Py_buffer view
    cdef uint64_t seq
    cdef object conn, words
    cdef list ready = []
    while PyDict_Next(polled, &at, &key, &value):
        conn = <object>key
        words = _ss_get(conn, _ss_slots.words)
        PyObject_GetBuffer(words, &view, PyBUF_SIMPLE)
        try:
            if view.len < SS_REQ_SEQ + 8:
                raise InternalError(f"shm slot words of {view.len} bytes")
            seq = cw_load(<uint64_t *>(<char *>view.buf + SS_REQ_SEQ))
        finally:
            PyBuffer_Release(&view)
        if seq != PyLong_AsUnsignedLongLong(_ss_get(conn, _ss_slots.seq)):
            ready.append(conn)
    return ready
