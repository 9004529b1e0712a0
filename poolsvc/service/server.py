"""The pool service daemon: one System, one Context per connection, one thread.

:class:`Server` owns a listening Unix socket, a :class:`~poolsvc.system.System`
and every connection.  Its loop is a single-threaded epoll
loop: read what a client sent, run every complete request in order against
that client's Context, queue the replies, write them; nothing blocks, so one
slow or hostile client cannot stall the others.

Per connection (:class:`Connection`):

- state machine :class:`ConnState`: HANDSHAKE (only HELLO is accepted, within
  ``handshake_timeout``) -> READY -> CLOSING (a final reply is queued; hang up
  once it is written) -> CLOSED;
- a CONTEXT connection owns one Context; when the connection ends for any
  reason (GOODBYE, EOF, reset, SIGKILL of the client mid-request, a protocol
  violation) the Context is closed, which releases its shms, ids, frames,
  sessions and storage, and the daemon's mappings of objects it registered;
- bounded memory: the input buffer holds at most one incomplete frame
  (``max_frame``) plus one read; queued replies beyond ``max_output`` stop the
  daemon reading that client until it reads its replies; received
  descriptors not yet claimed by a REGISTER are capped at
  ``protocol.MAX_PENDING_FDS``; live shms at ``max_shms_per_client`` and pool
  bytes at ``max_bytes_per_client``.

Shm slots (protocol version 2): a connection may ask for a shared-memory
request/reply slot (``protocol`` documents the layout).  The loop polls the
slots of such clients for a short adaptive window after serving one, then
marks them "daemon sleeping" and blocks in epoll; a client that publishes a
request while the mark is set rings with a DOORBELL frame on its socket.
Nothing read from a slot is trusted: sequence, length and every frame are
checked, and the request bytes are copied out before they are parsed.

Malformed traffic: a frame header with an oversized length or unknown flags
cannot be resynchronised, so that client gets an ERROR and is disconnected;
an unknown type, a short or long body, or bad arguments get an ERROR reply
and the connection stays usable.  Either way the other clients are served.

Concurrency: everything here runs on the loop thread, except :meth:`Server.stop`,
which any thread or a signal handler may call (it writes one byte to a pipe).
"""
from __future__ import annotations

import array
import fcntl
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections import deque
from enum import IntEnum
from typing import Any, Callable

from .._backend import BACKEND, core
from ..config import Config
from ..errors import BadParameters, ConfigError, InternalError, ItemNotFound, PoolsvcError, ProtocolError
from ..storage import LIVE, Storage
from . import protocol as P
from .metrics import Metrics
from .provider import RegisteredFiles, SegmentTokens, describe
from .settings import ServiceSettings

log = logging.getLogger("poolsvc.service")

#: Bytes asked of one ``recvmsg``.
RECV_SIZE = 256 << 10
_ANC_SIZE = socket.CMSG_SPACE(P.MAX_FDS_PER_SEND * array.array("i").itemsize)
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_PEERCRED = struct.Struct("3i")
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_HEADER_SIZE = P.HEADER_SIZE
_unpack_header = P.HEADER.unpack_from
_unpack_alloc = P.ALLOC.unpack
_unpack_cookie = P.COOKIE.unpack
_pack_closed = P.CLOSED.pack
#: SHM_CLOSE replies: references remain; freed, no segment dropped.
_CLOSED_KEPT, _CLOSED_FREED = _pack_closed(0, 0), _pack_closed(1, 0)
_pack_header = P.HEADER.pack
_OK, _ERROR = int(P.MsgType.OK), int(P.MsgType.ERROR)
_BATCH, _DOORBELL, _HELLO = int(P.MsgType.BATCH), int(P.MsgType.DOORBELL), int(P.MsgType.HELLO)
#: Reply type of each request type whose reply is not OK.
_REPLY_TYPE = {_BATCH: int(P.MsgType.BATCH_REPLY), _HELLO: int(P.MsgType.WELCOME)}
_W_REQ_SEQ, _W_REQ_LEN, _W_CLIENT_SLEEPING = P.W_REQ_SEQ, P.W_REQ_LEN, P.W_CLIENT_SLEEPING
_W_REP_SEQ, _W_REP_LEN, _W_DAEMON_SLEEPING = P.W_REP_SEQ, P.W_REP_LEN, P.W_DAEMON_SLEEPING
_REQ_OFF, _REQ_CAP = P.SLOT_REQ_OFF, P.SLOT_REQ_CAP
_REP_OFF, _REP_CAP = P.SLOT_REP_OFF, P.SLOT_REP_CAP
_fence_lock = threading.Lock()
_fence_acquire, _fence_release = _fence_lock.acquire, _fence_lock.release
_clock_ns = time.perf_counter_ns
_run_batch = core.run_batch


def fence() -> None:
    """A full memory barrier (a locked instruction on x86): orders our slot
    store before the load of the peer's "sleeping" word (Dekker's handshake)."""
    _fence_lock.acquire()
    _fence_lock.release()


class ConnState(IntEnum):
    """Life of a connection."""

    HANDSHAKE = 1
    READY = 2
    CLOSING = 3
    CLOSED = 4


# Plain ints on the hot path (Connection.state holds one of these).
_HANDSHAKE, _READY, _CLOSING, _CLOSED = 1, 2, 3, 4


