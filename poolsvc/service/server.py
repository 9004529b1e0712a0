"""The pool service daemon: one System, one Context per connection, one thread.

:class:`Server` owns a listening Unix socket (:class:`~.listener.Listener`),
a :class:`~poolsvc.system.System` and every connection
(:class:`~.connection.Connection`).  Its loop is a single-threaded epoll
loop: read what a client sent, run every complete request in order against
that client's Context, queue the replies, write them; nothing blocks, so one
slow or hostile client cannot stall the others.

The daemon in parts, one concern each, combined here:

- this module: lifecycle (start, stop, close), the loop (which serves a
  BATCH in slices between other clients' requests), accepting and ending
  connections: the peer allow-list, connections that have not said HELLO
  (at most ``max_pending``: for a new one, the HELLOs already received are
  served, else the longest-waiting one is evicted; each times out after
  ``handshake_timeout``), ``accept()`` under descriptor
  exhaustion (a reserve descriptor, no busy loop, logs rate-limited);
- :mod:`.listener`: the socket file and its lock;
- :mod:`.connection`: the per-connection state;
- :mod:`.transport`: reading frames, running requests, writing replies;
- :mod:`.slotserve`: the shm request/reply slots of version-2 clients;
- :mod:`.handlers` and :mod:`.sessions`: the request handlers;
- :mod:`.stats`: the STATS document;
- :mod:`.process`: not dumpable (applied by :func:`serve`, the process's
  entry point).

Bounded memory per connection: see :mod:`.transport` (input and output
bounds, pending descriptors) and :mod:`.handlers` (roles, live shms, pinned
bytes, batches); the threat model and every limit: docs/security.md.

The module is over 600 lines because :meth:`Server.serve_forever` is one
function on purpose: it is the hot path of every slot request, with its
names bound to locals, and splitting its polling, parking and turn-taking
branches into methods would add a call per loop turn.

Concurrency: everything here runs on the loop thread, except :meth:`Server.stop`,
which any thread or a signal handler may call (it writes one byte to a pipe).
"""
from __future__ import annotations

import errno
import gc
import logging
import os
import select
import threading
import time
from collections import Counter
from typing import Any

from .._backend import BACKEND
from ..config import Config
from ..errors import PoolsvcError, SecurityViolation
from . import protocol as P
from .connection import CLOSED, HANDSHAKE, Connection, Handler, Pinned
from .handlers import Handlers
from .listener import Listener
from .metrics import Metrics, RateLimit
from .process import disable_tracing, raise_descriptor_limit
from .provider import RegisteredFiles
from .sessions import SessionHandlers
from .settings import ServiceSettings
from .slot import YIELD_CHARGE
from .slotserve import PARK_AFTER, Bell, SlotServing, quiet_after
from .stats import stats_document
from .transport import ConnectionIO

log = logging.getLogger("poolsvc.service")

