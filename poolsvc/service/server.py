"""The pool service daemon: one System, one Context per connection, one thread.

:class:`Server` owns a listening Unix socket (:class:`~.listener.Listener`),
a :class:`~poolsvc.system.System` and every connection
(:class:`~.connection.Connection`).  Its loop is a single-threaded epoll
loop: read what a client sent, run every complete request in order against
that client's Context, queue the replies, write them; nothing blocks, so one
slow or hostile client cannot stall the others.

The daemon in parts, one concern each, combined here:

- this module: lifecycle (start, stop, close), the loop, accepting and
  ending connections, the handshake timeout;
- :mod:`.listener`: the socket file and its lock;
- :mod:`.connection`: the per-connection state;
- :mod:`.transport`: reading frames, running requests, writing replies;
- :mod:`.slotserve`: the shm request/reply slots of version-2 clients;
- :mod:`.handlers` and :mod:`.sessions`: the request handlers;
- :mod:`.stats`: the STATS document.

Bounded memory per connection: see :mod:`.transport` (input and output
bounds, pending descriptors) and :mod:`.handlers` (live shms, pool bytes).

Concurrency: everything here runs on the loop thread, except :meth:`Server.stop`,
which any thread or a signal handler may call (it writes one byte to a pipe).
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any

from .._backend import BACKEND
from ..config import Config
from . import protocol as P
from .connection import CLOSED, HANDSHAKE, Connection, Handler
from .handlers import Handlers
from .listener import Listener
from .metrics import Metrics
from .provider import RegisteredFiles
from .sessions import SessionHandlers
from .settings import ServiceSettings
from .slotserve import Bell, SlotServing
from .stats import stats_document
from .transport import ConnectionIO

log = logging.getLogger("poolsvc.service")

_EPOLLIN = select.EPOLLIN
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_W_REQ_SEQ = P.W_REQ_SEQ
_WAKE = object()
_LISTEN = object()


class Server(ConnectionIO, SlotServing, Handlers, SessionHandlers):
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
        self.connections = {}
        self._serials = 0
        self._listener = Listener(self.settings)
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._reply_fds = []
        self._init_io()
        self._last_expiry = 0.0
        self._ep: Any = None
        #: epoll registrations: fd -> Connection, _LISTEN or _WAKE.
        self._fdmap: dict[int, Any] = {}
        self._slots = []
        #: Current slot-polling window, adapted between 2 us and shm_spin_us.
        self._slot_spin = self.settings.shm_spin_us / 1e6
        self._handlers: dict[int, Handler] = {
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
        self._hello_handlers: dict[int, Handler] = {int(P.MsgType.HELLO): self._op_hello}
        self.started = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        return self.settings.socket_path

    def start(self) -> None:
        """Take the socket's lock, remove a crashed predecessor's socket, bind, build the System."""
        from ..system import System

        listener = self._listener.open()
        try:
            self.system = System(self.config)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._ep = select.epoll()
            self._ep_register(listener.fileno(), _EPOLLIN, _LISTEN)
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
                    elif type(data) is Bell:
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
                        if mask & _READABLE and data.state < CLOSED:
                            self._on_readable(data)
                        if mask & _WRITABLE and data.state < CLOSED and data.out:
                            self._flush(data)
                self._expire_handshakes()
        finally:
            self.close()

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
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- connections ----------------------------------------------------------------------------
    def _accept(self) -> None:
        listener = self._listener.sock
        assert listener is not None and self._ep is not None
        while True:
            try:
                sock, _ = listener.accept()
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
            if conn.state == HANDSHAKE and now - conn.accepted > limit:
                self.metrics.refused += 1
                self._disconnect(conn, f"no HELLO within {limit} s")

    def _disconnect(self, conn: Connection, reason: str) -> None:
        """Forget a connection and release everything its client held."""
        if conn.state == CLOSED:
            return
        was = conn.state
        conn.state = CLOSED
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
        if not conn.goodbye and conn.role == P.Role.CONTEXT and was != HANDSHAKE \
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

    def stats(self) -> dict[str, Any]:
        """The daemon's figures (see :func:`.stats.stats_document`)."""
        return stats_document(self)


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


__all__ = ["Server", "serve"]