class Connection:
    """One client connection and everything the daemon holds for it."""

    __slots__ = ("sock", "fileno", "serial", "state", "role", "pid", "uid", "gid", "name", "context",
                 "tokens", "inbuf", "out", "out_bytes", "fds", "registered", "alloc_fns",
                 "register_fns", "pool_bytes", "alloc_sizes", "requests", "accepted",
                 "reading", "writing", "goodbye", "handlers", "version",
                 "slot", "words", "seq", "bell")

    def __init__(self, sock: socket.socket, serial: int) -> None:
        self.sock = sock
        self.fileno = sock.fileno()
        self.serial = serial
        self.state = _HANDSHAKE
        self.role = P.Role.CONTEXT
        self.pid = self.uid = self.gid = -1
        try:
            self.pid, self.uid, self.gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:  # pragma: no cover - always available on Linux
            pass
        self.name = ""
        self.context: Any = None
        self.tokens: SegmentTokens | None = None
        self.inbuf = bytearray()
        #: Queued replies: [bytes, descriptors to send with their first byte].
        self.out: deque[list[Any]] = deque()
        self.out_bytes = 0
        #: Descriptors received and not yet claimed by a REGISTER.
        self.fds: deque[int] = deque()
        #: cookie -> object key, for shms this client registered.
        self.registered: dict[int, tuple[int, int]] = {}
        self.alloc_fns: tuple[Callable[[int], Any], ...] = ()
        self.register_fns: tuple[Callable[[Any], Any], ...] = ()
        self.pool_bytes = 0
        self.alloc_sizes: dict[int, int] = {}
        self.requests = 0
        self.accepted = time.monotonic()
        self.reading = True
        self.writing = False
        self.goodbye = False
        #: Request handlers of this connection's state and role, by message type.
        self.handlers: dict[int, Callable[[Connection, Any], bytes]] = {}
        self.version = P.VERSION
        #: The shm slot (Storage) of a version-2 connection that asked for one,
        #: its first page as u64 words, and the sequence of the last request served.
        self.slot: Storage | None = None
        self.words: memoryview | None = None
        self.seq = 0
        #: The eventfd the client rings to wake the daemon (-1: none).
        self.bell = -1

    def label(self) -> str:
        return f"client #{self.serial} (pid {self.pid}{', ' + self.name if self.name else ''})"


_WAKE = object()
_LISTEN = object()


