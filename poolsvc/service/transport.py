"""Connection I/O of the pool service: read frames, run requests, queue and write replies.

:class:`ConnectionIO` is the part of :class:`~.server.Server` between a
client's socket and the request handlers:

- input: ``recvmsg`` into one preallocated buffer; descriptors that arrive
  with ``SCM_RIGHTS`` are queued for the REGISTER that claims them (at most
  ``protocol.MAX_PENDING_FDS``); the input buffer holds at most one
  incomplete frame (``max_frame``) plus one read;
- requests: every complete frame runs in order through the connection's
  handler table; a failing request gets an ERROR reply and the connection
  stays usable;
- output: replies queue per connection (with the descriptors they carry);
  queued replies beyond ``max_output`` stop the daemon reading that client
  until it reads its replies.  While the loop serves the shm slots that hold
  a request (``_defer_writes``), :meth:`ConnectionIO._flush` only notes the
  connection and the slot kernel puts the clients to ring in ``_bells``; the
  loop rings and writes them once they are all served
  (:meth:`ConnectionIO._write_turn`): the DOORBELLs that wake sleeping
  clients go out together, so the clients they wake do not take the CPU from
  the daemon between two ready requests.

While a trusted app of a call waits (TEE_Wait), the secure world's wait
hook (:meth:`ConnectionIO._wait_serving_cancels`) reads the socket MONITOR
connections of the client process that made the call, so that its CANCEL
reaches the app; every other connection waits for the call to end.

Malformed traffic: a frame header with an oversized length or unknown flags
cannot be resynchronised, so that client gets an ERROR and is disconnected;
an unknown type, a short or long body, or bad arguments get an ERROR reply
and the connection stays usable.  Either way the other clients are served.

Concurrency: the daemon's loop thread only.
"""
from __future__ import annotations

import array
import logging
import math
import os
import select
import socket
import struct
import time
from typing import Any

from ..errors import InternalError, PoolsvcError, ProtocolError
from . import protocol as P
from .connection import CLOSED, CLOSING, HANDSHAKE, READY, Connection, ServerParts
from .sessions import session_owner

log = logging.getLogger("poolsvc.service")

#: Bytes asked of one ``recvmsg``.
RECV_SIZE = 256 << 10
_ANC_SIZE = socket.CMSG_SPACE(P.MAX_FDS_PER_SEND * array.array("i").itemsize)
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_HEADER_SIZE = P.HEADER_SIZE
_unpack_header = P.HEADER.unpack_from
_pack_header = P.HEADER.pack
_OK, _ERROR = int(P.MsgType.OK), int(P.MsgType.ERROR)
_BATCH, _DOORBELL, _HELLO = int(P.MsgType.BATCH), int(P.MsgType.DOORBELL), int(P.MsgType.HELLO)
#: Reply type of each request type whose reply is not OK.
_REPLY_TYPE = {_BATCH: int(P.MsgType.BATCH_REPLY), _HELLO: int(P.MsgType.WELCOME)}
_clock_ns = time.perf_counter_ns


