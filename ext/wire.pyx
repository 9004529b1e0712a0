# wire.pyx: framing of batched requests (BATCH / BATCH_REPLY bodies).
#
# Owns: split_frames (every header checked before any frame is returned) and
# run_batch (walk the frames, call the caller's per-type handlers, frame the
# replies into one body).  The policy (what a frame means, which types may be
# batched, error bodies) stays with the caller, in Python: this file only
# runs the loop.  Plain-Python twin: poolsvc/_pure/wire.py (same messages).
#
# The client's end: _batch_results turns a BATCH_REPLY into the results of
# Batch.run (poolsvc/service/batch.py): a new Shm for a plain DESC (no pages
# follow, no new segment, a cookie the context does not hold), made by its
# slots as Shm.__init__ makes it, None for a CLOSED that dropped no segment,
# and the caller's ``fallback`` for anything else.
#
# Typed entry: a handler that is fastpath.pyx's serve_alloc or serve_shm_close
# bound to a server (the daemon's own ALLOC and SHM_CLOSE handlers), on a
# connection whose ``shm_requests`` is a compiled ShmRequests, is served by its
# ``serve_alloc_at`` / ``serve_close_at`` on the frame's bytes in place: the
# same call, without a bytes body or the call protocol.  Any other handler
# (a replaced one, the twin's) is called as above.
#
# Concurrency: none; the GIL is held throughout.  The body's buffer is held
# (Py_buffer) for the whole call, so a handler cannot resize it under us.
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_C_CONTIGUOUS
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.method cimport PyMethod_Check, PyMethod_GET_FUNCTION, PyMethod_GET_SELF
from cpython.long cimport PyLong_FromUnsignedLongLong, PyLong_FromLongLong
from cpython.ref cimport Py_DECREF

# fastpath.pyx's module functions serve_alloc / serve_shm_close (bound at the first run_batch)
cdef object _wire_serve_alloc = None
cdef object _wire_serve_close = None

cdef enum:
    WIRE_CALL = 0                   # handler(conn, body)
    WIRE_DIRECT_ALLOC = 1           # ShmRequests.serve_alloc_at
    WIRE_DIRECT_CLOSE = 2           # ShmRequests.serve_close_at


cdef inline object _wire_direct(object handler, object conn, int *route):
    """The connection's ShmRequests when a typed entry serves ``handler(conn, ...)``
    (``route`` says which), else None (``route``: WIRE_CALL)."""
    cdef object fn, reqs
    route[0] = WIRE_CALL
    if not PyMethod_Check(handler):
        return None
    fn = <object>PyMethod_GET_FUNCTION(handler)
    if fn is not _wire_serve_alloc and fn is not _wire_serve_close:
        return None
    try:
        reqs = conn.shm_requests
    except Exception:
        return None                 # (the call raises it, as the handler would)
    if type(reqs) is not ShmRequests:
        return None
    route[0] = WIRE_DIRECT_ALLOC if fn is _wire_serve_alloc else WIRE_DIRECT_CLOSE
    return reqs


cdef Py_ssize_t _wire_split(const unsigned char *data, Py_ssize_t end, Py_ssize_t limit,
                            unsigned long long max_frame, wire_frame *out) except -1:
    """Check every header of ``data[0:end]``; fill ``out`` (room for ``limit``
    frames) and return the frame count, or raise ProtocolError."""
    cdef Py_ssize_t pos = 0, n = 0
    cdef unsigned int length, msg_type, flags
    while pos < end:
        if end - pos < WIRE_HEADER_SIZE:
            raise ProtocolError(f"batch ends with a truncated header of {end - pos} bytes")
        length = psv_load_le32(<const char *>data + pos)
        msg_type = data[pos + 4] | (<unsigned int>data[pos + 5] << 8)
        flags = data[pos + 6] | (<unsigned int>data[pos + 7] << 8)
        if length > max_frame:
            raise ProtocolError(f"frame of type {msg_type} announces {length} bytes, "
                                f"more than the limit {max_frame}")
        if flags:
            raise ProtocolError(f"frame of type {msg_type} has flags {flags:#x}; "
                                "the protocol defines none")
        pos += WIRE_HEADER_SIZE
        if <unsigned long long>(end - pos) < length:
            raise ProtocolError(f"batch frame {n} of type {msg_type} announces "
                                f"{length} bytes but only {end - pos} remain")
        if n >= limit:
            raise ProtocolError(f"batch holds more than {limit} requests")
        if out != NULL:
            out[n].start = pos
            out[n].end = pos + length
            out[n].msg_type = msg_type
        n += 1
        pos += length
    return n