_EPOLLIN = select.EPOLLIN
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
#: Seconds the listener is left alone when even the reserve descriptor cannot take a connection.
_ACCEPT_PAUSE = 0.1
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
        self._max_bytes = 0  # set by start(), from the pool's size
        self._max_sessions = self.settings.max_sessions_per_client
        self._batch_slice = self.settings.batch_slice
        self._batches = []
        self.system: Any = None
        self.metrics = Metrics(self.settings.latency_window)
        self.files = RegisteredFiles(self.config.shm_prefix)
        self.connections = {}
        #: Connections that have not said HELLO, oldest first (fileno -> Connection).
        self._pending: dict[int, Connection] = {}
        #: READY connections per role.
        self._census: Counter[P.Role] = Counter()
        #: Connections per peer uid (every state but CLOSED).
        self._per_uid: Counter[int] = Counter()
        #: Quota figures per client process (peer pid) with a live context.
        self._pinned: dict[int, Pinned] = {}
        self._serials = 0
        #: A descriptor kept open to be given up when accept() hits the descriptor limit.
        self._reserve_fd = -1
        self._listen_paused_until = 0.0
        self._log_limit = RateLimit(10.0)
        self._listener = Listener(self.settings)
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._reply_fds = []
        self._init_io()
        self._last_expiry = 0.0
        self._ep: Any = None
        #: epoll registrations: fd -> Connection, _LISTEN or _WAKE.
        self._fdmap: dict[int, Any] = {}
        self._init_slots()
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
            P.MsgType.CANCEL: self._op_cancel,
        }
        self._batch_handlers = {int(k): v for k, v in self._handlers.items() if k in P.BATCHABLE}
        self._monitor_types = frozenset({P.MsgType.PING, P.MsgType.STATS, P.MsgType.GOODBYE,
                                         P.MsgType.CANCEL})
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
            self.system.tee.max_wait_ms = self.settings.max_ta_wait_ms
            self.system.tee.wait_hook = self._wait_serving_cancels  # CANCEL reaches a waiting app
            cfg = self.config
            pool_bytes = cfg.dynamic_size if self.system.pool == "dynamic" else cfg.static_size
            self._max_bytes = self.settings.bytes_quota(pool_bytes)
            self._reserve_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._ep = select.epoll()
            self._ep_register(listener.fileno(), _EPOLLIN, _LISTEN)
            self._ep_register(self._wake_r, _EPOLLIN, _WAKE)
        except BaseException:
            self.close()
            raise
        gc.freeze()  # the System's tables: out of every later collection
        log.info("serving %s (pool %s, backend %s, pid %d, %s bytes per client)", self.socket_path,
                 self.system.pool, BACKEND, os.getpid(), self._max_bytes or "unbounded")
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

        A BATCH being served in slices gets one slice per turn of the loop,
        and the loop does not block while one is pending.

        With shm-slot clients, the loop polls the slots that had a request
        recently (:mod:`.slotserve`: the others are parked and rung), for an
        adaptive window of at most ``shm_spin_us`` of polling (each turn
        charged at most YIELD_CHARGE, as a client's wait is) after serving one
        (checking epoll every few polls, so that socket clients are served
        meanwhile); a slot that went quiet (``quiet_after``) is parked;
        when the window passes with no request, or no slot is polled
        (nothing to spin on: parked slots ring), the loop parks every polled
        slot (a request published meanwhile is not missed) and blocks in epoll
        until a socket event or a client's doorbell.
        """
        assert self._ep is not None, "start() first"
        poll = self._ep.poll
        fdmap = self._fdmap
        slots = self._slots
        polled = slots.polled
        batches = self._batches
        run_slice = self._run_batch_slice
        admit = self._admit
        waiting = self._waiting
        take_turns = self._take_turns
        spin = self.settings.spin_us / 1e6
        max_slot_spin = self.settings.shm_spin_us / 1e6
        min_slot_spin = min(2e-6, max_slot_spin)
        park_after = PARK_AFTER * max_slot_spin
        spin_until = park_at = 0.0
        self._turn_at = 0.0
        counted_from = time.perf_counter()
        requests = 0  # slot requests served since counted_from (restarted by a sleep)
        polling = False  # within a polling window, which ``spent`` seconds of polling used
        spent = last_check = 0.0
        yield_charge = YIELD_CHARGE
        clock = time.perf_counter
        serve_ready = self._serve_ready
        yield_ = os.sched_yield
        polls = 0
        write_turn = self._write_turn
        try:
            while not self._stopping:
                if batches:  # one slice of each pending BATCH, then the others' turn
                    for conn in tuple(batches):
                        run_slice(conn)
                        if conn.batch is None and conn.slot is not None:
                            admit(conn)  # its slot may hold a request that waited
                if slots:
                    served = 0
                    if waiting and len(polled) < slots.limit(len(waiting)):  # free places go to waiting slots
                        self._turn_at = take_turns(clock())
                    if polled:
                        # serve every ready slot, then wake the sleepers among them
                        now = clock()
                        self._defer_writes = True
                        served = serve_ready(self, polled, self._bells, now)
                        self._defer_writes = False
                        if waiting and now >= self._turn_at:  # turns end just after serving (_take_turns)
                            self._turn_at = take_turns(now)
                        if served or self._bells or self._unwritten:
                            write_turn()
                        requests += served
                        if now >= park_at and not waiting:  # park the slots that went quiet (while
                            # slots wait, turns do: a polled client descheduled for a while is not idle)
                            quiet = quiet_after(park_after, len(polled), requests, now - counted_from)
                            park_at = now + quiet / 2
                            counted_from, requests = now, 0
                            self._park_idle(now - quiet)
                    now = clock()
                    if polling and not served:
                        # The window counts the polling's own time, as the client's does:
                        # a turn that gave the CPU to others is charged at most YIELD_CHARGE.
                        spent += min(now - last_check, yield_charge)
                    last_check = now
                    if served:
                        # Widen the window to twice the polling since the last slot
                        # request when that was within the bound.
                        if polling and spent <= max_slot_spin:
                            self._slot_spin = min(max_slot_spin, max(self._slot_spin, 2 * spent))
                        polling, spent = True, 0.0
                        polls += 1
                        if polls & 7:
                            continue
                        events = poll(0)
                    elif polling and polled and spent < self._slot_spin:
                        # Yield between polls: when the scheduler has put a client on
                        # this CPU, a poll that does not yield keeps it from running
                        # until preemption (see _Channel._slot_send in the client).
                        yield_()
                        polls += 1
                        if polls & 3:
                            continue
                        events = poll(0)
                    else:  # the window has passed, or every slot is parked: epoll
                        if polling:
                            if spent >= self._slot_spin:  # a whole window without a request: narrow it
                                self._slot_spin = max(min_slot_spin, self._slot_spin / 2)
                            polling = False
                        events = poll(0)
                        if not events and waiting:  # no sleep while slots wait; their turn comes
                            self._turn_at = take_turns(clock())
                            yield_()
                            continue
                        if not events and not batches:
                            events = self._sleep(poll)
                            counted_from, requests = clock(), 0  # every slot was parked
                            # Woken up (by a doorbell, mostly): the next window is full
                            # width again.  Learning only from gaps seen while polling
                            # would trap a client whose think time exceeds a narrowed
                            # window: every request would ring, and no gap would be short.
                            self._slot_spin = max_slot_spin
                        if events is None:
                            continue
                else:
                    events = poll(0 if batches or clock() < spin_until else 1.0)
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
                    elif type(data) is Bell:  # edge-triggered: nothing to read
                        admit(data.conn)  # a request in its parked slot
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
                            if data.slot is not None:
                                admit(data)  # its slot may hold a request that waited
                self._expire_handshakes()
        finally:
            self._defer_writes = False
            self._unwritten.clear()
            self._bells.clear()
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
        for fd in (self._wake_r, self._wake_w, self._reserve_fd):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = self._reserve_fd = -1

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
                self._accept_failed(listener, exc)
                return
            sock.setblocking(False)
            self._serials += 1
            conn = Connection(sock, self._serials)
            self.metrics.connections += 1
            refusal = self._refusal(conn)
            if refusal is not None:
                self.metrics.refused += 1
                self._log_limited("refuse", logging.WARNING, "refusing %s: %s", conn.label(), refusal)
                try:
                    sock.send(P.frame(P.MsgType.ERROR, P.error_body(refusal)))
                except OSError:
                    pass
                sock.close()
                continue
            if len(self._pending) >= self.settings.max_pending:
                self._make_room()
            self.connections[conn.fileno] = conn
            self._pending[conn.fileno] = conn
            self._per_uid[conn.uid] += 1
            conn.handlers = self._hello_handlers
            self._ep_register(conn.fileno, _EPOLLIN, conn)
            log.debug("accepted %s", conn.label())

    def _make_room(self) -> None:
        """Room for one more connection without a HELLO (``max_pending`` are waiting).

        First the HELLOs already received are served (a burst of connections
        is accepted before the loop reads any of them), which takes those
        connections out of the pending ones; if none had sent its HELLO, the
        one that has waited longest is dropped: silent connections cannot lock
        others out.  At most ``max_pending`` reads per accepted connection.
        """
        for conn in list(self._pending.values()):
            if conn.state == HANDSHAKE:
                self._on_readable(conn)
        if len(self._pending) >= self.settings.max_pending:
            oldest = next(iter(self._pending.values()))
            self.metrics.refused += 1
            self._disconnect(oldest, f"no HELLO while {len(self._pending)} connections waited "
                                     "for theirs (max_pending)")

    def _refusal(self, conn: Connection) -> PoolsvcError | None:
        """Why a new connection is refused at once (its peer is not allowed), or None."""
        uids, gids = self.settings.allowed_uids, self.settings.allowed_gids
        if uids is not None and conn.uid not in uids:
            return SecurityViolation(f"uid {conn.uid} may not use this daemon (allowed_uids)")
        if gids is not None and conn.gid not in gids:
            return SecurityViolation(f"gid {conn.gid} may not use this daemon (allowed_gids)")
        limit = self.settings.max_connections_per_uid
        if limit and self._per_uid[conn.uid] >= limit:
            return P.LimitExceeded(f"uid {conn.uid} holds {limit} connections already "
                                   "(max_connections_per_uid)")
        return None

    def _accept_failed(self, listener: Any, exc: OSError) -> None:
        """accept() failed: under the descriptor limit, give up the reserve descriptor,
        accept and close one connection (its client sees the refusal at once instead
        of waiting), take the reserve back; if even that fails, stop watching the
        listener for a moment.  Never a busy loop; logged at most once per interval."""
        self.metrics.refused += 1
        self._log_limited("accept", logging.ERROR, "accept failed: %s", exc)
        if exc.errno in (errno.EMFILE, errno.ENFILE) and self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
            try:
                sock, _ = listener.accept()
                sock.close()
            except OSError:
                pass
            try:
                self._reserve_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
            if self._reserve_fd >= 0:
                return
        self._listen_paused_until = time.monotonic() + _ACCEPT_PAUSE
        self._ep.modify(listener.fileno(), 0)

    def _log_limited(self, key: str, level: int, msg: str, *args: Any) -> None:
        """``log.log`` at most once per interval per ``key`` (with a count of the dropped)."""
        dropped = self._log_limit.allow(key)
        if dropped is None:
            return
        if dropped:
            msg += f" ({dropped} similar messages suppressed)"
        log.log(level, msg, *args)

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        if self._listen_paused_until and now >= self._listen_paused_until:
            self._listen_paused_until = 0.0
            if self._listener.sock is not None:
                self._ep.modify(self._listener.sock.fileno(), _EPOLLIN)
        if not self._pending or now - self._last_expiry < 0.1:
            return
        self._last_expiry = now
        limit = self.settings.handshake_timeout
        for conn in list(self._pending.values()):
            if now - conn.accepted <= limit:
                break  # oldest first: the rest are younger
            # Silent, or refused at HELLO and not reading its ERROR: gone either way.
            if conn.state == HANDSHAKE:  # (one refused at HELLO is counted already)
                self.metrics.refused += 1
            self._disconnect(conn, f"no HELLO within {limit} s")

    def _pinned_of(self, pid: int) -> Pinned:
        """The quota figures of client process ``pid``, with one more connection using them."""
        pinned = self._pinned.get(pid)
        if pinned is None:
            pinned = self._pinned[pid] = Pinned(pid)
        pinned.users += 1
        return pinned

    def _count_as(self, conn: Connection, role: P.Role) -> None:
        """``conn`` has said HELLO: count it under its role, no longer as pending."""
        self._pending.pop(conn.fileno, None)
        self._census[role] += 1
        conn.counted = True

    def _disconnect(self, conn: Connection, reason: str) -> None:
        """Forget a connection and release everything its client held."""
        if conn.state == CLOSED:
            return
        was = conn.state
        conn.state = CLOSED
        self.connections.pop(conn.fileno, None)
        self._per_uid[conn.uid] -= 1
        if not self._per_uid[conn.uid]:
            del self._per_uid[conn.uid]
        if self._pending.pop(conn.fileno, None) is None and conn.counted:
            self._census[conn.role] -= 1
        if conn.batch is not None:
            for fd in conn.batch.fds:
                os.close(fd)
            conn.batch = None
            self._batches.remove(conn)
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
        pinned = conn.pinned
        if pinned is not None:  # closing the context releases everything it pinned
            pinned.allocated -= conn.pool_bytes
            pinned.registered -= conn.registered_bytes
            pinned.users -= 1
            if not pinned.users:
                del self._pinned[pinned.pid]
            conn.pinned = None
        conn.pool_bytes = conn.registered_bytes = 0
        conn.alloc_sizes.clear()
        try:
            ctx.close()
        except Exception:  # keep serving the others; the System's tests own this path
            log.exception("closing the context of %s failed", conn.label())
        for reg in conn.registered.values():
            if reg.storage is not None:
                self.files.put(reg)
        conn.registered.clear()
        if conn.tokens is not None:
            conn.tokens.clear()
        conn.alloc_fns = conn.register_fns = ()
        return held

    @property
    def bytes_quota(self) -> int:
        """Bytes one client may pin (allocated plus registered); 0: no bound."""
        return self._max_bytes

    def connection_counts(self) -> dict[str, int]:
        """Connections waiting for their HELLO, and READY ones per role."""
        counts = {"pending": len(self._pending)}
        for role in P.Role:
            counts[role.name.lower()] = self._census[role]
        return counts

    def stats(self) -> dict[str, Any]:
        """The daemon's figures (see :func:`.stats.stats_document`)."""
        return stats_document(self)


def serve(config: Config | None = None, settings: ServiceSettings | None = None,
          install_signals: bool = True) -> None:
    """Run a daemon in this thread until SIGTERM or SIGINT (or ``Server.stop``).

    The daemon process's entry point: it makes the process not dumpable first
    (:mod:`.process`), so that same-uid processes cannot open its ``/proc`` files.
    """
    import signal

    disable_tracing()  # before any client's memory is in this process
    server = Server(config, settings)
    limits = server.settings
    raise_descriptor_limit(limits.max_clients + limits.max_monitors + limits.max_pending)
    previous = {}
    if install_signals:  # before the socket exists: a client may signal as soon as it sees it
        def on_signal(signum: int, frame: Any) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            server.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        server.start()
        server.serve_forever()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("stopped; socket %s removed", server.socket_path)


__all__ = ["Server", "serve"]