class ConnectionIO(ServerParts):
    """Reading, dispatching and writing for every connection of the daemon."""

    #: The receive buffer every connection reads into (copied out at once).
    _rview: memoryview
    _rbufs: list[memoryview]

    def _init_io(self) -> None:
        self._rview = memoryview(bytearray(RECV_SIZE))
        self._rbufs = [self._rview]
        #: True while the loop serves ready slots: :meth:`_flush` notes, :meth:`_write_turn` writes.
        self._defer_writes = False
        #: Connections noted by :meth:`_flush` meanwhile, in order (repeats are harmless).
        self._unwritten: list[Connection] = []

    # -- input ------------------------------------------------------------------------------------
    def _on_readable(self, conn: Connection) -> None:
        try:
            # Into one preallocated buffer: recvmsg(RECV_SIZE) would allocate (and
            # page-fault) RECV_SIZE bytes per call, ~11 us of a ~14 us round trip.
            nbytes, ancdata, flags, _ = conn.sock.recvmsg_into(self._rbufs, _ANC_SIZE, _CLOEXEC)
            data = self._rview[:nbytes].tobytes()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disconnect(conn, f"receive failed: {exc.strerror}")
            return
        if ancdata:
            self._take_fds(conn, ancdata)
        if flags & _MSG_CTRUNC and conn.state < CLOSING:
            self._violation(conn, ProtocolError("ancillary data truncated (too many descriptors in "
                                                "one message)"))
        if conn.state >= CLOSING:
            if conn.state == CLOSING:
                self._flush(conn)
            return
        if not data:
            why = ("end of stream" if not conn.inbuf
                   else f"end of stream inside a frame ({len(conn.inbuf)} bytes)")
            self._disconnect(conn, why)
            return
        if conn.inbuf:
            conn.inbuf += data
            self._run_inbuf(conn)
        else:
            pos = self._run_frames(conn, data)
            if pos < len(data) and conn.state < CLOSED:
                conn.inbuf = bytearray(data[pos:])
        if conn.out and conn.state < CLOSED:
            self._flush(conn)

    def _run_inbuf(self, conn: Connection) -> None:
        pos = self._run_frames(conn, conn.inbuf)
        if conn.state < CLOSED:
            del conn.inbuf[:pos]

    def _take_fds(self, conn: Connection, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            conn.fds.extend(fds)
        if len(conn.fds) > P.MAX_PENDING_FDS and conn.state < CLOSING:
            self._violation(conn, ProtocolError(f"{len(conn.fds)} descriptors sent without REGISTER "
                                                f"requests to claim them (limit {P.MAX_PENDING_FDS})"))

    def _run_frames(self, conn: Connection, buf: Any) -> int:
        """Run the complete frames at the start of ``buf``; returns the bytes consumed.

        Stops early when the client's unread replies exceed ``max_output``
        (the rest waits in the input buffer until the client reads).
        """
        if conn.batch is not None:
            return 0  # a BATCH is being served in slices: the rest waits for it
        pos, end = 0, len(buf)
        max_frame = self.settings.max_frame
        max_output = self.settings.max_output
        request = self._request
        queue = self._queue
        slot = conn.slot is not None
        while end - pos >= _HEADER_SIZE:
            length, msg_type, flags = _unpack_header(buf, pos)
            if length > max_frame or flags:
                try:
                    P.parse_header(buf, pos, max_frame)
                except ProtocolError as exc:
                    self._violation(conn, exc)
                return pos
            if end - pos - _HEADER_SIZE < length:
                break
            start = pos + _HEADER_SIZE
            pos = start + length
            if msg_type == _DOORBELL and slot:
                self._admit(conn)  # a request in its parked slot: the loop polls it next
                continue
            if msg_type == _BATCH and self._start_batch(conn, buf[start:pos]):
                break
            queue(conn, request(conn, msg_type, buf[start:pos]))
            if conn.state != READY or conn.out_bytes > max_output:
                break
        return pos

    def _violation(self, conn: Connection, exc: ProtocolError) -> None:
        """A client broke the framing: queue an ERROR saying why, then hang up."""
        self.metrics.protocol_errors += 1
        self.metrics.errors[P.code_of(exc)] += 1
        self._log_limited("violation", logging.WARNING, "%s: %s; disconnecting it", conn.label(), exc)
        conn.inbuf = bytearray()
        conn.state = CLOSING
        self._drop_slot(conn)
        self._queue(conn, P.frame(P.MsgType.ERROR, P.error_body(exc)))

    def _wait_serving_cancels(self, session: Any, timeout: float | None) -> bool:
        """The secure world's wait hook: wait until ``session`` is cancelled (True) or
        ``timeout`` seconds (None: forever) have passed (False).

        Meanwhile the socket MONITOR connections of the process that owns the
        session are read and their frames run through the normal path (PING,
        STATS and CANCEL: none reaches the System's allocation paths), so that
        its CANCEL reaches the app.  Every other connection waits, as for any
        trusted-app call (the wait is bounded by ``max_ta_wait_ms``).
        """
        cancelled = session.cancelled
        owner = session_owner(self.connections.values(), session.id)
        if owner is None:
            return bool(cancelled.wait(timeout))
        watched = {conn.fileno: conn for conn in self.connections.values()
                   if conn.role == P.Role.MONITOR and conn.pid == owner.pid and conn.state == READY
                   and conn.slot is None and conn.reading}
        poller = select.poll()
        for fd in watched:
            poller.register(fd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        outer_fds, self._reply_fds = self._reply_fds, []  # the suspended call's reply keeps its own
        self._write_turn()  # the slots served before this call do not wait for the app
        deferring, self._defer_writes = self._defer_writes, False  # replies to CANCEL go out at once
        try:
            while not cancelled.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if not watched:
                    return bool(cancelled.wait(left))
                for fd, _ in poller.poll(None if left is None else max(1, math.ceil(left * 1000))):
                    conn = watched[fd]
                    if conn.state < CLOSED:
                        self._on_readable(conn)
                    if conn.state != READY or not conn.reading:  # gone, or not reading its replies
                        poller.unregister(fd)
                        del watched[fd]
            return True
        finally:
            self._reply_fds = outer_fds
            self._defer_writes = deferring

    # -- requests --------------------------------------------------------------------------------
    def _request(self, conn: Connection, msg_type: int, body: Any) -> bytes:
        """Run one request frame; its reply frame (descriptors wait in ``_reply_fds``)."""
        t0 = _clock_ns()
        conn.requests += 1
        handler = conn.handlers.get(msg_type)
        held = len(self._reply_fds)  # earlier requests' descriptors, due to go with their replies
        try:
            if handler is None:
                if conn.state == HANDSHAKE:
                    raise ProtocolError(f"first message must be HELLO, got {P.type_name(msg_type)} "
                                        f"({msg_type})")
                raise P.UnknownType(f"message type {P.type_name(msg_type)} ({msg_type}) is not a request "
                                    f"served on a {conn.role.name} connection")
            reply = handler(conn, body)
            reply_type = _REPLY_TYPE.get(msg_type, _OK)
        except Exception as exc:
            reply_type = _ERROR
            reply = self._failed(conn, msg_type, exc, held)
        metrics = self.metrics
        ring = metrics.rings.get(msg_type)
        if ring is None:  # first of its type, or not a type at all: bounded either way
            metrics.record(msg_type, _clock_ns() - t0)
        else:
            count = ring.count
            ns = _clock_ns() - t0
            ring.samples[count % ring.size] = ns
            ring.count = count + 1
            ring.total_ns += ns
            if msg_type != _BATCH:
                metrics.ops[msg_type] += 1
        return _pack_header(len(reply), reply_type, 0) + reply

    def _failed(self, conn: Connection, msg_type: int, exc: Exception, held: int) -> bytes:
        """The ERROR body of a request whose handler raised ``exc``: the descriptors it
        left after the first ``held`` of ``_reply_fds`` are closed, and a failed HELLO
        ends the connection (the shm slot's kernel calls this too)."""
        for fd in self._reply_fds[held:]:  # none in practice: descriptors are taken last
            os.close(fd)
        del self._reply_fds[held:]
        if conn.state == HANDSHAKE:
            self._drop_slot(conn)
            conn.state = CLOSING
            self.metrics.refused += 1
        return self._error(conn, msg_type, exc)

    def _error(self, conn: Connection, msg_type: int, exc: Exception) -> bytes:
        """The ERROR body for a failed request (and its logging and counting)."""
        if isinstance(exc, struct.error):
            exc = ProtocolError(f"malformed {P.type_name(msg_type)} body: {exc}")
        if isinstance(exc, PoolsvcError) and not isinstance(exc, InternalError):
            log.debug("%s: %s failed: %s", conn.label(), P.type_name(msg_type), exc)
        else:
            log.error("%s: %s failed unexpectedly", conn.label(), P.type_name(msg_type),
                      exc_info=exc)
        self.metrics.errors[P.code_of(exc)] += 1
        return P.error_body(exc)

    def _queue(self, conn: Connection, data: bytes) -> None:
        fds = self._reply_fds
        out = conn.out
        if fds:
            out.append([data, fds])
            self._reply_fds = []
        elif out and not out[-1][1]:
            out[-1][0] += data
        else:
            out.append([bytearray(data), ()])
        conn.out_bytes += len(data)

    # -- output -----------------------------------------------------------------------------------
    def _flush(self, conn: Connection) -> None:
        """Write ``conn``'s queued replies (:meth:`_write`): now, or, while the loop
        serves ready slots, once they are all served (:meth:`_write_turn`)."""
        if self._defer_writes:
            self._unwritten.append(conn)
        else:
            self._write(conn)

    def _write_turn(self) -> None:
        """Ring the doorbells the slot kernel left in ``_bells``, then write the replies
        of every connection :meth:`_flush` noted, in order."""
        bells = self._bells
        if bells:
            self._bells = []
            ring = self._ring
            for conn in bells:
                if conn.state < CLOSED:
                    ring(self, conn)
        noted = self._unwritten
        if noted:
            self._unwritten = []
            for conn in noted:
                if conn.state < CLOSED:
                    self._write(conn)

    def _write(self, conn: Connection) -> None:
        """Write queued replies until done or the socket is full; resume reading if drained."""
        sock = conn.sock
        out = conn.out
        while True:
            try:
                while out:
                    item = out[0]
                    data, fds = item
                    if fds:
                        head = fds[:P.MAX_FDS_PER_SEND]
                        chunk = data if len(fds) <= P.MAX_FDS_PER_SEND else data[:1]
                        sent = sock.sendmsg([chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", head))])
                        for fd in head:
                            os.close(fd)
                        item[1] = fds[len(head):]
                    else:
                        sent = sock.send(data)
                    conn.out_bytes -= sent
                    if sent == len(data) and not item[1]:
                        out.popleft()
                    else:
                        item[0] = data[sent:] if item[1] else bytearray(data[sent:])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._disconnect(conn, f"send failed: {exc.strerror}")
                return
            if not out and conn.state == CLOSING:
                self._disconnect(conn, "goodbye" if conn.goodbye else "refused")
                return
            # Frames left waiting for the client to read its replies?
            if (conn.inbuf and conn.state == READY and conn.batch is None
                    and conn.out_bytes <= self.settings.max_output
                    and len(conn.inbuf) >= _HEADER_SIZE):
                before = len(conn.inbuf)
                self._run_inbuf(conn)
                if conn.state == CLOSED:
                    return
                if len(conn.inbuf) != before and out:
                    continue
            break
        self._update_interest(conn)

    def _update_interest(self, conn: Connection) -> None:
        want_write = bool(conn.out)
        want_read = (conn.out_bytes <= self._max_output and conn.state == READY
                     and conn.batch is None)
        if want_write == conn.writing and want_read == conn.reading:
            return
        conn.writing, conn.reading = want_write, want_read
        events = (_EPOLLIN if want_read else 0) | (_EPOLLOUT if want_write else 0)
        assert self._ep is not None
        # No events at all (a BATCH in slices, nothing to write): the registration
        # stays, and epoll still reports a hang-up.
        self._ep.modify(conn.fileno, events)


__all__ = ["RECV_SIZE", "ConnectionIO"]