class _Bell:
    """The epoll tag of a connection's eventfd doorbell."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn


class Server:
    """The pool service: ``Server(config, settings).run()`` serves until stopped.

    ``start()`` binds the socket and builds the System (so a caller knows the
    socket exists when it returns); ``serve_forever()`` runs the loop and
    closes everything when :meth:`stop` is called; ``run()`` does both.
    """

    def __init__(self, config: Config | None = None, settings: ServiceSettings | None = None) -> None:
        self.config = config or Config()
        self.settings = settings or ServiceSettings()
        # limits read on every request
        self._max_output = self.settings.max_output
        self._max_frame = self.settings.max_frame
        self._max_shms = self.settings.max_shms_per_client
        self._max_bytes = self.settings.max_bytes_per_client
        self.system: Any = None
        self.metrics = Metrics(self.settings.latency_window)
        self.files = RegisteredFiles()
        self.connections: dict[int, Connection] = {}
        self._serials = 0
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._lock_fd = -1
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._reply_fds: list[int] = []
        #: The receive buffer every connection reads into (copied out at once).
        self._rview = memoryview(bytearray(RECV_SIZE))
        self._rbufs = [self._rview]
        self._last_expiry = 0.0
        self._ep: Any = None
        #: epoll registrations: fd -> Connection, _LISTEN or _WAKE.
        self._fdmap: dict[int, Any] = {}
        #: READY connections with a shm slot, polled by the loop.
        self._slots: list[Connection] = []
        #: Current slot-polling window, adapted between 2 us and shm_spin_us.
        self._slot_spin = self.settings.shm_spin_us / 1e6
        self._handlers: dict[int, Callable[[Connection, Any], bytes]] = {
            P.MsgType.PING: self._op_ping,
            P.MsgType.STATS: self._op_stats,
            P.MsgType.GOODBYE: self._op_goodbye,
            P.MsgType.ALLOC: self._op_alloc,
            P.MsgType.REGISTER: self._op_register,
            P.MsgType.SHM_CLOSE: self._op_shm_close,
            P.MsgType.SHM_FROM_ID: self._op_shm_from_id,
            P.MsgType.BATCH: self._op_batch,
            P.MsgType.OPEN_SESSION: self._op_open_session,
            P.MsgType.INVOKE: self._op_invoke,
            P.MsgType.CLOSE_SESSION: self._op_close_session,
        }
        self._batch_handlers = {int(k): v for k, v in self._handlers.items() if k in P.BATCHABLE}
        self._monitor_types = frozenset({P.MsgType.PING, P.MsgType.STATS, P.MsgType.GOODBYE})
        self._context_handlers = {int(k): v for k, v in self._handlers.items()}
        self._monitor_handlers = {int(k): v for k, v in self._handlers.items() if k in self._monitor_types}
        self._hello_handlers: dict[int, Callable[[Connection, Any], bytes]] = {_HELLO: self._op_hello}
        self.started = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        return self.settings.socket_path

    def start(self) -> None:
        """Take the socket's lock, remove a crashed predecessor's socket, bind, build the System."""
        from ..system import System

        self._take_lock()
        try:
            self._bind()
            self.system = System(self.config)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._ep = select.epoll()
            assert self._listener is not None  # made by _bind()
            self._ep_register(self._listener.fileno(), _EPOLLIN, _LISTEN)
            self._ep_register(self._wake_r, _EPOLLIN, _WAKE)
        except BaseException:
            self.close()
            raise
        log.info("serving %s (pool %s, backend %s, pid %d)", self.socket_path, self.system.pool,
                 BACKEND, os.getpid())
        self.started.set()

    def run(self) -> None:
        """``start()`` then ``serve_forever()``."""
        self.start()
        self.serve_forever()

    def stop(self) -> None:
        """Ask the loop to shut down (any thread, or a signal handler)."""
        self._stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _ep_register(self, fd: int, events: int, data: Any) -> None:
        self._ep.register(fd, events)
        self._fdmap[fd] = data

    def _ep_unregister(self, fd: int) -> None:
        if self._fdmap.pop(fd, None) is not None and self._ep is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):  # pragma: no cover - closed already
                pass

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; then release every client, the System and the socket.

        With shm-slot clients, the loop polls their slots after serving one,
        for an adaptive window of at most ``shm_spin_us`` (checking epoll
        every few polls, so that socket clients are served meanwhile); then
        it marks every slot "daemon sleeping", polls them once more (so that
        a request published before the mark is not missed) and blocks in
        epoll until a socket event or a client's DOORBELL.
        """
        assert self._ep is not None, "start() first"
        poll = self._ep.poll
        fdmap = self._fdmap
        slots = self._slots
        spin = self.settings.spin_us / 1e6
        max_slot_spin = self.settings.shm_spin_us / 1e6
        min_slot_spin = min(2e-6, max_slot_spin)
        spin_until = 0.0
        slot_until = last_slot = 0.0
        clock = time.perf_counter
        serve_slot = self._serve_slot
        yield_ = os.sched_yield
        polls = 0
        try:
            while not self._stopping:
                if slots:
                    served = False
                    for conn in tuple(slots):
                        words = conn.words
                        if words is not None and words[_W_REQ_SEQ] != conn.seq:
                            served = serve_slot(conn) or served
                    now = clock()
                    if served:
                        # Widen the window to twice the gap since the last slot
                        # request when that was within the bound.
                        gap = now - last_slot
                        if gap <= max_slot_spin:
                            self._slot_spin = min(max_slot_spin, max(self._slot_spin, 2 * gap))
                        last_slot = now
                        slot_until = now + self._slot_spin
                        polls += 1
                        if polls & 7:
                            continue
                        events = poll(0)
                    elif now < slot_until:
                        # Yield between polls: when the scheduler has put a client on
                        # this CPU, a poll that does not yield keeps it from running
                        # until preemption (see _Channel._slot_send in the client).
                        yield_()
                        polls += 1
                        if polls & 3:
                            continue
                        events = poll(0)
                    else:
                        if slot_until:  # a whole window without a request: narrow it
                            self._slot_spin = max(min_slot_spin, self._slot_spin / 2)
                            slot_until = 0.0
                        events = poll(0)
                        if not events:
                            events = self._sleep(poll)
                            # Woken up (by a DOORBELL, mostly): the next window is full
                            # width again.  Learning only from gaps seen while polling
                            # would trap a client whose think time exceeds a narrowed
                            # window: every request would ring, and no gap would be short.
                            self._slot_spin = max_slot_spin
                        if events is None:
                            continue
                else:
                    events = poll(0 if clock() < spin_until else 1.0)
                if not events:
                    self._expire_handshakes()
                    continue
                if spin:
                    spin_until = clock() + spin
                for fd, mask in events:
                    data = fdmap.get(fd)
                    if data is None:
                        continue
                    if data is _LISTEN:
                        self._accept()
                    elif type(data) is _Bell:
                        try:  # just a wake-up: the loop polls the slots next
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                    elif data is _WAKE:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    else:
                        if mask & _READABLE and data.state < _CLOSED:
                            self._on_readable(data)
                        if mask & _WRITABLE and data.state < _CLOSED and data.out:
                            self._flush(data)
                self._expire_handshakes()
        finally:
            self.close()

    def _sleep(self, poll: Callable[[float], list[tuple[int, int]]]) -> list[tuple[int, int]] | None:
        """Block in epoll with every slot marked "daemon sleeping"; None if a slot
        request came in while marking (serve it instead of sleeping)."""
        slots = self._slots
        for conn in slots:
            if conn.words is not None:
                conn.words[_W_DAEMON_SLEEPING] = 1
        fence()
        # Only requests the loop would serve now count: a client over max_output
        # waits until it has read its socket (an EPOLLOUT wakes us then).
        max_output = self.settings.max_output
        pending = any(conn.words is not None and conn.words[_W_REQ_SEQ] != conn.seq
                      and conn.state == _READY and conn.out_bytes <= max_output for conn in slots)
        events = None if pending else poll(1.0)
        for conn in slots:
            if conn.words is not None:
                conn.words[_W_DAEMON_SLEEPING] = 0
        return events

    def close(self) -> None:
        """Disconnect every client, close the System, remove the socket. Idempotent."""
        for conn in list(self.connections.values()):
            self._disconnect(conn, "daemon shutting down")
        if self.system is not None:
            try:
                self.system.close()
            finally:
                self.system = None
        self.files.close()
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        self._fdmap.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._remove_socket()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._release_lock()

    # -- the socket and its lock ------------------------------------------------------------
    def _take_lock(self) -> None:
        path = self.socket_path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        lock_path = path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PoolsvcError(f"another poolsvc daemon serves {path} (its lock {lock_path} is held)") from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            try:
                os.unlink(self.socket_path + ".lock")
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _bind(self) -> None:
        path = self.socket_path
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        if info is not None:
            if not stat.S_ISSOCK(info.st_mode):
                raise ConfigError(f"socket_path: {path} exists and is not a socket; refusing to remove it")
            # We hold the lock, so no live daemon owns it: a crashed predecessor left it.
            log.warning("removing %s, left by a daemon that did not shut down", path)
            os.unlink(path)
        gid = self.settings.gid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        try:
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, self.settings.mode)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            os.unlink(path)
            raise
        info = os.stat(path)
        self._socket_id = (info.st_dev, info.st_ino)
        self._listener = sock

    def _remove_socket(self) -> None:
        try:
            info = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._socket_id:
            os.unlink(self.socket_path)

    # -- connections ----------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None and self._ep is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.error("accept failed: %s", exc)
                return
            sock.setblocking(False)
            self._serials += 1
            conn = Connection(sock, self._serials)
            self.metrics.connections += 1
            if len(self.connections) >= self.settings.max_clients:
                self.metrics.refused += 1
                log.warning("refusing %s: %d clients already", conn.label(), len(self.connections))
                try:
                    sock.send(P.frame(P.MsgType.ERROR, P.error_body(P.LimitExceeded(
                        f"daemon serves {self.settings.max_clients} clients already"))))
                except OSError:
                    pass
                sock.close()
                continue
            self.connections[conn.fileno] = conn
            conn.handlers = self._hello_handlers
            self._ep_register(conn.fileno, _EPOLLIN, conn)
            log.debug("accepted %s", conn.label())

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        if not self.connections or now - self._last_expiry < 0.5:
            return
        self._last_expiry = now
        limit = self.settings.handshake_timeout
        for conn in list(self.connections.values()):
            if conn.state == _HANDSHAKE and now - conn.accepted > limit:
                self.metrics.refused += 1
                self._disconnect(conn, f"no HELLO within {limit} s")

    def _disconnect(self, conn: Connection, reason: str) -> None:
        """Forget a connection and release everything its client held."""
        if conn.state == _CLOSED:
            return
        was = conn.state
        conn.state = _CLOSED
        self.connections.pop(conn.fileno, None)
        self._ep_unregister(conn.fileno)
        conn.sock.close()
        self._drop_slot(conn)
        for fd in conn.fds:
            os.close(fd)
        conn.fds.clear()
        for _, fds in conn.out:
            for fd in fds:
                os.close(fd)
        conn.out.clear()
        held = self._release_context(conn)
        self.metrics.disconnects += 1
        if not conn.goodbye and conn.role == P.Role.CONTEXT and was != _HANDSHAKE \
                and not self._stopping:
            self.metrics.crashes += 1
        level = logging.INFO if held else logging.DEBUG
        log.log(level, "%s disconnected (%s); released %d shms", conn.label(), reason, held)

    def _release_context(self, conn: Connection) -> int:
        ctx = conn.context
        if ctx is None:
            return 0
        conn.context = None
        held = len(ctx.shms)
        try:
            ctx.close()
        except Exception:  # keep serving the others; the System's tests own this path
            log.exception("closing the context of %s failed", conn.label())
        for key in conn.registered.values():
            self.files.put(key)
        conn.registered.clear()
        if conn.tokens is not None:
            conn.tokens.clear()
        conn.alloc_fns = conn.register_fns = ()
        return held

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
        if flags & _MSG_CTRUNC and conn.state < _CLOSING:
            self._violation(conn, ProtocolError("ancillary data truncated (too many descriptors in "
                                                "one message)"))
        if conn.state >= _CLOSING:
            if conn.state == _CLOSING:
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
            if pos < len(data) and conn.state < _CLOSED:
                conn.inbuf = bytearray(data[pos:])
        if conn.out and conn.state < _CLOSED:
            self._flush(conn)

    def _run_inbuf(self, conn: Connection) -> None:
        pos = self._run_frames(conn, conn.inbuf)
        if conn.state < _CLOSED:
            del conn.inbuf[:pos]

    def _take_fds(self, conn: Connection, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            conn.fds.extend(fds)
        if len(conn.fds) > P.MAX_PENDING_FDS and conn.state < _CLOSING:
            self._violation(conn, ProtocolError(f"{len(conn.fds)} descriptors sent without REGISTER "
                                                f"requests to claim them (limit {P.MAX_PENDING_FDS})"))

    def _run_frames(self, conn: Connection, buf: Any) -> int:
        """Run the complete frames at the start of ``buf``; returns the bytes consumed.

        Stops early when the client's unread replies exceed ``max_output``
        (the rest waits in the input buffer until the client reads).
        """
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
                continue  # a wake-up: the loop polls the slot next
            queue(conn, request(conn, msg_type, buf[start:pos]))
            if conn.state != _READY or conn.out_bytes > max_output:
                break
        return pos

    def _violation(self, conn: Connection, exc: ProtocolError) -> None:
        """A client broke the framing: queue an ERROR saying why, then hang up."""
        self.metrics.protocol_errors += 1
        self.metrics.errors[P.code_of(exc)] += 1
        log.warning("%s: %s; disconnecting it", conn.label(), exc)
        conn.inbuf = bytearray()
        conn.state = _CLOSING
        self._drop_slot(conn)
        self._queue(conn, P.frame(P.MsgType.ERROR, P.error_body(exc)))

    # -- the shm slot -------------------------------------------------------------------------------
    def _make_slot(self, conn: Connection, bell: bool) -> None:
        """Create the connection's slot, and its eventfd doorbell if asked for.

        The descriptors go with WELCOME: the slot, then the eventfd.  A client
        wakes a sleeping daemon by writing to the eventfd rather than by a
        DOORBELL frame on the socket: a socket write wakes its reader with the
        "sync" hint, which tells the scheduler to run the daemon on the
        client's CPU; with two spinning parties on one CPU each hand-off then
        waits for a yield.  An eventfd wake-up carries no such hint, so the
        daemon resumes on its own (idle) CPU.
        """
        storage = Storage.create(P.SLOT_BYTES, self.config.shm_prefix)
        efd = fd = -1
        try:
            words = memoryview(storage.mm)[:P.SLOT_WORDS * 8].cast("Q")
            words[:6] = array.array("Q", P.slot_header())
            fd = os.dup(storage.fd)
            if bell:
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._ep_register(efd, _EPOLLIN, _Bell(conn))
                bell_fd = os.dup(efd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if efd >= 0:
                self._ep_unregister(efd)
                os.close(efd)
            storage.close()
            raise
        conn.slot, conn.words, conn.seq, conn.bell = storage, words, 0, efd
        self._reply_fds.append(fd)
        if efd >= 0:
            self._reply_fds.append(bell_fd)

    def _drop_slot(self, conn: Connection) -> None:
        """Stop serving a connection's slot and unmap it (idempotent)."""
        if conn.bell >= 0:
            self._ep_unregister(conn.bell)
            os.close(conn.bell)
            conn.bell = -1
        if conn.slot is None:
            return
        try:
            self._slots.remove(conn)
        except ValueError:
            pass
        if conn.words is not None:
            conn.words.release()
            conn.words = None
        conn.slot.close()
        conn.slot = None

    def _serve_slot(self, conn: Connection) -> bool:
        """Run the request in ``conn``'s slot if a new one is published; True if one was.

        Nothing in the slot is trusted: the sequence must be the next one,
        the length must fit the request area, the bytes are copied out before
        they are parsed, and every frame is checked as on the socket.  A bad
        field is a protocol violation (ERROR on the socket, then hang-up).
        """
        words = conn.words
        if words is None or conn.state != _READY:
            return False
        seq = words[_W_REQ_SEQ]
        expected = conn.seq + 1
        if seq != expected:
            if seq == conn.seq:
                return False
            self._violation(conn, ProtocolError(
                f"slot request sequence {seq}, expected {expected}"))
            self._flush(conn)
            return True
        max_output = self._max_output
        if conn.out_bytes > max_output:
            return False  # the client must read its socket first
        length = words[_W_REQ_LEN]
        if not _HEADER_SIZE <= length <= _REQ_CAP:
            self._violation(conn, ProtocolError(
                f"slot request length {length} is outside {_HEADER_SIZE}..{_REQ_CAP}"))
            self._flush(conn)
            return True
        assert conn.slot is not None
        mm = conn.slot.mm
        data = mm[_REQ_OFF:_REQ_OFF + length]  # a copy: the client may scribble meanwhile
        conn.seq = seq
        max_frame = self._max_frame
        request = self._request
        out = bytearray()
        pos = 0
        while pos < length:
            if length - pos < _HEADER_SIZE:
                self._violation(conn, ProtocolError(f"slot request ends with a truncated header of "
                                                    f"{length - pos} bytes"))
                self._flush(conn)
                return True
            blen, msg_type, flags = _unpack_header(data, pos)
            if blen > max_frame or flags or length - pos - _HEADER_SIZE < blen:
                self._violation(conn, ProtocolError(
                    f"slot frame of type {msg_type} announces {blen} bytes with flags {flags:#x}; "
                    f"{length - pos - _HEADER_SIZE} remain (limit {max_frame})"))
                self._flush(conn)
                return True
            start = pos + _HEADER_SIZE
            pos = start + blen
            if len(out) > max_output:
                exc = P.LimitExceeded(f"slot replies exceed {max_output} bytes (max_output); "
                                      "request not run")
                body = self._error(conn, msg_type, exc)
                out += _pack_header(len(body), _ERROR, 0) + body
                continue
            out += request(conn, msg_type, data[start:pos])
            if conn.state != _READY:
                break
        if self._reply_fds:  # descriptors travel on the socket, ahead of the reply
            self._queue(conn, P.DOORBELL_FRAME)
        n = len(out)
        if n <= _REP_CAP:
            mm[_REP_OFF:_REP_OFF + n] = out
            words[_W_REP_LEN] = n
        else:
            self._queue(conn, bytes(out))
            words[_W_REP_LEN] = P.REP_ON_SOCKET
        words[_W_REP_SEQ] = seq
        _fence_acquire()  # fence(), inlined
        _fence_release()
        if words[_W_CLIENT_SLEEPING]:
            self._queue(conn, P.DOORBELL_FRAME)
        if conn.out or conn.state == _CLOSING:
            self._flush(conn)
        return True

    # -- requests --------------------------------------------------------------------------------
    def _request(self, conn: Connection, msg_type: int, body: Any) -> bytes:
        """Run one request frame; its reply frame (descriptors wait in ``_reply_fds``)."""
        t0 = _clock_ns()
        conn.requests += 1
        handler = conn.handlers.get(msg_type)
        try:
            if handler is None:
                if conn.state == _HANDSHAKE:
                    raise ProtocolError(f"first message must be HELLO, got {P.type_name(msg_type)} "
                                        f"({msg_type})")
                raise P.UnknownType(f"message type {P.type_name(msg_type)} ({msg_type}) is not a request "
                                    f"served on a {conn.role.name} connection")
            reply = handler(conn, body)
            reply_type = _REPLY_TYPE.get(msg_type, _OK)
        except Exception as exc:
            for fd in self._reply_fds:  # none in practice: descriptors are taken last
                os.close(fd)
            self._reply_fds.clear()
            if conn.state == _HANDSHAKE:
                self._drop_slot(conn)
                conn.state = _CLOSING
                self.metrics.refused += 1
            reply_type = _ERROR
            reply = self._error(conn, msg_type, exc)
        metrics = self.metrics
        ring = metrics.rings.get(msg_type)
        if ring is None:
            ring = metrics.ring(msg_type)
        count = ring.count
        ring.samples[count % ring.size] = _clock_ns() - t0
        ring.count = count + 1
        if msg_type != _BATCH:
            metrics.ops[msg_type] += 1
        return _pack_header(len(reply), reply_type, 0) + reply

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
            if not out and conn.state == _CLOSING:
                self._disconnect(conn, "goodbye" if conn.goodbye else "refused")
                return
            # Frames left waiting for the client to read its replies?
            if (conn.inbuf and conn.state == _READY
                    and conn.out_bytes <= self.settings.max_output
                    and len(conn.inbuf) >= _HEADER_SIZE):
                before = len(conn.inbuf)
                self._run_inbuf(conn)
                if conn.state == _CLOSED:
                    return
                if len(conn.inbuf) != before and out:
                    continue
            break
        self._update_interest(conn)

    def _update_interest(self, conn: Connection) -> None:
        want_write = bool(conn.out)
        want_read = conn.out_bytes <= self.settings.max_output and conn.state == _READY
        if want_write == conn.writing and want_read == conn.reading:
            return
        conn.writing, conn.reading = want_write, want_read
        events = (_EPOLLIN if want_read else 0) | (_EPOLLOUT if want_write else 0)
        assert self._ep is not None
        if events:
            self._ep.modify(conn.fileno, events)
        else:  # pragma: no cover - a CLOSING connection with nothing to write is gone already
            self._ep_unregister(conn.fileno)

    # -- handlers ----------------------------------------------------------------------------------
    def _op_hello(self, conn: Connection, body: Any) -> bytes:
        if len(body) < P.HELLO.size:
            raise ProtocolError(f"first message must be HELLO of at least {P.HELLO.size} bytes, got "
                                f"{len(body)} bytes")
        magic, version, role = P.HELLO.unpack_from(body)
        if magic != P.MAGIC:
            raise P.VersionMismatch(f"bad magic {magic:#010x} (expected {P.MAGIC:#010x}): not a "
                                    "poolsvc client")
        if version not in P.VERSIONS:
            raise P.VersionMismatch(f"client speaks protocol version {version}; this daemon speaks "
                                    f"versions {', '.join(map(str, P.VERSIONS))}")
        try:
            conn.role = P.Role(role)
        except ValueError:
            raise ProtocolError(f"unknown role {role} in HELLO") from None
        features = 0
        name_at = P.HELLO.size
        if version >= P.VERSION_2:
            if len(body) < P.HELLO2.size:
                raise ProtocolError(f"version {version} HELLO of {len(body)} bytes is shorter than "
                                    f"{P.HELLO2.size}")
            features = P.HELLO2.unpack_from(body)[3]
            name_at = P.HELLO2.size
        conn.version = version
        conn.name = P.decode_name(body[name_at:])
        granted = 0
        if features & P.Feature.SHM_SLOT and self.settings.shm_slots:
            self._make_slot(conn, bool(features & P.Feature.EVENTFD_BELL))
            granted |= P.Feature.SHM_SLOT
            if conn.bell >= 0:
                granted |= P.Feature.EVENTFD_BELL
        cid = 0
        name = ""
        if conn.role == P.Role.CONTEXT:
            name = f"{conn.name or 'client'}@{conn.pid}#{conn.serial}"
            ctx = self.system.open_context(name)
            conn.context = ctx
            conn.tokens = SegmentTokens(ctx.arena)
            conn.alloc_fns = (ctx.alloc_user_buf, ctx.alloc_kernel_buf, ctx.alloc_priv_buf)
            conn.register_fns = (ctx.register_user_buf, ctx.register_kernel_buf)
            cid = ctx.cid
        conn.state = _READY
        conn.handlers = (self._context_handlers if conn.role == P.Role.CONTEXT
                         else self._monitor_handlers)
        if conn.slot is not None:
            self._slots.append(conn)
        cfg = self.config
        log.debug("%s: HELLO as %s (version %d, features %#x)", conn.label(), conn.role.name, version,
                  granted)
        welcome = P.WELCOME.pack(version, 0 if self.system.pool == "dynamic" else 1, os.getpid(), cid,
                                 int(cfg.sec_caps), int(cfg.gen_caps), self.settings.max_batch,
                                 self.settings.max_frame, cfg.dynamic_base, cfg.dynamic_size,
                                 cfg.static_base, cfg.static_size)
        if version >= P.VERSION_2:
            welcome += P.WELCOME_EXT.pack(granted, P.SLOT_BYTES if granted & P.Feature.SHM_SLOT else 0)
        return welcome + name.encode()

    def _op_ping(self, conn: Connection, body: Any) -> bytes:
        return bytes(body)

    def _op_goodbye(self, conn: Connection, body: Any) -> bytes:
        conn.goodbye = True
        self._release_context(conn)
        conn.state = _CLOSING
        if conn in self._slots:  # the slot stays mapped (its reply may be in it) until hang-up
            self._slots.remove(conn)
        return b""

    def _op_stats(self, conn: Connection, body: Any) -> bytes:
        return json.dumps(self.stats(), sort_keys=True).encode()

    def _op_alloc(self, conn: Connection, body: Any) -> bytes:
        # The hot path of ALLOC (alone or in a BATCH): plain ints, cached limits.
        kind, size = _unpack_alloc(body)
        fns = conn.alloc_fns
        if kind >= len(fns):
            raise BadParameters(f"allocation kind {kind} is not one of "
                                f"{', '.join(f'{k.value} ({k.name})' for k in P.AllocKind)}")
        held = len(conn.context.shms)
        if held >= self._max_shms:
            raise P.LimitExceeded(f"client holds {held} shms, the daemon's limit "
                                  "(max_shms_per_client)")
        limit = self._max_bytes
        if limit and conn.pool_bytes + size > limit:
            raise P.LimitExceeded(f"allocating {size} bytes would take this client to "
                                  f"{conn.pool_bytes + size} bytes, over max_bytes_per_client {limit}")
        shm = fns[kind](size)
        if limit:
            conn.pool_bytes += shm.size
            conn.alloc_sizes[shm.cookie] = shm.size
        return self._describe(conn, shm, fresh=True)

    def _describe(self, conn: Connection, shm: Any, fresh: bool) -> bytes:
        try:
            desc, fd = describe(shm, conn.tokens)
        except BaseException:
            if fresh:
                self._close_shm(conn, shm)
            raise
        if fd >= 0:
            self._reply_fds.append(fd)
        return desc

    def _op_register(self, conn: Connection, body: Any) -> bytes:
        if not conn.fds:
            raise BadParameters("REGISTER arrived without a descriptor (send one with SCM_RIGHTS "
                                "on the frame's first byte)")
        fd = conn.fds.popleft()
        try:
            kind, offset, length = P.REGISTER.unpack(body)
            if kind >= len(conn.register_fns):
                raise BadParameters(f"registration kind {kind} is not 0 (USER) or 1 (KERNEL)")
            if len(conn.context.shms) >= self.settings.max_shms_per_client:
                raise P.LimitExceeded(f"client holds {len(conn.context.shms)} shms, the daemon's limit "
                                      "(max_shms_per_client)")
            key, view = self.files.map(fd, offset, length)
        finally:
            os.close(fd)
        try:
            shm = conn.register_fns[kind](view)
        except BaseException:
            view.release()
            self.files.forget_unused(key)
            raise
        view.release()
        self.files.get(key)
        conn.registered[shm.cookie] = key
        return self._describe(conn, shm, fresh=True)

    def _op_shm_close(self, conn: Connection, body: Any) -> bytes:
        (cookie,) = _unpack_cookie(body)
        shm = conn.context.shms.get(cookie)
        if shm is None:
            raise ItemNotFound(f"no shm with cookie {cookie:#x} in this client's context")
        return self._close_shm(conn, shm)

    def _close_shm(self, conn: Connection, shm: Any) -> bytes:
        shm.close()
        if shm._refs > 0:  # shm_from_id references remain
            return _CLOSED_KEPT
        cookie = shm.cookie
        if conn.alloc_sizes:
            conn.pool_bytes -= conn.alloc_sizes.pop(cookie, 0)
        if conn.registered:
            key = conn.registered.pop(cookie, None)
            if key is not None:
                self.files.put(key)
        segment = getattr(shm._backing, "segment", None)
        if segment is None or segment.storage.fd >= 0 or conn.tokens is None:
            return _CLOSED_FREED  # no segment, or its storage lives on
        return _pack_closed(1, conn.tokens.dropped(segment.storage))

    def _op_shm_from_id(self, conn: Connection, body: Any) -> bytes:
        (shm_id,) = P.SHM_ID.unpack(body)
        shm = conn.context.shm_from_id(shm_id)
        try:
            return self._describe(conn, shm, fresh=False)
        except BaseException:
            shm.close()
            raise

    def _op_batch(self, conn: Connection, body: Any) -> bytes:
        # The loop is the compiled ``run_batch`` (ext/wire.pyx): it splits every frame
        # first (a malformed batch runs nothing), then calls the handlers in order.
        # Every operation counts in metrics.ops, failed or not (as outside a BATCH).
        return _run_batch(body, self.settings.max_batch, self._max_frame, self._batch_handlers, conn,
                          self._refuse_in_batch, self._error, self._max_output, self.metrics.ops)

    def _refuse_in_batch(self, conn: Connection, msg_type: int, unbatchable: bool) -> bytes:
        """The ERROR body of a BATCH operation that is not run: a type that may not be
        batched, or one that would take the reply over ``max_output``."""
        if unbatchable:
            exc: PoolsvcError = P.UnknownType(f"message type {P.type_name(msg_type)} ({msg_type}) "
                                              "may not appear in a BATCH")
        else:
            exc = P.LimitExceeded(f"batch reply exceeds {self._max_output} bytes (max_output); "
                                  "request not run")
        return self._error(conn, msg_type, exc)

    # -- sessions ------------------------------------------------------------------------------------
    def _session_params(self, conn: Connection, body: Any, pos: int) -> list[Any]:
        """Driver parameters from the wire; memrefs name the client's own shms only."""
        from ..tee import driver

        (count,) = P.COOKIE.unpack_from(body, pos)
        pos += P.COOKIE.size
        if count > P.MAX_PARAMS:
            raise BadParameters(f"{count} parameters; a trusted app takes at most {P.MAX_PARAMS}")
        if len(body) != pos + count * P.PARAM.size:
            raise ProtocolError(f"{count} parameters need {pos + count * P.PARAM.size} bytes of "
                                f"body, got {len(body)}")
        params: list[Any] = []
        shms = conn.context.shms
        for i in range(count):
            word, a, b, c = P.PARAM.unpack_from(body, pos + i * P.PARAM.size)
            kind, direction = word & 0xFF, (word >> 8) & 0xFF
            if direction > 2 or word & ~(0xFFFF | P.PARAM_WHOLE):
                raise BadParameters(f"parameter {i}: kind word {word:#x} is malformed")
            dname = ("in", "out", "inout")[direction]
            if kind == P.ParamKind.NONE:
                params.append(None)
            elif kind == P.ParamKind.VALUE:
                params.append(driver.Value(a, b, dname))
            elif kind == P.ParamKind.MEMREF:
                shm = shms.get(a)
                if shm is None:
                    raise ItemNotFound(f"parameter {i}: no shm with cookie {a:#x} in this client's context")
                params.append(driver.RegisteredMemref(shm, b, None if word & P.PARAM_WHOLE else c, dname))
            elif kind == P.ParamKind.NULL_MEMREF:
                params.append(driver.TempMemref(None, dname, c))
            else:
                raise BadParameters(f"parameter {i}: unknown kind {kind}")
        return params

    @staticmethod
    def _session_result(result: Any) -> bytes:
        out = [P.RESULT.pack(result.ret & 0xFFFFFFFF, result.origin & 0xFFFFFFFF, len(result.values))]
        for value, size in zip(result.values, result.sizes):
            if value is not None:
                out.append(P.OUTPUT.pack(P.OutputKind.VALUE, value[0], value[1]))
            elif size is not None:
                out.append(P.OUTPUT.pack(P.OutputKind.SIZE, size, 0))
            else:
                out.append(P.OUTPUT.pack(P.OutputKind.NONE, 0, 0))
        return b"".join(out)

    def _op_open_session(self, conn: Connection, body: Any) -> bytes:
        import uuid as uuidlib

        from ..errors import TeeError

        if len(body) < 16 + P.COOKIE.size * 2:
            raise ProtocolError(f"OPEN_SESSION body of {len(body)} bytes is shorter than 32")
        ta_uuid = uuidlib.UUID(bytes=bytes(body[:16]))
        (login,) = P.COOKIE.unpack_from(body, 16)
        if login > 0xFFFFFFFF:
            raise BadParameters(f"login {login:#x} is not a u32")
        params = self._session_params(conn, body, 16 + P.COOKIE.size)
        try:
            session = conn.context.open_session(ta_uuid, params, login)
        except TeeError as exc:
            result = getattr(exc, "result", None)
            if result is None:
                raise
            return P.COOKIE.pack(0) + self._session_result(result)
        return P.COOKIE.pack(session.id) + self._session_result(session.open_result)

    def _op_invoke(self, conn: Connection, body: Any) -> bytes:
        from ..errors import TeeError

        session_id, func, _ = P.SESSION.unpack_from(body)
        session = conn.context.sessions.get(session_id)
        if session is None:
            raise ItemNotFound(f"no session {session_id} in this client's context")
        params = self._session_params(conn, body, P.SESSION.size)
        try:
            result = session.invoke(func, params)
        except TeeError as exc:
            result = getattr(exc, "result", None)
            if result is None:
                raise
        return self._session_result(result)

    def _op_close_session(self, conn: Connection, body: Any) -> bytes:
        (session_id,) = P.COOKIE.unpack(body)
        session = conn.context.sessions.get(session_id)
        if session is None:
            raise ItemNotFound(f"no session {session_id} in this client's context")
        session.close()
        return b""

    # -- observability -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The daemon's figures: pools, clients, requests and latencies, leak counters."""
        system = self.system
        sys_stats = system.stats()
        dyn = sys_stats["dynamic"]
        pools: dict[str, Any] = {}
        if dyn is not None:
            free = dyn["free_frames"]
            pools["dynamic"] = {
                "base": dyn["base"], "size": dyn["frames"] * 4096,
                "free_bytes": free * 4096, "used_bytes": dyn["used_frames"] * 4096,
                "free_frames": free, "used_frames": dyn["used_frames"], "frames": dyn["frames"],
                "largest_free_bytes": dyn["largest_free_run"] * 4096,
                "fragmentation": 0.0 if not free else 1.0 - dyn["largest_free_run"] / free,
                "unusable_index": dyn["unusable_index"],
            }
        st = sys_stats.get("static")
        if st is not None:
            pools["static"] = {
                "base": st["base"], "size": st["size"], "free_bytes": st["free"],
                "used_bytes": st["used"], "largest_free_bytes": st["largest_free"],
                "allocations": st["allocations"],
                "fragmentation": 0.0 if not st["free"] else 1.0 - st["largest_free"] / st["free"],
            }
        clients = []
        for conn in sorted(self.connections.values(), key=lambda c: c.serial):
            entry: dict[str, Any] = {"serial": conn.serial, "name": conn.name, "pid": conn.pid,
                                     "uid": conn.uid, "role": conn.role.name, "state": ConnState(conn.state).name,
                                     "transport": "shm" if conn.slot is not None else "socket",
                                     "requests": conn.requests,
                                     "connected_s": round(time.monotonic() - conn.accepted, 3)}
            ctx = conn.context
            if ctx is not None:
                usage = ctx.usage()
                shms = list(ctx.shms.values())
                entry.update(context=ctx.name, shms=usage["shms"], bytes=usage["bytes"],
                             frames=sum(len(s.pages) for s in shms if not hasattr(s._backing, "length")),
                             registered=sum(1 for s in shms if s.cookie in conn.registered),
                             ids=sum(1 for s in shms if s.id > 0),
                             arena_bytes=usage["arena_bytes"], sessions=usage["sessions"],
                             segments_sent=len(conn.tokens.tokens) if conn.tokens else 0)
            clients.append(entry)
        return {
            "daemon": {"pid": os.getpid(), "socket": self.socket_path, "protocol": max(P.VERSIONS),
                       "protocol_versions": list(P.VERSIONS),
                       "backend": BACKEND, "pool": system.pool, "clients": len(self.connections)},
            "pools": pools,
            "ids": sys_stats["ids"],
            "registered_cookies": sys_stats["registered_cookies"],
            "mapped_frames": sys_stats["mapped_frames"],
            "contexts": len(system.contexts),
            "clients": clients,
            "requests": self.metrics.snapshot(),
            "resources": {"storage_objects": LIVE["storage"], "storage_fds": LIVE["fd"],
                          "kernel_arena_bytes": sys_stats["storage"]["kernel_arena_bytes"],
                          "registered_mappings": self.files.mapped,
                          "open_fds": _count_fds()},
            "system": sys_stats,
        }


def _count_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover
        return -1


def serve(config: Config | None = None, settings: ServiceSettings | None = None,
          install_signals: bool = True) -> None:
    """Run a daemon in this thread until SIGTERM or SIGINT (or ``Server.stop``)."""
    import signal

    server = Server(config, settings)
    server.start()
    previous = {}
    if install_signals:
        def on_signal(signum: int, frame: Any) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            server.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        server.serve_forever()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("stopped; socket %s removed", server.socket_path)


__all__ = ["ConnState", "Connection", "Server", "serve"]