cdef wire_frame *_wire_frames(Py_buffer *view, Py_ssize_t limit, unsigned long long max_frame,
                              Py_ssize_t *n) except NULL:
    """The frames of ``view`` (every header checked) in a malloc'd array the caller
    frees; their count in ``n``.  Raises ProtocolError (nothing allocated then)."""
    # room for every frame the body could hold (headers alone), capped by the limit
    cdef Py_ssize_t cap = min(limit, view.len // WIRE_HEADER_SIZE + 1)
    cdef wire_frame *frames = <wire_frame *>malloc((cap + 1) * sizeof(wire_frame))
    if frames == NULL:
        raise MemoryError()
    try:
        n[0] = _wire_split(<const unsigned char *>view.buf, view.len, limit, max_frame, frames)
    except BaseException:
        free(frames)
        raise
    return frames


cdef Py_ssize_t _wire_limit(object limit, object max_frame, unsigned long long *max_out) except -1:
    cdef long long lim = 0, mf = 0
    # (an int beyond 64 bits is clamped, which means "no limit")
    psv_i64_from_obj(limit, &lim)
    psv_i64_from_obj(max_frame, &mf)
    if lim < 0 or mf < 0:
        raise BadParameters(f"limit {limit!r} and max_frame {max_frame!r} must not be negative")
    max_out[0] = <unsigned long long>mf
    return <Py_ssize_t>lim


def split_frames(body, limit, max_frame):
    """``(type, start, end)`` of each frame's body in a batch body.

    ``body``: any C-contiguous bytes-like object.  ``limit``: the most frames
    allowed; ``max_frame``: the largest body a frame may announce.  Every
    header is checked before anything is returned.  Raises ProtocolError for
    a truncated header or body, an oversized frame, non-zero flags, or more
    than ``limit`` frames.
    """
    cdef Py_buffer view
    cdef unsigned long long mf = 0
    cdef Py_ssize_t lim = _wire_limit(limit, max_frame, &mf)
    cdef Py_ssize_t n = 0, i
    cdef wire_frame *frames = NULL
    cdef list result
    PyObject_GetBuffer(body, &view, PyBUF_C_CONTIGUOUS)
    try:
        frames = _wire_frames(&view, lim, mf, &n)
        result = [None] * n
        for i in range(n):
            result[i] = (frames[i].msg_type, frames[i].start, frames[i].end)
        return result
    finally:
        free(frames)
        PyBuffer_Release(&view)


def run_batch(body, limit, max_frame, dict handlers not None, conn, refuse, on_error,
              max_output, counts):
    """Run every frame of a batch body; the reply body (one reply frame per request).

    The body is split first (``split_frames``: a malformed batch runs
    nothing).  Then, in order, each frame of type ``t``:
      - ``handlers[t](conn, body_bytes)`` when ``t`` has a handler and the
        reply so far is at most ``max_output`` bytes; its return value (bytes)
        becomes an OK reply frame, or, if it raises an Exception ``exc``,
        ``on_error(conn, t, exc)`` becomes an ERROR reply frame;
      - otherwise ``refuse(conn, t, t not in handlers)`` becomes an ERROR frame
        (no handler: the type may not be batched; else the output limit).
    ``counts[t]`` grows by one per frame, run or refused (``counts``: a dict or
    a subclass such as Counter, updated with dict's own get and set).  Returns
    the concatenated reply frames.  Raises what ``split_frames`` raises, and
    whatever BaseException (not Exception) a callback raises.
    """
    cdef Py_buffer view
    cdef unsigned long long mf = 0
    cdef Py_ssize_t lim = _wire_limit(limit, max_frame, &mf)
    cdef long long out_limit = 0
    cdef Py_ssize_t n = 0, i, size = 0, total = 0, k
    cdef wire_frame *frames = NULL
    cdef unsigned int code
    cdef const char *src
    cdef char *dst
    cdef list replies
    cdef bytes reply, out
    cdef object handler, key, reqs = None
    cdef int route
    cdef unsigned int run_type = 0
    cdef Py_ssize_t run_len = 0
    global _wire_serve_alloc, _wire_serve_close
    if _wire_serve_alloc is None:
        _wire_serve_alloc = serve_alloc
        _wire_serve_close = serve_shm_close
    psv_i64_from_obj(max_output, &out_limit)
    if not isinstance(counts, dict):
        raise BadParameters(f"counts must be a dict, got {type(counts).__name__}")
    PyObject_GetBuffer(body, &view, PyBUF_C_CONTIGUOUS)
    try:
        frames = _wire_frames(&view, lim, mf, &n)
        src = <const char *>view.buf
        replies = [None] * n
        for i in range(n):
            key = frames[i].msg_type
            handler = handlers.get(key)
            if handler is not None and size <= out_limit:
                reqs = _wire_direct(handler, conn, &route)
                try:
                    if route == WIRE_DIRECT_ALLOC:
                        reply = (<ShmRequests>reqs).serve_alloc_at(
                            <object>PyMethod_GET_SELF(handler), conn, src + frames[i].start,
                            frames[i].end - frames[i].start)
                    elif route == WIRE_DIRECT_CLOSE:
                        reply = (<ShmRequests>reqs).serve_close_at(
                            <object>PyMethod_GET_SELF(handler), conn, src + frames[i].start,
                            frames[i].end - frames[i].start)
                    else:
                        reply = _wire_bytes(handler(conn, PyBytes_FromStringAndSize(
                            src + frames[i].start, frames[i].end - frames[i].start)))
                    code = WIRE_REPLY_OK
                except Exception as exc:
                    reply = _wire_bytes(on_error(conn, key, exc))
                    code = WIRE_REPLY_ERROR
            else:
                reply = _wire_bytes(refuse(conn, key, handler is None))
                code = WIRE_REPLY_ERROR
            if PyBytes_GET_SIZE(reply) > 0xFFFFFFFF:
                raise ProtocolError(f"a reply of {PyBytes_GET_SIZE(reply)} bytes does not fit a frame")
            replies[i] = reply
            # the type of a reply frame rides in the otherwise unused end field
            frames[i].end = code
            size += WIRE_HEADER_SIZE + PyBytes_GET_SIZE(reply)
            # counted per run of frames of one type (flushed when the type changes, and
            # at the end, whatever ends the loop)
            if run_len and frames[i].msg_type != run_type:
                _wire_count(counts, run_type, run_len)
                run_len = 0
            run_type = frames[i].msg_type
            run_len += 1
        _wire_count(counts, run_type, run_len)
        run_len = 0
        total = size
        out = PyBytes_FromStringAndSize(NULL, total)
        dst = PyBytes_AS_STRING(out)
        for i in range(n):
            reply = replies[i]
            k = PyBytes_GET_SIZE(reply)
            psv_store_le32(dst, <unsigned int>k)
            dst[4] = <char>(frames[i].end & 0xFF)
            dst[5] = <char>((frames[i].end >> 8) & 0xFF)
            dst[6] = 0
            dst[7] = 0
            memcpy(dst + WIRE_HEADER_SIZE, PyBytes_AS_STRING(reply), k)
            dst += WIRE_HEADER_SIZE + k
        return out
    finally:
        if run_len:
            _wire_count(counts, run_type, run_len)
        free(frames)
        PyBuffer_Release(&view)


cdef int _wire_count(object counts, unsigned int msg_type, Py_ssize_t n) except -1:
    """``counts[msg_type] += n`` with dict's own get and set (0 when absent)."""
    if n:
        key = msg_type
        count = dict.get(counts, key)
        dict.__setitem__(counts, key, n if count is None else count + n)
    return 0


cdef inline bytes _wire_bytes(object value):
    if type(value) is bytes:
        return <bytes>value
    return bytes(value)


cdef object _wire_shm_type = None       # the client Shm class whose slots _wire_shm_at holds
cdef wire_shm_slots _wire_shm_at
cdef object _wire_one = 1


cdef int _wire_bind_shm(object shm_type) except -1:
    global _wire_shm_type
    if shm_type is _wire_shm_type:
        return 0
    _wire_shm_at.context = _fp_slot(shm_type, "context")
    _wire_shm_at.id = _fp_slot(shm_type, "id")
    _wire_shm_at.size = _fp_slot(shm_type, "size")
    _wire_shm_at.cookie = _fp_slot(shm_type, "cookie")
    _wire_shm_at.desc = _fp_slot(shm_type, "_desc")
    _wire_shm_at.pages = _fp_slot(shm_type, "_pages")
    _wire_shm_at.refs = _fp_slot(shm_type, "_refs")
    _wire_shm_at.user_view = _fp_slot(shm_type, "_user_view")
    _wire_shm_at.views = _fp_slot(shm_type, "_views")
    _wire_shm_type = shm_type
    return 0


cdef tuple _wire_desc(const char *b):
    """``DESC.unpack_from``: "<QqQQQQQIIIHBB" as a tuple of ints."""
    return (PyLong_FromUnsignedLongLong(psv_load_le64(b)),
            PyLong_FromLongLong(<long long>psv_load_le64(b + 8)),
            PyLong_FromUnsignedLongLong(psv_load_le64(b + 16)),
            PyLong_FromUnsignedLongLong(psv_load_le64(b + 24)),
            PyLong_FromUnsignedLongLong(psv_load_le64(b + 32)),
            PyLong_FromUnsignedLongLong(psv_load_le64(b + 40)),
            PyLong_FromUnsignedLongLong(psv_load_le64(b + 48)),
            PyLong_FromUnsignedLongLong(psv_load_le32(b + 56)),
            PyLong_FromUnsignedLongLong(psv_load_le32(b + 60)),
            PyLong_FromUnsignedLongLong(psv_load_le32(b + 64)),
            PyLong_FromUnsignedLongLong(<unsigned char>b[68] | (<unsigned int><unsigned char>b[69] << 8)),
            PyLong_FromUnsignedLongLong(<unsigned char>b[70]),
            PyLong_FromUnsignedLongLong(<unsigned char>b[71]))


def _batch_results(reply, sent, max_frame, list kinds not None, context, dict shms not None,
                   shm_type, fallback):
    """The results of a BATCH_REPLY body to ``sent`` requests (``Batch.run``'s decoding).

    ``reply`` is split as ``split_frames(reply, sent, max_frame)`` does (its
    errors), and must hold ``sent`` frames (ProtocolError otherwise).  Frame
    ``i`` answers a request of type ``kinds[i][0]``; its result is:
      - a new ``shm_type`` for an OK frame of exactly a DESC whose bits name
        no pages and no new segment and whose cookie is not in ``shms``, to a
        request that is not SHM_CLOSE or PING: its slots as
        ``shm_type(context, desc, None, None)`` sets them (``desc`` the DESC
        tuple), and ``shms[cookie]`` is it;
      - None for an OK frame of a CLOSED that dropped no segment, to SHM_CLOSE;
      - otherwise ``fallback(i, frame_type, start, end)``.
    """
    cdef Py_buffer view
    cdef unsigned long long mf = 0
    cdef Py_ssize_t lim = _wire_limit(sent, max_frame, &mf)
    cdef Py_ssize_t n = 0, i, length
    cdef wire_frame *frames = NULL
    cdef const char *src
    cdef list results
    cdef tuple desc
    cdef object kind, shm, cookie
    cdef unsigned int msg_type
    _wire_bind_shm(shm_type)
    PyObject_GetBuffer(reply, &view, PyBUF_C_CONTIGUOUS)
    try:
        frames = _wire_frames(&view, lim, mf, &n)
        if n != lim:
            raise ProtocolError(f"BATCH_REPLY holds {n} replies for {sent} requests")
        if len(kinds) < n:
            raise BadParameters(f"{len(kinds)} request types for {n} replies")
        src = <const char *>view.buf
        results = [None] * n
        for i in range(n):
            kind = (<tuple?>kinds[i])[0]
            msg_type = kind
            length = frames[i].end - frames[i].start
            if frames[i].msg_type == WIRE_REPLY_OK:
                if msg_type == WIRE_SHM_CLOSE:
                    if length == WIRE_CLOSED_SIZE and psv_load_le32(src + frames[i].start + 4) == 0:
                        continue        # (None)
                elif msg_type != WIRE_PING and length == WIRE_DESC_SIZE and \
                        not (<unsigned char>src[frames[i].start + 71] & WIRE_DESC_EXTRAS):
                    desc = _wire_desc(src + frames[i].start)
                    cookie = desc[0]
                    if cookie not in shms:
                        shm = <object>PyType_GenericAlloc(<PyTypeObject *>shm_type, 0)
                        Py_DECREF(shm)  # the allocation's own reference: the one ``shm`` holds stays
                        fp_store(shm, _wire_shm_at.context, context)
                        fp_store(shm, _wire_shm_at.cookie, cookie)
                        fp_store(shm, _wire_shm_at.id, desc[1])
                        fp_store(shm, _wire_shm_at.size, desc[2])
                        fp_store(shm, _wire_shm_at.desc, desc)
                        fp_store(shm, _wire_shm_at.pages, None)
                        fp_store(shm, _wire_shm_at.refs, _wire_one)
                        fp_store(shm, _wire_shm_at.user_view, None)
                        fp_store(shm, _wire_shm_at.views, [])
                        shms[cookie] = shm
                        results[i] = shm
                        continue
            results[i] = fallback(i, frames[i].msg_type, frames[i].start, frames[i].end)
        return results
    finally:
        free(frames)
        PyBuffer_Release(&view)
