"""The client of the pool service: ``connect(path)`` and the System/Context/Shm API.

``connect(path)`` returns a :class:`Client`, a handle with the embedded
System's API (DESIGN.md section 9), so that code written against
``poolsvc.System`` runs unchanged against a daemon:

- ``Client.open_context()`` opens one connection to the daemon, which owns
  one Context for it (as opening ``/dev/tee0`` gives one file);
- ``Context.alloc_*_buf`` return :class:`Shm` handles whose ``view()`` is a
  zero-copy window on the context's own storage, mapped from descriptors
  the daemon passes with ``SCM_RIGHTS`` (never another client's);
- ``Context.register_*_buf(obj)`` finds the POSIX shm object behind ``obj``
  in this process's memory maps and sends its descriptor, offset and length;
  the daemon maps the same object and registers it, so both sides see the
  same bytes;
- ``Context.open_session(uuid)`` returns a :class:`Session` whose
  ``invoke(func, params)`` runs in the daemon's secure world;
- ``Context.batch()`` collects many operations into one round trip.

Differences from the embedded System, by design: ``phys`` and ``tee`` (raw
physical memory and raw secure-world messages) are not offered, since they
would reach other clients' memory; ``view()`` of a buffer from the reserved
static pool raises NotSupported, since the carve-out is one object shared by
all clients and its descriptor is never sent; ``stats()`` returns the
System's figures plus a ``"service"`` entry with the daemon's own.

Transports (``connect(path, transport=...)``): ``"shm"``, the default, asks
the daemon (protocol version 2) for a shared-memory request/reply slot per
connection; ordinary requests and replies then go through the slot, with a
short adaptive poll for the reply before sleeping on the socket until a
DOORBELL, and the socket carries only descriptors, wake-ups and what does not
fit the slot.  ``"socket"`` sends every frame on the Unix socket (version 1).
A daemon that offers no slot gives the socket transport either way.

``Shm.close()`` is pipelined: the request is queued and leaves in the same
``sendmsg`` as the context's next request (or on ``Context.flush()``,
``Client.stats()``, ``Context.close()``), and its reply is read with that
request's.  An alloc+free pair therefore costs one round trip and one system
call each way, like a bare socket round trip.  Until then the daemon still
counts the buffer as used; the client has already let go of it.

Concurrency: a Client and its contexts belong to one thread at a time (as
an embedded System does).  Each context is its own socket, so different
threads may use different contexts.
"""
from __future__ import annotations

import array
import errno
import json
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections import deque
from typing import Any, Callable, NoReturn, Sequence

import numpy as np

from ..constants import PAGE_SIZE, ShmFlags
from ..errors import BadParameters, Closed, NotSharedMemory, NotSupported, PoolsvcError, ProtocolError
from . import protocol as P
from .settings import default_socket_path

log = logging.getLogger("poolsvc.client")

_RECV_SIZE = 256 << 10
_ANC_SIZE = socket.CMSG_SPACE(P.MAX_FDS_PER_SEND * array.array("i").itemsize)
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
#: Pipelined requests whose replies a channel reads before sending more.
MAX_IN_FLIGHT = 64
#: Default time a client polls for a reply before sleeping in ``recvmsg``,
#: in microseconds (see :func:`connect`).  0: measured on the 2-core test
#: machine, polling gained nothing and, with the daemon polling too, lost 5x.
DEFAULT_SPIN_US = 0


_unpack_desc = P.DESC.unpack_from
_DESC_SIZE = P.DESC.size
_PAGES_FOLLOW = int(P.DescBits.PAGES_FOLLOW)
_NEW_SEGMENT = int(P.DescBits.NEW_SEGMENT)
_REGISTERED = int(P.DescBits.REGISTERED)
_ARENA = int(P.Backing.ARENA)
_USER = int(P.Backing.USER)
#: ShmFlags values by int (building an IntFlag costs microseconds).
_FLAGS: dict[int, ShmFlags] = {}
#: Transports a client may ask for (see :func:`connect`).
TRANSPORTS = ("socket", "shm")
#: Default transport of :func:`connect`.
DEFAULT_TRANSPORT = "shm"
#: Default longest time a shm-slot client polls its slot for a reply before
#: it sleeps on the socket, in microseconds (adaptive below that).
DEFAULT_SHM_SPIN_US = 200
_HEADER_SIZE = P.HEADER_SIZE
_unpack_header = P.HEADER.unpack_from
_pack_header = P.HEADER.pack
_DOORBELL = int(P.MsgType.DOORBELL)
_OK = int(P.MsgType.OK)
_ERROR = int(P.MsgType.ERROR)
_PING = int(P.MsgType.PING)
_ALLOC = int(P.MsgType.ALLOC)
_pack_alloc = P.ALLOC.pack
#: Whole ALLOC and SHM_CLOSE frames (header and body) in one struct call.
_pack_alloc_frame = struct.Struct("<" + P.HEADER.format.lstrip("<") + P.ALLOC.format.lstrip("<")).pack
_pack_close_frame = struct.Struct("<" + P.HEADER.format.lstrip("<") + P.COOKIE.format.lstrip("<")).pack
_ALLOC_BODY, _COOKIE_BODY = P.ALLOC.size, P.COOKIE.size
_ALLOC_USER, _ALLOC_KERNEL, _ALLOC_PRIV = int(P.AllocKind.USER), int(P.AllocKind.KERNEL), int(P.AllocKind.PRIV)
_SHM_CLOSE = int(P.MsgType.SHM_CLOSE)
_pack_cookie = P.COOKIE.pack
_unpack_closed = P.CLOSED.unpack
_unpack_closed_from = P.CLOSED.unpack_from
_CLOSED_SIZE = P.CLOSED.size
_GOODBYE = int(P.MsgType.GOODBYE)
_W_REQ_SEQ, _W_REQ_LEN, _W_CLIENT_SLEEPING = P.W_REQ_SEQ, P.W_REQ_LEN, P.W_CLIENT_SLEEPING
_W_REP_SEQ, _W_REP_LEN, _W_DAEMON_SLEEPING = P.W_REP_SEQ, P.W_REP_LEN, P.W_DAEMON_SLEEPING
_REQ_OFF, _REQ_CAP, _REP_OFF, _REP_CAP = P.SLOT_REQ_OFF, P.SLOT_REQ_CAP, P.SLOT_REP_OFF, P.SLOT_REP_CAP
_fence_lock = threading.Lock()


def _fence() -> None:
    """Full memory barrier (see ``server.fence``)."""
    _fence_lock.acquire()
    _fence_lock.release()


class _Channel:
    """One connection: framing, descriptor queue, pipelined replies, mapped segments."""

    def __init__(self, path: str, role: P.Role, name: str, spin_us: float,
                 timeout: float | None, transport: str = DEFAULT_TRANSPORT,
                 shm_spin_us: float = DEFAULT_SHM_SPIN_US) -> None:
        self.path = path
        self.spin = max(0.0, spin_us) / 1e6
        self.timeout = timeout
        self.sock = self._connect()
        self.buf = bytearray()
        #: Receive into one preallocated buffer: recvmsg(n) allocates n bytes per call.
        self.rview = memoryview(bytearray(_RECV_SIZE))
        self.rbufs = [self.rview]
        #: Replies read from the slot, not yet handed out, and the read position.
        self.sbuf = b""
        self.spos = 0
        self.slot: mmap.mmap | None = None
        self.words: memoryview | None = None
        #: The daemon's eventfd doorbell for this connection (-1: DOORBELL frames).
        self.bell = -1
        self.seq = 0
        self.max_slot_spin = max(0.0, shm_spin_us) / 1e6
        self.slot_spin = self.max_slot_spin
        self.outbox = bytearray()
        self.fds: deque[int] = deque()
        self.pending: deque[Callable[[int, memoryview], None]] = deque()
        #: Cookies of the pipelined SHM_CLOSE requests, in order.
        self.close_cookies: deque[int] = deque()
        self.segments: dict[int, mmap.mmap] = {}
        self.stale: list[mmap.mmap] = []
        self.closed = False
        self.on_lost: Callable[[], None] | None = None
        self.max_frame = P.DEFAULT_MAX_FRAME
        if transport not in TRANSPORTS:
            self.close()
            raise BadParameters(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        raw_name = P.encode_name(name)
        try:
            if transport == "shm":
                hello = P.HELLO2.pack(P.MAGIC, P.VERSION_2, role,
                                      P.Feature.SHM_SLOT | P.Feature.EVENTFD_BELL) + raw_name
                reply_type, body = self.call(P.MsgType.HELLO, hello)
                if reply_type == P.MsgType.ERROR and P.ERROR.unpack_from(body)[0] == P.ErrorCode.VERSION:
                    # A version-1 daemon: it has hung up; speak version 1 on a new connection.
                    self.sock.close()
                    self.buf.clear()
                    self.sock = self._connect()
                    transport = "socket"
            if transport == "socket":
                reply_type, body = self.call(P.MsgType.HELLO, P.HELLO.pack(P.MAGIC, P.VERSION, role)
                                             + raw_name)
            if reply_type != P.MsgType.WELCOME or len(body) < P.WELCOME.size:
                if reply_type == P.MsgType.ERROR:
                    raise P.error_from_body(body)
                raise ProtocolError(f"daemon answered HELLO with {P.type_name(reply_type)} of "
                                    f"{len(body)} bytes")
            fields = P.WELCOME.unpack_from(body)
            name_at = P.WELCOME.size
            if fields[0] >= P.VERSION_2:
                if len(body) < name_at + P.WELCOME_EXT.size:
                    raise ProtocolError(f"version {fields[0]} WELCOME of {len(body)} bytes is too short")
                granted, slot_bytes = P.WELCOME_EXT.unpack_from(body, name_at)
                name_at += P.WELCOME_EXT.size
                if granted & P.Feature.SHM_SLOT:
                    self._map_slot(slot_bytes, bool(granted & P.Feature.EVENTFD_BELL))
        except BaseException:
            self.close()
            raise
        (self.version, pool, self.daemon_pid, self.cid, self.sec_caps, self.gen_caps,
         self.max_batch, self.max_frame, self.dynamic_base, self.dynamic_size, self.static_base,
         self.static_size) = fields
        self.transport = "shm" if self.slot is not None else "socket"
        self.pool = "dynamic" if pool == 0 else "static"
        self.context_name = bytes(body[name_at:]).decode("utf-8", "replace")

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise Closed(f"cannot connect to the pool service at {self.path}: "
                         f"{exc.strerror or exc}") from exc
        return sock

    def _map_slot(self, size: int, bell: bool) -> None:
        """Map the slot whose descriptor came with WELCOME and check its header;
        keep the eventfd doorbell that follows it when granted."""
        if len(self.fds) < 1 + bell:
            raise ProtocolError("daemon granted a shm slot without sending its descriptor(s)")
        fd = self.fds.popleft()
        if bell:
            self.bell = self.fds.popleft()
        try:
            if size != P.SLOT_BYTES or os.fstat(fd).st_size != size:
                raise ProtocolError(f"daemon's shm slot is {os.fstat(fd).st_size} bytes, announced "
                                    f"{size}, expected {P.SLOT_BYTES}")
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        words = memoryview(mm)[:P.SLOT_WORDS * 8].cast("Q")
        if tuple(words[:6]) != P.slot_header():
            words.release()
            mm.close()
            raise ProtocolError("daemon's shm slot has an unknown layout")
        self.slot, self.words = mm, words
        self.seq = words[_W_REQ_SEQ]

    # -- sending -----------------------------------------------------------------------------
    def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self.closed:
            raise Closed("connection to the pool service is closed")
        try:
            if fds:
                sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", fds))])
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except OSError as exc:
            self._lost(f"send failed: {exc.strerror or exc}")

    def post(self, msg_type: int, body: bytes, on_reply: Callable[[int, memoryview], None]) -> None:
        """Queue a request without waiting; it leaves with the next call (or :meth:`drain`).

        ``on_reply`` runs when its reply is read, in order.  Queued requests
        ride in the same ``sendmsg`` as the next request, so a pipelined
        close costs no system call and no wake-up of its own.
        """
        self.outbox += P.HEADER.pack(len(body), msg_type, 0) + body
        self.pending.append(on_reply)
        if len(self.pending) >= MAX_IN_FLIGHT:
            self.drain()

    def call_frame(self, frame: bytes, fds: Sequence[int] = (), slot_ok: bool = True) -> tuple[int, memoryview]:
        """Send one request already framed and return its reply ``(type, body)``
        (the replies of earlier pipelined requests are handled first).

        Through the slot when there is one and ``slot_ok`` (no descriptors, not
        GOODBYE, room in the request area); else on the socket.
        """
        if slot_ok and self.words is not None and len(self.outbox) + len(frame) <= _REQ_CAP:
            if self.outbox:
                frame = bytes(self.outbox) + frame
                self.outbox.clear()
            self._slot_send(frame)
        else:
            if self.outbox:
                if fds:  # descriptors ride on the first byte: send the queue first
                    self._send(bytes(self.outbox))
                else:
                    frame = bytes(self.outbox) + frame
                self.outbox.clear()
            self._send(frame, fds)
        while self.pending:
            handler = self.pending.popleft()
            handler(*self._read_frame())
        return self._read_frame()

    def call(self, msg_type: int, body: bytes = b"", fds: Sequence[int] = ()) -> tuple[int, memoryview]:
        """Send a request and return its reply ``(type, body)`` (earlier replies first)."""
        return self.call_frame(_pack_header(len(body), msg_type, 0) + body, fds,
                               not fds and msg_type != _GOODBYE)

    def drain(self) -> None:
        """Send queued requests and read the replies of every pipelined request."""
        if self.outbox:
            data = bytes(self.outbox)
            self.outbox.clear()
            if self.words is not None and len(data) <= _REQ_CAP:
                self._slot_send(data)
            else:
                self._send(data)
        while self.pending:
            handler = self.pending.popleft()
            handler(*self._read_frame())

    # -- the shm slot --------------------------------------------------------------------------
    def _slot_send(self, data: bytes) -> None:
        """Publish request frames in the slot, wait for the reply, stage it in ``sbuf``.

        Polls the daemon's reply sequence for an adaptive window (at most
        ``shm_spin_us``), yielding the CPU between polls; then marks itself
        sleeping and blocks on the socket until a DOORBELL (the daemon rings
        only when the mark is set; the mark is followed by one more look, so
        that a reply published meanwhile is not missed).
        """
        if self.closed:
            raise Closed("connection to the pool service is closed")
        words = self.words
        slot = self.slot
        assert words is not None and slot is not None
        n = len(data)
        slot[_REQ_OFF:_REQ_OFF + n] = data
        words[_W_REQ_LEN] = n
        seq = self.seq = self.seq + 1
        words[_W_REQ_SEQ] = seq
        _fence()
        if words[_W_DAEMON_SLEEPING]:
            if self.bell >= 0:
                try:
                    os.eventfd_write(self.bell, 1)
                except OSError as exc:  # EAGAIN: the counter is full, the daemon is awake anyway
                    if exc.errno != errno.EAGAIN:
                        self._lost(f"doorbell failed: {exc.strerror or exc}")
            else:
                self._send(P.DOORBELL_FRAME)
        if words[_W_REP_SEQ] != seq:
            # Adaptive window: widened to twice the latest wait when that was
            # within the bound (polling would have caught it), halved after a
            # wait beyond the bound (the daemon is busy: sleep sooner).
            clock = time.perf_counter
            start = clock()
            deadline = start + self.slot_spin
            yield_ = os.sched_yield
            # Yield every few polls: alone on its CPU a yield returns at once
            # (~0.3 us), and when the scheduler has put the daemon on this CPU
            # it lets the daemon run instead of waiting for preemption (a poll
            # that never yields made each such hand-off cost ~120 us; polling
            # hot for 3-10 us before yielding, 15-30 us).
            polls = 0
            while words[_W_REP_SEQ] != seq:
                polls += 1
                if not polls & 3:
                    if clock() > deadline:
                        self._slot_sleep(seq)
                        break
                    yield_()
            waited = clock() - start
            if waited <= self.max_slot_spin:
                self.slot_spin = min(self.max_slot_spin, max(self.slot_spin, 2 * waited))
            else:
                self.slot_spin = max(2e-6, self.slot_spin / 2)
        length = words[_W_REP_LEN]
        if length == P.REP_ON_SOCKET:
            return  # the replies follow on the socket
        if length > _REP_CAP:
            self._lost(f"daemon wrote a slot reply of {length} bytes, more than {_REP_CAP}")
        self.sbuf = slot[_REP_OFF:_REP_OFF + length]
        self.spos = 0

    def _slot_sleep(self, seq: int) -> None:
        words = self.words
        assert words is not None
        words[_W_CLIENT_SLEEPING] = 1
        _fence()
        try:
            while words[_W_REP_SEQ] != seq:
                self._fill()
                self._skip_doorbells()
        finally:
            if self.words is not None:
                words[_W_CLIENT_SLEEPING] = 0

    def _skip_doorbells(self) -> None:
        buf = self.buf
        while len(buf) >= _HEADER_SIZE and buf[:_HEADER_SIZE] == P.DOORBELL_FRAME:
            del buf[:_HEADER_SIZE]

    # -- receiving ---------------------------------------------------------------------------
    def _read_frame(self) -> tuple[int, memoryview]:
        sbuf = self.sbuf
        if sbuf:
            pos = self.spos
            if len(sbuf) - pos >= _HEADER_SIZE:
                length, msg_type, flags = _unpack_header(sbuf, pos)
                end = pos + _HEADER_SIZE + length
                if not flags and end <= len(sbuf):
                    if end == len(sbuf):
                        self.sbuf = b""
                    else:
                        self.spos = end
                    return msg_type, memoryview(sbuf)[pos + _HEADER_SIZE:end]
            self._lost(f"daemon wrote a malformed reply into the slot at byte {pos}")
        buf = self.buf
        while True:
            if len(buf) >= _HEADER_SIZE:
                length, msg_type, flags = _unpack_header(buf)
                if length > P.MAX_REPLY_FRAME or flags:
                    self._lost(f"daemon sent a malformed header (length {length}, flags {flags:#x})")
                end = _HEADER_SIZE + length
                if len(buf) >= end:
                    body = memoryview(bytes(buf[_HEADER_SIZE:end]))
                    del buf[:end]
                    if msg_type == _DOORBELL and self.words is not None:
                        continue
                    return msg_type, body
            self._fill()

    def _fill(self) -> None:
        sock = self.sock
        data = None
        try:
            if self.spin:
                deadline = time.perf_counter() + self.spin
                while True:
                    try:
                        nbytes, anc, flags, _ = sock.recvmsg_into(self.rbufs, _ANC_SIZE,
                                                                  socket.MSG_DONTWAIT | _CLOEXEC)
                        data = self.rview[:nbytes].tobytes()
                        break
                    except BlockingIOError:
                        if time.perf_counter() > deadline:
                            break
                        os.sched_yield()
            if data is None:
                nbytes, anc, flags, _ = sock.recvmsg_into(self.rbufs, _ANC_SIZE, _CLOEXEC)
                data = self.rview[:nbytes].tobytes()
        except socket.timeout:
            self._lost("timed out waiting for the daemon")
        except OSError as exc:
            self._lost(f"receive failed: {exc.strerror or exc}")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            self._lost("the daemon closed the connection")
        self.buf += data

    def _lost(self, why: str) -> NoReturn:
        self.close()
        if self.on_lost is not None:
            self.on_lost()
        raise Closed(f"connection to the pool service at {self.path} lost: {why}")

    # -- segments ------------------------------------------------------------------------------
    def map_segment(self, token: int, size: int) -> None:
        """Map the segment whose descriptor came with the reply just read."""
        while not self.fds and self.words is not None:  # it comes on the socket, ahead of the slot reply
            self._fill()
            self._skip_doorbells()
        if not self.fds:
            raise ProtocolError(f"daemon announced segment {token} without sending its descriptor")
        fd = self.fds.popleft()
        try:
            self.segments[token] = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def unmap_segment(self, token: int) -> None:
        mm = self.segments.pop(token, None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive; retry at close
                self.stale.append(mm)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        if self.bell >= 0:
            os.close(self.bell)
            self.bell = -1
        self.sbuf = b""
        if self.words is not None:
            self.words.release()
            self.words = None
        if self.slot is not None:
            self.slot.close()
            self.slot = None
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        for token in list(self.segments):
            self.unmap_segment(token)
        for mm in self.stale:
            try:
                mm.close()
            except BufferError:
                pass
        self.stale.clear()


def _check_reply(reply_type: int, body: memoryview, what: str) -> memoryview:
    if reply_type == _OK:
        return body
    if reply_type == P.MsgType.ERROR:
        raise P.error_from_body(body)
    raise ProtocolError(f"daemon answered {what} with {P.type_name(reply_type)}")


def _check_size(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise BadParameters(f"size must be an int, got {size!r}")
    if size <= 0:
        raise BadParameters(f"size {size} must be positive")
    if size >= 1 << 63:
        raise BadParameters(f"size {size} does not fit in the 64-bit field of the protocol")


class Shm:
    """A shared-memory object held through the daemon (the embedded Shm's API).

    Attributes: ``id``, ``size``, ``offset``, ``flags``, ``pages`` (numpy
    uint64), ``paddr``, ``cookie``, ``registered``; ``view()`` and ``close()``.
    """

    __slots__ = ("context", "id", "size", "offset", "flags", "cookie", "paddr", "registered",
                 "_first", "_npages", "_pages", "_refs", "_backing", "_token", "_seg_offset",
                 "_user_view", "_views", "__weakref__")

    def __init__(self, context: "Context", desc: tuple, pages: np.ndarray | None,
                 user_view: memoryview | None) -> None:
        (cookie, shm_id, size, first, paddr, seg_offset, _seg_bytes, offset, npages, token, flags,
         backing, bits) = desc
        self.context = context
        self.cookie = cookie
        self.id = shm_id
        self.size = size
        self.offset = offset
        known = _FLAGS.get(flags)
        self.flags = known if known is not None else _FLAGS.setdefault(flags, ShmFlags(flags))
        self.paddr = None if paddr == P.NO_PADDR else paddr
        self.registered = bool(bits & _REGISTERED)
        self._first = first
        self._npages = npages
        self._pages = pages
        self._refs = 1
        self._backing = backing
        self._token = token
        self._seg_offset = seg_offset
        self._user_view = user_view
        self._views: list[memoryview] = []

    @property
    def pages(self) -> np.ndarray:
        """Physical address of each 4 KiB page (numpy uint64, read-only)."""
        if self._pages is None:
            pages = np.arange(self._first, self._first + self._npages * PAGE_SIZE, PAGE_SIZE,
                              dtype=np.uint64)
            pages.flags.writeable = False
            self._pages = pages
        return self._pages

    @property
    def page_run(self) -> tuple[int, int] | None:
        """``(PA of the first page, page count)`` when the pages are physically
        consecutive, else None (read ``pages`` then); builds no array."""
        return None if self.paddr is None else (self._first, self._npages)

    @property
    def closed(self) -> bool:
        return self._refs <= 0

    def _check(self) -> None:
        if self._refs <= 0:
            raise Closed(f"shm (id {self.id}, cookie {self.cookie:#x}) is released")

    def view(self) -> memoryview:
        """A writable zero-copy memoryview of the buffer (released when the Shm is).

        NotSupported for a buffer of the reserved static pool (see the module doc).
        """
        self._check()
        if self._backing == _ARENA:
            mm = self.context._channel.segments.get(self._token)
            if mm is None:
                raise Closed(f"storage segment {self._token} of shm {self.cookie:#x} is not mapped")
            base = memoryview(mm)
            view = base[self._seg_offset:self._seg_offset + self.size]
            base.release()
        elif self._backing == _USER:
            assert self._user_view is not None
            view = self._user_view[:]
        else:
            raise NotSupported("the reserved static carve-out is shared by every client of the "
                               "daemon, so its descriptor is never sent: view() of a static-pool "
                               "buffer is not available through the pool service")
        self._views.append(view)
        return view

    def close(self) -> None:
        """Drop one reference; the last one frees the memory (pipelined: no round trip)."""
        refs = self._refs - 1
        if refs < 0:
            self._check()  # raises Closed
        self._refs = refs
        ctx = self.context
        if refs == 0:
            self._release_local()
        ctx._post_close(self)

    def _release_local(self) -> None:
        self._refs = 0
        if self._views:
            for view in self._views:
                try:
                    view.release()
                except BufferError:
                    pass
            self._views.clear()
        if self._user_view is not None:
            try:
                self._user_view.release()
            except BufferError:
                pass
        self.context.shms.pop(self.cookie, None)

    def __enter__(self) -> "Shm":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.close()

    def __repr__(self) -> str:
        state = "released" if self.closed else f"refs={self._refs}"
        paddr = f"{self.paddr:#x}" if self.paddr is not None else "scattered"
        return (f"<remote Shm id={self.id} size={self.size:#x} offset={self.offset:#x} "
                f"flags={self.flags!r} pages={self._npages} paddr={paddr} {state}>")


class Session:
    """A session with a trusted app in the daemon's secure world."""

    def __init__(self, context: "Context", session_id: int, uuid: Any) -> None:
        self.context = context
        self.id = session_id
        self.uuid = uuid
        self.closed = False
        self.open_result: Any = None

    def invoke(self, func: int, params: Sequence[Any] = ()) -> Any:
        """INVOKE_COMMAND ``func`` with up to 4 params; returns an InvokeResult.

        Raises TeeError (with ``result``) on a non-zero answer, like the embedded Session.
        """
        if self.closed:
            raise Closed(f"session {self.id} is closed")
        return self.context._invoke(self, func, params)

    def close(self) -> None:
        """CLOSE_SESSION. Idempotent."""
        if self.closed:
            return
        self.closed = True
        ctx = self.context
        ctx.sessions.pop(self.id, None)
        if ctx.closed:
            return
        reply_type, body = ctx._channel.call(P.MsgType.CLOSE_SESSION, P.COOKIE.pack(self.id))
        _check_reply(reply_type, body, "CLOSE_SESSION")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<remote Session {self.id} {self.uuid}{' closed' if self.closed else ''}>"


class Context:
    """A context in the daemon's System, over its own connection."""

    def __init__(self, client: "Client", name: str = "") -> None:
        self.client = client
        self._channel = _Channel(client.path, P.Role.CONTEXT, name, client.spin_us, client.timeout,
                                 client.transport, client.shm_spin_us)
        self.cid = self._channel.cid
        self.name = self._channel.context_name
        self.shms: dict[int, Shm] = {}
        self.sessions: dict[int, Session] = {}
        self.closed = False
        #: Errors of pipelined closes, as (cookie, exception); normally empty.
        self.deferred_errors: list[tuple[int, PoolsvcError]] = []
        self._channel.on_lost = self._lost

    def _lost(self) -> None:
        """The daemon is gone: so is everything it held for us."""
        if self.closed:
            return
        self.closed = True
        for session in self.sessions.values():
            session.closed = True
        self.sessions.clear()
        for shm in list(self.shms.values()):
            shm._release_local()
        self.client._forget(self)

    def _check(self) -> None:
        if self.closed:
            raise Closed(f"context {self.name} is closed")

    # -- replies -------------------------------------------------------------------------------
    def _make_shm(self, body: Any, user_view: memoryview | None = None, start: int = 0,
                  end: int = -1) -> Shm:
        """The Shm described by the DESC reply ``body[start:end]`` (``end`` -1: to the end)."""
        if end < 0:
            end = len(body)
        if end - start < _DESC_SIZE:
            raise ProtocolError(f"shm descriptor of {end - start} bytes, expected at least {_DESC_SIZE}")
        desc = _unpack_desc(body, start)
        bits = desc[12]
        pages = None
        if bits & _PAGES_FOLLOW:
            npages = desc[8]
            if end - start != _DESC_SIZE + 8 * npages:
                raise ProtocolError(f"shm descriptor of {end - start} bytes for {npages} pages")
            pages = np.frombuffer(body, dtype=np.uint64, count=npages, offset=start + _DESC_SIZE).copy()
            pages.flags.writeable = False
        if bits & _NEW_SEGMENT:
            self._channel.map_segment(desc[9], desc[6])
        cookie = desc[0]
        known = self.shms.get(cookie)
        if known is not None:  # shm_from_id of a buffer we hold: same object, one more reference
            known._refs += 1
            return known
        shm = Shm(self, desc, pages, user_view)
        self.shms[cookie] = shm
        return shm

    def _request_shm(self, msg_type: int, body: bytes, what: str, fds: Sequence[int] = (),
                     user_view: memoryview | None = None) -> Shm:
        self._check()
        reply_type, reply = self._channel.call(msg_type, body, fds)
        return self._make_shm(_check_reply(reply_type, reply, what), user_view)

    def _post_close(self, shm: Shm) -> None:
        if self.closed:
            return
        channel = self._channel
        channel.outbox += _pack_close_frame(_COOKIE_BODY, _SHM_CLOSE, 0, shm.cookie)
        channel.pending.append(self._on_close_reply)
        channel.close_cookies.append(shm.cookie)
        if len(channel.pending) >= MAX_IN_FLIGHT:
            channel.drain()

    def _on_close_reply(self, reply_type: int, body: memoryview) -> None:
        channel = self._channel
        cookie = channel.close_cookies.popleft()
        if reply_type == _OK and len(body) == _CLOSED_SIZE:
            dropped = _unpack_closed(body)[1]
            if dropped:
                channel.unmap_segment(dropped)
            return
        exc = (P.error_from_body(body) if reply_type == P.MsgType.ERROR
               else ProtocolError(f"unexpected {P.type_name(reply_type)} reply to SHM_CLOSE"))
        log.warning("closing shm %#x failed in the daemon: %s", cookie, exc)
        self.deferred_errors.append((cookie, exc))

    # -- allocation ------------------------------------------------------------------------------
    def alloc_user_buf(self, size: int) -> Shm:
        """Allocate a buffer user space can map; it gets an id (DYNAMIC | POOL)."""
        return self._alloc(_ALLOC_USER, size)

    def alloc_kernel_buf(self, size: int) -> Shm:
        """Allocate a driver buffer shared with the TEE; no id (DYNAMIC | POOL)."""
        return self._alloc(_ALLOC_KERNEL, size)

    def alloc_priv_buf(self, size: int) -> Shm:
        """Allocate a driver-private buffer, never registered (PRIV | POOL)."""
        return self._alloc(_ALLOC_PRIV, size)

    def _alloc(self, kind: int, size: int) -> Shm:
        if type(size) is not int or not 0 < size < 1 << 63:
            _check_size(size)
        if self.closed:
            self._check()  # raises Closed
        reply_type, reply = self._channel.call_frame(_pack_alloc_frame(_ALLOC_BODY, _ALLOC, 0, kind, size))
        if reply_type != _OK:
            _check_reply(reply_type, reply, "ALLOC")
        return self._make_shm(reply)

    # -- registration ------------------------------------------------------------------------------
    def register_user_buf(self, obj: Any, fd: int | None = None) -> Shm:
        """Register a writable buffer backed by POSIX shm; it gets an id.

        The object's descriptor goes to the daemon: ``fd`` if given, else
        the object is reopened from this process's memory maps.
        """
        return self._register(obj, P.RegisterKind.USER, fd)

    def register_kernel_buf(self, obj: Any, fd: int | None = None) -> Shm:
        """Register a buffer backed by POSIX shm for the driver's use; no id."""
        return self._register(obj, P.RegisterKind.KERNEL, fd)

    def _register(self, obj: Any, kind: P.RegisterKind, fd: int | None) -> Shm:
        from ..mapping import buffer_span, find_mapping

        self._check()
        if not self.client.gen_caps & 0x4:  # REG_MEM
            raise NotSupported("registering memory needs REG_MEM, which this TEE does not offer "
                               "(no DYNAMIC_SHM capability)")
        view, addr, length = buffer_span(obj)
        own_fd = -1
        try:
            mapping = find_mapping(addr, length)
            if not mapping.writable:
                raise NotSharedMemory(f"buffer at {addr:#x} is in a read-only mapping; "
                                      "a registered buffer must be writable")
            if view.readonly:
                raise NotSharedMemory("buffer object is read-only; a registered buffer must be writable")
            if fd is None:
                fd = own_fd = _open_mapping(mapping)
            file_offset = mapping.file_offset + (addr - mapping.start)
            return self._request_shm(P.MsgType.REGISTER, P.REGISTER.pack(kind, file_offset, length),
                                     "REGISTER", fds=[fd], user_view=view)
        except BaseException:
            view.release()
            raise
        finally:
            if own_fd >= 0:
                os.close(own_fd)

    # -- lookup -----------------------------------------------------------------------------------
    def shm_from_id(self, shm_id: int) -> Shm:
        """The shm with this id, with one more reference (close() it when done)."""
        if isinstance(shm_id, bool) or not isinstance(shm_id, int):
            raise BadParameters(f"id must be an int, got {shm_id!r}")
        if not -(1 << 63) <= shm_id < 1 << 63:
            raise BadParameters(f"id {shm_id} does not fit in the 64-bit field of the protocol")
        return self._request_shm(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(shm_id), "SHM_FROM_ID")

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, uuid: Any, params: Sequence[Any] = (), login: int = 0) -> Session:
        """Open a session with the trusted app ``uuid`` in the daemon's secure world."""
        import uuid as uuidlib

        self._check()
        try:
            ta_uuid = uuid if isinstance(uuid, uuidlib.UUID) else uuidlib.UUID(str(uuid))
        except ValueError:
            raise BadParameters(f"{uuid!r} is not a UUID") from None
        if isinstance(login, bool) or not isinstance(login, int) or not 0 <= login <= 0xFFFFFFFF:
            raise BadParameters(f"login {login!r} is not a u32")
        with _Params(self, params) as conv:
            body = ta_uuid.bytes + P.COOKIE.pack(login) + conv.encode()
            reply_type, reply = self._channel.call(P.MsgType.OPEN_SESSION, body)
            reply = _check_reply(reply_type, reply, "OPEN_SESSION")
            session_id = P.COOKIE.unpack_from(reply)[0]
            result = conv.decode(reply[P.COOKIE.size:], f"open session with {ta_uuid}")
        session = Session(self, session_id, ta_uuid)
        session.open_result = result
        self.sessions[session_id] = session
        return session

    def _invoke(self, session: Session, func: int, params: Sequence[Any]) -> Any:
        self._check()
        if isinstance(func, bool) or not isinstance(func, int) or not 0 <= func <= 0xFFFFFFFF:
            raise BadParameters(f"command {func!r} is not a u32")
        with _Params(self, params) as conv:
            body = P.SESSION.pack(session.id, func, 0) + conv.encode()
            reply_type, reply = self._channel.call(P.MsgType.INVOKE, body)
            reply = _check_reply(reply_type, reply, "INVOKE")
            return conv.decode(reply, f"invoke {func} on session {session.id}")

    def flush(self) -> None:
        """Send pipelined closes now and wait for their replies (``stats()`` does this)."""
        if not self.closed and not self._channel.closed:
            self._channel.drain()

    # -- batches ----------------------------------------------------------------------------------
    def batch(self) -> "Batch":
        """A :class:`Batch` of operations sent as one request."""
        self._check()
        return Batch(self)

    # -- release ----------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """Bytes and objects this context holds (as the client sees them)."""
        return {"shms": len(self.shms), "bytes": sum(s.size for s in self.shms.values()),
                "sessions": len(self.sessions)}

    def close(self) -> None:
        """Release every shm and session of this context and hang up. Idempotent."""
        if self.closed:
            return
        channel = self._channel
        try:
            if not channel.closed:
                channel.drain()
                channel.call(P.MsgType.GOODBYE)
        except Closed:
            pass
        finally:
            self.closed = True
            for session in self.sessions.values():
                session.closed = True
            self.sessions.clear()
            for shm in list(self.shms.values()):
                shm._release_local()
            channel.close()
            self.client._forget(self)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<remote Context {self.name} shms={len(self.shms)}{' closed' if self.closed else ''}>"


def _open_mapping(mapping: Any) -> int:
    """A read-write descriptor of the object behind one of this process's mappings."""
    path = mapping.path
    if path.startswith("/dev/shm/") and not path.endswith(" (deleted)"):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            if os.fstat(fd).st_ino == mapping.inode:
                return fd
            os.close(fd)
    try:
        return os.open(f"/proc/self/map_files/{mapping.start:x}-{mapping.end:x}",
                       os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NotSharedMemory(
            f"cannot reopen the shared-memory object mapped at {mapping.start:#x} ({path}): "
            f"{exc.strerror}; pass its descriptor as register_*_buf(obj, fd=...)") from exc


class _Params:
    """Session parameters of the driver's kinds, to the wire and back.

    Value, RegisteredMemref (or a bare Shm) and NULL memrefs travel as they
    are; a TempMemref is registered for the call when it lies in POSIX shared
    memory, else bounced through a kernel buffer of the pool (as libteec does
    without REG_MEM), and travels as a registered memref.
    """

    def __init__(self, ctx: Context, params: Sequence[Any]) -> None:
        from ..tee import driver

        if len(params) > 4:
            raise BadParameters(f"{len(params)} parameters; a trusted app takes at most 4")
        self.ctx = ctx
        self.driver = driver
        self.params = list(params)
        self.after: list[Any] = []
        self.temps: list[Shm] = []

    def __enter__(self) -> "_Params":
        return self

    def __exit__(self, *exc: object) -> None:
        for shm in self.temps:
            if not shm.closed:
                shm.close()

    def encode(self) -> bytes:
        d = self.driver
        out = [P.COOKIE.pack(len(self.params))]
        for param in self.params:
            if param is None:
                out.append(P.PARAM.pack(P.ParamKind.NONE, 0, 0, 0))
                self.after.append(None)
            elif isinstance(param, d.Value):
                direction = _direction(param.direction)
                for what, v in (("value a", param.a), ("value b", param.b)):
                    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
                        raise BadParameters(f"{what} {v!r} is not a u32")
                out.append(P.PARAM.pack(P.ParamKind.VALUE | direction << 8, param.a, param.b, 0))
                self.after.append(("value", param, direction))
            elif isinstance(param, d.RegisteredMemref) or isinstance(param, Shm):
                ref = param if isinstance(param, d.RegisteredMemref) else d.RegisteredMemref(param)
                out.append(self._memref(ref, ref.shm, ref.offset, ref.size, ref.direction))
                self.after.append(("memref", ref, _direction(ref.direction)))
            elif isinstance(param, d.TempMemref):
                out.append(self._temp(param))
            else:
                raise BadParameters(f"parameter {param!r} is not None, Value, RegisteredMemref, "
                                    "TempMemref or Shm")
        return b"".join(out)

    def _memref(self, ref: Any, shm: Any, offset: Any, size: Any, direction: str) -> bytes:
        d = _direction(direction)
        if not isinstance(shm, Shm) or shm.context is not self.ctx:
            raise BadParameters(f"shm {shm!r} does not belong to context {self.ctx.name}")
        shm._check()
        for what, v in (("offset", offset), ("size", size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise BadParameters(f"memref {what} {v!r} is not a non-negative int")
        whole = size is None
        return P.PARAM.pack(P.ParamKind.MEMREF | d << 8 | (P.PARAM_WHOLE if whole else 0),
                            shm.cookie, offset or 0, 0 if whole else size)

    def _temp(self, ref: Any) -> bytes:
        d = _direction(ref.direction)
        if ref.buffer is None:
            size = 0 if ref.size is None else ref.size
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadParameters(f"NULL memref size {size!r}")
            self.after.append(("memref", ref, d))
            return P.PARAM.pack(P.ParamKind.NULL_MEMREF | d << 8, 0, 0, size)
        try:
            view = memoryview(ref.buffer)
        except TypeError:
            raise BadParameters(f"{type(ref.buffer).__name__} does not support the buffer protocol") from None
        with view:
            length = view.nbytes
        if ref.size is not None and ref.size != length:
            raise BadParameters(f"temporary memref size {ref.size!r} differs from the buffer's "
                                f"{length} bytes")
        if length == 0:
            self.after.append(("memref", ref, d))
            return P.PARAM.pack(P.ParamKind.NULL_MEMREF | d << 8, 0, 0, 0)
        shm: Shm | None = None
        if self.ctx.client.gen_caps & 0x4:
            try:
                shm = self.ctx.register_kernel_buf(ref.buffer)
            except (NotSharedMemory, NotSupported):
                shm = None
        bounce = shm is None
        if shm is None:
            shm = self.ctx.alloc_kernel_buf(length)
            if d != 1:
                with memoryview(ref.buffer) as src, shm.view() as dst:
                    dst[:length] = src.cast("B")
        self.temps.append(shm)
        self.after.append(("bounce" if bounce else "memref", (ref, shm) if bounce else ref, d))
        return P.PARAM.pack(P.ParamKind.MEMREF | d << 8, shm.cookie, 0, length)

    def decode(self, body: memoryview, what: str) -> Any:
        from ..errors import TEE_SUCCESS, TeeError

        ret, origin, count = P.RESULT.unpack_from(body)
        result = self.driver.InvokeResult(ret, origin)
        pos = P.RESULT.size
        for i in range(count):
            kind, a, b = P.OUTPUT.unpack_from(body, pos)
            pos += P.OUTPUT.size
            value = size = None
            entry = self.after[i] if i < len(self.after) else None
            if kind == P.OutputKind.VALUE:
                value = (a, b)
                if entry is not None and entry[0] == "value":
                    entry[1].a, entry[1].b = a, b
            elif kind == P.OutputKind.SIZE:
                size = a
                if entry is not None:
                    obj = entry[1]
                    if entry[0] == "bounce":
                        ref, shm = obj
                        if ret == TEE_SUCCESS:
                            with memoryview(ref.buffer) as dst, shm.view() as src:
                                flat = dst.cast("B")
                                n = min(size, len(flat))
                                flat[:n] = src[:n]
                        obj = ref
                    obj.size = size
            result.values.append(value)
            result.sizes.append(size)
        if ret != TEE_SUCCESS:
            exc = TeeError(f"{what}: secure world answered {ret:#x} (origin {origin})", ret, origin)
            exc.result = result  # type: ignore[attr-defined]
            raise exc
        return result


def _direction(value: str) -> int:
    try:
        return {"in": 0, "out": 1, "inout": 2}[value]
    except (KeyError, TypeError):
        raise BadParameters(f"direction {value!r} is not 'in', 'out' or 'inout'") from None


_REFUSED = -1
#: The ``kinds`` entry of every ALLOC in a Batch.
_ALLOC_KIND = (_ALLOC, None)


def _batch_alloc(kind: int, doc: str) -> Callable[["Batch", int], None]:
    """A Batch method queueing an ALLOC of ``kind`` (the hot path: one struct call per frame)."""
    def alloc(self: "Batch", size: int) -> None:
        parts = self.parts
        if type(size) is int and 0 < size < 1 << 63 and len(parts) < self.limit:
            parts.append(_pack_alloc_frame(_ALLOC_BODY, _ALLOC, 0, kind, size))
            self.kinds.append(_ALLOC_KIND)
        else:  # a bad size (refused locally) or a full batch (raises)
            self._alloc(kind, size)
    alloc.__doc__ = doc
    return alloc


class Batch:
    """Operations collected and sent as one BATCH request (one round trip).

    ``alloc_user_buf(size)``, ``alloc_kernel_buf``, ``alloc_priv_buf``,
    ``shm_from_id(id)`` and ``close(shm)`` queue an operation; ``run()``
    sends them and returns one result per operation, in order: an Shm, None
    for a close, or the PoolsvcError instance of an operation that failed
    (the others still ran).  A Batch can be run once.
    """

    __slots__ = ("ctx", "parts", "kinds", "limit", "closing", "refused")

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        #: Encoded request frames, and per operation ``(message type, extra)``.
        self.parts: list[bytes] = []
        self.kinds: list[tuple[int, Any]] = []
        self.limit = ctx._channel.max_batch
        #: The shms of the queued closes; whether an operation was refused locally.
        self.closing: list[Shm] = []
        self.refused = False

    def __len__(self) -> int:
        return len(self.kinds)

    def _full(self) -> None:
        raise BadParameters(f"batch already holds {len(self.kinds)} operations, the daemon's "
                            "limit (max_batch)")

    def _push(self, frame: bytes, kind: tuple[int, Any]) -> None:
        if len(self.parts) >= self.limit:
            self._full()
        self.parts.append(frame)
        self.kinds.append(kind)

    def _add(self, msg_type: int, body: bytes, extra: Any = None) -> None:
        self._push(_pack_header(len(body), msg_type, 0) + body, (msg_type, extra))

    def _refused(self, exc: PoolsvcError) -> None:
        """An operation whose arguments cannot even be encoded: its result is ``exc``."""
        self.kinds.append((_REFUSED, exc))
        self.refused = True

    def _alloc(self, kind: int, size: int) -> None:
        # the checks of _check_size; a valid size goes through _push (which may raise full)
        if type(size) is int and 0 < size < 1 << 63:
            self._push(_pack_alloc_frame(_ALLOC_BODY, _ALLOC, 0, kind, size), _ALLOC_KIND)
            return
        try:
            _check_size(size)
        except BadParameters as exc:
            self._refused(exc)

    alloc_user_buf = _batch_alloc(_ALLOC_USER, "Queue ``Context.alloc_user_buf(size)``.")
    alloc_kernel_buf = _batch_alloc(_ALLOC_KERNEL, "Queue ``Context.alloc_kernel_buf(size)``.")
    alloc_priv_buf = _batch_alloc(_ALLOC_PRIV, "Queue ``Context.alloc_priv_buf(size)``.")

    def shm_from_id(self, shm_id: int) -> None:
        if isinstance(shm_id, bool) or not isinstance(shm_id, int) or not -(1 << 63) <= shm_id < 1 << 63:
            self._refused(BadParameters(f"id must be a 64-bit int, got {shm_id!r}"))
            return
        self._add(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(shm_id))

    def close(self, shm: Shm) -> None:
        if type(shm) is not Shm or shm.context is not self.ctx:
            raise BadParameters(f"{shm!r} is not a shm of context {self.ctx.name}")
        if shm._refs <= 0:
            shm._check()  # raises Closed
        self._push(_pack_close_frame(_COOKIE_BODY, _SHM_CLOSE, 0, shm.cookie), (_SHM_CLOSE, shm))
        self.closing.append(shm)

    def run(self) -> list[Any]:
        """Send the batch; one result per operation (Shm, None, or an exception)."""
        ctx = self.ctx
        ctx._check()
        kinds, self.kinds = self.kinds, []
        if not self.parts:
            return [extra for _, extra in kinds]
        # Closes take effect locally first, exactly as Shm.close() does.
        closing, self.closing = self.closing, []
        for shm in closing:
            shm._refs -= 1
            if shm._refs == 0:
                shm._release_local()
        body = b"".join(self.parts)
        sent = len(self.parts)
        self.parts = []
        reply_type, reply = ctx._channel.call(P.MsgType.BATCH, body)
        if reply_type == P.MsgType.ERROR:
            raise P.error_from_body(reply)
        if reply_type != P.MsgType.BATCH_REPLY:
            raise ProtocolError(f"daemon answered BATCH with {P.type_name(reply_type)}")
        replies = P.split_frames(reply, sent, P.MAX_REPLY_FRAME)
        if len(replies) != sent:
            raise ProtocolError(f"BATCH_REPLY holds {len(replies)} replies for {sent} requests")
        if self.refused:  # results of the refused operations go in between
            answers = iter(replies)
            pairs = [(kind, None if kind[0] == _REFUSED else next(answers)) for kind in kinds]
        else:
            pairs = zip(kinds, replies)  # type: ignore[assignment]
        results: list[Any] = []
        append = results.append
        channel = ctx._channel
        make_shm = ctx._make_shm
        for (msg_type, extra), answer in pairs:
            if answer is None:
                append(extra)
                continue
            sub_type, start, end = answer
            if sub_type == _ERROR:
                append(P.error_from_body(reply[start:end]))
            elif msg_type == _SHM_CLOSE:
                if end - start != _CLOSED_SIZE:
                    raise ProtocolError(f"SHM_CLOSE reply of {end - start} bytes in a BATCH_REPLY")
                dropped = _unpack_closed_from(reply, start)[1]
                if dropped:
                    channel.unmap_segment(dropped)
                append(None)
            elif msg_type == _PING:
                append(bytes(reply[start:end]))
            else:
                append(make_shm(reply, None, start, end))
        return results


class Client:
    """A System-like handle on a running ``poolsvc serve`` (see :func:`connect`)."""

    def __init__(self, path: str, name: str = "", spin_us: float = DEFAULT_SPIN_US,
                 timeout: float | None = None, transport: str = DEFAULT_TRANSPORT,
                 shm_spin_us: float = DEFAULT_SHM_SPIN_US) -> None:
        self.path = path
        self.name = name
        self.spin_us = spin_us
        self.timeout = timeout
        self.transport = transport
        self.shm_spin_us = shm_spin_us
        self.contexts: dict[int, Context] = {}
        self._closed = False
        self._monitor = _Channel(path, P.Role.MONITOR, name, spin_us, timeout, transport, shm_spin_us)
        m = self._monitor
        self.pool = m.pool
        self.sec_caps = m.sec_caps
        self.gen_caps = m.gen_caps
        self.daemon_pid = m.daemon_pid
        self.max_batch = m.max_batch
        self.layout = {"dynamic": (m.dynamic_base, m.dynamic_size),
                       "static": (m.static_base, m.static_size)}

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self) -> None:
        if self._closed:
            raise Closed("client is closed")

    def open_context(self, name: str = "") -> Context:
        """A new context in the daemon (one connection)."""
        self._check()
        ctx = Context(self, name or self.name)
        self.contexts[ctx.cid] = ctx
        return ctx

    def _forget(self, ctx: Context) -> None:
        self.contexts.pop(ctx.cid, None)

    def service_stats(self) -> dict[str, Any]:
        """The daemon's whole STATS document (pools, clients, requests, latencies).

        Pipelined closes of this handle's contexts are flushed first, so the
        figures include them.
        """
        self._check()
        for ctx in list(self.contexts.values()):
            ctx.flush()
        reply_type, body = self._monitor.call(P.MsgType.STATS)
        return json.loads(bytes(_check_reply(reply_type, body, "STATS")))

    def stats(self) -> dict[str, Any]:
        """The System's figures (as ``System.stats()``), plus ``"service"``: the daemon's own."""
        doc = self.service_stats()
        out = doc.pop("system")
        out["service"] = doc
        return out

    def ping(self, payload: bytes = b"") -> bytes:
        """One round trip to the daemon; returns the echoed payload."""
        self._check()
        reply_type, body = self._monitor.call(P.MsgType.PING, payload)
        return bytes(_check_reply(reply_type, body, "PING"))

    @property
    def phys(self) -> Any:
        raise NotSupported("physical memory is not reachable through the pool service: it would "
                           "expose other clients' buffers")

    @property
    def tee(self) -> Any:
        raise NotSupported("raw secure-world messages are not offered by the pool service; use "
                           "Context.open_session")

    def close(self) -> None:
        """Close every context (releasing what it holds) and the monitor connection."""
        if self._closed:
            return
        try:
            for ctx in list(self.contexts.values()):
                ctx.close()
        finally:
            self._closed = True
            self._monitor.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.path} pool={self.pool} contexts={len(self.contexts)}>"


def connect(socket_path: str | None = None, *, name: str = "", spin_us: float = DEFAULT_SPIN_US,
            timeout: float | None = None, transport: str | None = None,
            shm_spin_us: float = DEFAULT_SHM_SPIN_US) -> Client:
    """A System-like handle of the daemon serving ``socket_path``.

    ``socket_path`` defaults to :func:`~poolsvc.service.settings.default_socket_path`.
    ``spin_us``: how long to poll for a reply before sleeping (0 sleeps at
    once; polling yields the CPU between tries, and saves the wake-up of a
    sleeping thread on each round trip).  ``timeout``: seconds to wait for
    the daemon before Closed.  Raises Closed when nothing serves the path.

    ``transport``: ``"socket"`` (requests and replies on the Unix socket) or
    ``"shm"`` (ordinary requests and replies through a shared-memory slot
    per connection, the socket carrying only descriptors, wake-ups and
    oversized replies; a daemon that does not offer slots gives the socket
    transport).  None takes ``$POOLSVC_TRANSPORT``, else DEFAULT_TRANSPORT.
    ``shm_spin_us``: the longest a shm client polls its slot for a reply
    before sleeping on the socket (adaptive below that).
    """
    if transport is None:
        transport = os.environ.get("POOLSVC_TRANSPORT") or DEFAULT_TRANSPORT
    return Client(socket_path or default_socket_path(), name=name, spin_us=spin_us, timeout=timeout,
                  transport=transport, shm_spin_us=shm_spin_us)


class LocalBatch:
    """The :class:`Batch` API over an embedded Context (operations run at once on ``run()``),
    so that code using batches runs against both the embedded System and the daemon."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.ops: list[tuple[str, Any]] = []

    def __len__(self) -> int:
        return len(self.ops)

    def alloc_user_buf(self, size: int) -> None:
        self.ops.append(("alloc_user_buf", size))

    def alloc_kernel_buf(self, size: int) -> None:
        self.ops.append(("alloc_kernel_buf", size))

    def alloc_priv_buf(self, size: int) -> None:
        self.ops.append(("alloc_priv_buf", size))

    def shm_from_id(self, shm_id: int) -> None:
        self.ops.append(("shm_from_id", shm_id))

    def close(self, shm: Any) -> None:
        self.ops.append(("close", shm))

    def run(self) -> list[Any]:
        results: list[Any] = []
        for op, arg in self.ops:
            try:
                results.append(arg.close() if op == "close" else getattr(self.ctx, op)(arg))
            except PoolsvcError as exc:
                results.append(exc)
        self.ops = []
        return results


def batch(ctx: Any) -> Any:
    """A batch for any context: ``ctx.batch()`` for a daemon's, a LocalBatch for an embedded one."""
    make = getattr(ctx, "batch", None)
    return make() if make is not None else LocalBatch(ctx)


__all__ = ["Batch", "Client", "Context", "LocalBatch", "Session", "Shm", "batch", "connect"]
