"""One client connection of the pool service, and the state the daemon's parts share.

:class:`Connection` is everything the daemon holds for one client: its socket,
state (:class:`ConnState`), role, peer credentials, Context, input buffer,
queued replies, received descriptors, shm slot and per-client counters.

Life of a connection (:class:`ConnState`): HANDSHAKE (only HELLO is accepted,
within ``handshake_timeout``) -> READY -> CLOSING (a final reply is queued;
hang up once it is written) -> CLOSED.  A CONTEXT connection owns one
Context; when the connection ends for any reason (GOODBYE, EOF, reset,
SIGKILL of the client mid-request, a protocol violation) the Context is
closed, which releases its shms, ids, frames, sessions and storage, and the
daemon's shadows of objects it registered.

:class:`SlotSet` holds the READY connections with a shm slot, polled or
parked (the rule is in :mod:`.slotserve`), and :class:`WaitQueue` the parked
ones waiting for a polled place.

:class:`ServerParts` declares the attributes and methods the daemon's parts
(the loop in :mod:`.server`, connection I/O in :mod:`.transport`, slot
serving in :mod:`.slotserve`, request handlers in :mod:`.handlers` and
:mod:`.sessions`) use from one another; :class:`~.server.Server` combines
them.

Concurrency: the daemon's loop thread only.
"""
from __future__ import annotations

import socket
import struct
import time
from collections import Counter, OrderedDict, deque
from enum import IntEnum
from itertools import zip_longest
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..config import Config
from ..errors import ProtocolError
from ..storage import Storage
from . import protocol as P
from . import slot as S
from .metrics import Metrics
from .provider import RegisteredFiles, Registration, SegmentTokens
from .settings import ServiceSettings

_PEERCRED = struct.Struct("3i")


class ConnState(IntEnum):
    """Life of a connection."""

    HANDSHAKE = 1
    READY = 2
    CLOSING = 3
    CLOSED = 4


#: Plain ints on the hot path (Connection.state holds one of these).
HANDSHAKE, READY, CLOSING, CLOSED = 1, 2, 3, 4


class Connection:
    """One client connection and everything the daemon holds for it."""

    __slots__ = ("sock", "fileno", "serial", "state", "role", "pid", "uid", "gid", "name", "context",
                 "tokens", "inbuf", "out", "out_bytes", "fds", "registered", "alloc_fns",
                 "register_fns", "pool_bytes", "registered_bytes", "alloc_sizes", "requests", "accepted",
                 "reading", "writing", "goodbye", "handlers", "version",
                 "slot", "words", "seq", "bell", "served_at", "polled_at", "turn_from", "brief", "batch", "counted",
                 "pinned",
                 "shm_requests")

    def __init__(self, sock: socket.socket, serial: int) -> None:
        self.sock = sock
        self.fileno = sock.fileno()
        self.serial = serial
        self.state = HANDSHAKE
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
        #: cookie -> where the bytes live, for shms this client registered.
        self.registered: dict[int, Registration] = {}
        self.alloc_fns: tuple[Callable[[int], Any], ...] = ()
        self.register_fns: tuple[Callable[[int, int, int], Any], ...] = ()
        #: Quota figures: bytes of the shms this client allocated (by cookie in
        #: ``alloc_sizes``) and of the page spans it registered (in ``registered``).
        #: ``pool_bytes == sum(alloc_sizes.values())``.
        self.pool_bytes = 0
        self.registered_bytes = 0
        self.alloc_sizes: dict[int, int] = {}
        self.requests = 0
        self.accepted = time.monotonic()
        self.reading = True
        self.writing = False
        self.goodbye = False
        #: Request handlers of this connection's state and role, by message type.
        self.handlers: dict[int, Handler] = {}
        self.version = P.VERSION
        #: The shm slot (Storage) of a version-2 connection that asked for one,
        #: its first page as u64 words, and the sequence of the last request served.
        self.slot: Storage | None = None
        self.words: memoryview | None = None
        self.seq = 0
        #: The eventfd the client rings to wake the daemon (-1: none).
        self.bell = -1
        #: When the loop last served (or unparked) the slot (perf_counter seconds).
        self.served_at = 0.0
        #: When the slot last joined the polled ones (perf_counter seconds).
        self.polled_at = 0.0
        #: ``requests`` when the slot last joined the polled ones.
        self.turn_from = 0
        #: Its last polled place was a brief visit (few requests; :class:`WaitQueue`).
        self.brief = False
        #: A BATCH being served in slices (see ``Handlers._start_batch``), or None.
        self.batch: Any = None
        #: Counted in the server's census of READY connections per role.
        self.counted = False
        #: The quota figures (a Pinned) of the client process, shared by all its
        #: CONTEXT connections; None until HELLO, and for monitors.
        self.pinned: Any = None
        #: The ``core.ShmRequests`` serving this connection's ALLOC and SHM_CLOSE
        #: (made at HELLO for a CONTEXT connection; None before, and for monitors).
        self.shm_requests: Any = None

    def label(self) -> str:
        return f"client #{self.serial} (pid {self.pid}{', ' + self.name if self.name else ''})"


_WAKE = object()
_LISTEN = object()


class Pinned:
    """What one client process (peer pid) pins over all its CONTEXT connections: the
    figures its byte quota is checked against.

    ``allocated == sum(c.pool_bytes)`` and ``registered == sum(c.registered_bytes)``
    over the ``users`` live connections of that pid.
    """

    __slots__ = ("pid", "allocated", "registered", "users")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.allocated = 0
        self.registered = 0
        self.users = 0


class SlotSet:
    """The READY connections with a shm slot: every one (``members``) and the
    ones the loop polls (``polled``, a subset); the others are parked.

    Invariants: ``polled <= members``; each member has a mapped slot
    (``conn.words`` is not None); ``words[W_DAEMON_SLEEPING] == 0`` only for a
    polled member (a parked one says 1).  The list-like methods (``append``,
    ``remove``, ``in``) add and drop members; a new member is polled while
    fewer than ``cap`` are (0: always) and none waits for a place, else parked.
    """

    __slots__ = ("members", "polled", "cap")

    def __init__(self, cap: int = 0) -> None:
        self.members: dict[Connection, None] = {}
        self.polled: dict[Connection, None] = {}
        #: The most slots polled at once (``max_polled_slots``; 0: no bound).
        self.cap = cap

    def append(self, conn: Connection, waiting: int = 0) -> None:
        """Serve ``conn``'s slot: polled if there is room and no slot waits for a place
        (``waiting`` do), else parked (its client rings, and it queues behind them)."""
        assert conn.words is not None
        self.members[conn] = None
        conn.served_at = conn.polled_at = time.perf_counter()
        if self.cap and (waiting or len(self.polled) >= self.cap):
            conn.words[S.W_DAEMON_SLEEPING] = 1
        else:
            self.poll(conn)

    def poll(self, conn: Connection) -> None:
        """Poll member ``conn``'s parked slot from now on: its turn starts."""
        self.polled[conn] = None
        conn.served_at = conn.polled_at = time.perf_counter()
        conn.turn_from = conn.requests
        conn.words[S.W_DAEMON_SLEEPING] = 0  # type: ignore[index]

    def limit(self, waiting: int) -> int:
        """The most slots polled while ``waiting`` slots wait for a place: ``cap``,
        or half of it while more than ``cap`` wait (0: no bound)."""
        cap = self.cap
        return cap if waiting <= cap else max(1, cap // 2)

    def extra(self, waiting: int) -> bool:
        """Whether the loop keeps the extra place (:class:`WaitQueue`) while ``waiting``
        slots wait: while :meth:`limit` is halved, the place fits under ``cap``."""
        return 0 < self.limit(waiting) < self.cap

    def remove(self, conn: Connection) -> None:
        """Stop serving ``conn``'s slot; ValueError if it was not served."""
        try:
            del self.members[conn]
        except KeyError:
            raise ValueError("connection has no served slot") from None
        self.polled.pop(conn, None)

    def __contains__(self, conn: object) -> bool:
        return conn in self.members

    def __iter__(self) -> Iterator[Connection]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)


#: A polled place that served at most this many requests was a brief visit
#: (:meth:`WaitQueue.note_visit`): the way a client making an occasional
#: request uses a place, against the hundreds to thousands of a busy client's turn.
BRIEF_REQUESTS = 16


class WaitQueue:
    """Parked slots waiting for a polled place: two first-come lanes, and the order
    in which places go to them.

    A slot whose last place was a brief visit (``conn.brief``, kept by
    :meth:`note_visit`) queues in the ``brief`` lane; every other slot, a new
    one included, in the ``full`` lane.  While both lanes hold slots, freed
    places go to them in turn (:meth:`pop`): a slot k-th in its lane gets one
    within 2k freed places.  The daemon also keeps one short extra place for
    the first slot of the brief lane (:meth:`pop_brief`; the rule is in
    :mod:`.slotserve`).

    What a client can win: reconnecting puts it at the back of the full lane;
    keeping its visits brief gives it early places, and the extra one, each for
    at most ``BRIEF_REQUESTS`` requests before it counts as busy again.

    Invariant: a slot is in at most one lane; iteration gives the order of
    :meth:`pop`.
    """

    __slots__ = ("brief", "full", "_brief_next")

    def __init__(self) -> None:
        self.brief: OrderedDict[Connection, None] = OrderedDict()
        self.full: OrderedDict[Connection, None] = OrderedDict()
        #: The next place goes to the brief lane (if it holds a slot).
        self._brief_next = True

    @staticmethod
    def note_visit(conn: Connection) -> None:
        """``conn``'s polled place just ended: it was a brief visit if it served at
        most ``BRIEF_REQUESTS`` requests (``conn.brief``)."""
        conn.brief = conn.requests - conn.turn_from <= BRIEF_REQUESTS

    def add(self, conn: Connection) -> None:
        """Queue ``conn`` at the back of its lane (a queued slot keeps its position)."""
        if conn not in self:
            (self.brief if conn.brief else self.full)[conn] = None

    def pop(self) -> Connection:
        """The slot the next freed place goes to; KeyError if none waits."""
        if self.brief and (self._brief_next or not self.full):
            self._brief_next = False
            return self.brief.popitem(last=False)[0]
        self._brief_next = True
        return self.full.popitem(last=False)[0]

    def pop_brief(self) -> Connection | None:
        """The first slot of the brief lane (taken out), or None; the turn of the lanes
        is unchanged (this is the extra place's, not a freed one)."""
        return self.brief.popitem(last=False)[0] if self.brief else None

    def discard(self, conn: Connection) -> None:
        """Take ``conn`` out of the queue, if it waits."""
        self.brief.pop(conn, None)
        self.full.pop(conn, None)

    def __contains__(self, conn: object) -> bool:
        return conn in self.brief or conn in self.full

    def __len__(self) -> int:
        return len(self.brief) + len(self.full)

    def __bool__(self) -> bool:
        return bool(self.brief) or bool(self.full)

    def __iter__(self) -> Iterator[Connection]:
        lanes = (self.brief, self.full) if self._brief_next else (self.full, self.brief)
        for pair in zip_longest(*lanes):
            yield from (conn for conn in pair if conn is not None)


#: A request handler: (connection, body) -> reply body.
Handler = Callable[[Connection, Any], bytes]


class ServerParts:
    """What the parts of :class:`~.server.Server` share (declarations for the type checker)."""

    config: Config
    settings: ServiceSettings
    system: Any
    metrics: Metrics
    files: RegisteredFiles
    connections: dict[int, Connection]
    #: Descriptors to send with the next queued reply.
    _reply_fds: list[int]
    #: READY connections with a shm slot, polled or parked (see :mod:`.slotserve`).
    _slots: SlotSet
    #: Parked slots waiting for a polled place (see :mod:`.slotserve`).
    _waiting: WaitQueue
    #: The slot in the extra place (see :mod:`.slotserve`), or None.
    _guest: Connection | None
    #: When the loop looks at the turns next (perf_counter seconds).
    _turn_at: float
    #: Connections whose clients are rung once the loop has served every ready slot.
    _bells: list[Connection]
    _ring: Callable[[Any, Connection], None]
    #: True while the loop serves the ready slots (see :mod:`.transport`).
    _defer_writes: bool
    _stopping: bool
    _ep: Any
    # limits read on every request
    _max_output: int
    _max_frame: int
    _max_shms: int
    _max_bytes: int
    _max_sessions: int
    _batch_slice: int
    _census: Counter[P.Role]
    #: Connections with a BATCH being served in slices.
    _batches: list[Connection]
    _batch_handlers: dict[int, Handler]
    _context_handlers: dict[int, Handler]
    _monitor_handlers: dict[int, Handler]

    if TYPE_CHECKING:  # defined by the parts; declared here so that each part type-checks alone
        def _ep_register(self, fd: int, events: int, data: Any) -> None: ...
        def _ep_unregister(self, fd: int) -> None: ...
        def _disconnect(self, conn: Connection, reason: str) -> None: ...
        def _release_context(self, conn: Connection) -> int: ...
        def _request(self, conn: Connection, msg_type: int, body: Any) -> bytes: ...
        def _error(self, conn: Connection, msg_type: int, exc: Exception) -> bytes: ...
        def _queue(self, conn: Connection, data: bytes) -> None: ...
        def _flush(self, conn: Connection) -> None: ...
        def _write(self, conn: Connection) -> None: ...
        def _failed(self, conn: Connection, msg_type: int, exc: Exception, held: int) -> bytes: ...
        def _update_interest(self, conn: Connection) -> None: ...
        def _start_batch(self, conn: Connection, body: Any,
                         on_done: Callable[[Connection, bytes], None] | None = None) -> bool: ...
        def _run_batch_slice(self, conn: Connection) -> None: ...
        def _pinned_of(self, pid: int) -> Pinned: ...
        def _count_as(self, conn: Connection, role: P.Role) -> None: ...
        def _log_limited(self, key: str, level: int, msg: str, *args: Any) -> None: ...
        def _violation(self, conn: Connection, exc: ProtocolError) -> None: ...
        def _make_slot(self, conn: Connection, bell: bool) -> None: ...
        def _drop_slot(self, conn: Connection) -> None: ...
        def _unpark(self, conn: Connection) -> None: ...
        def _admit(self, conn: Connection) -> None: ...
        def _close_shm(self, conn: Connection, shm: Any) -> bytes: ...
        def stats(self) -> dict[str, Any]: ...


__all__ = ["BRIEF_REQUESTS", "CLOSED", "CLOSING", "HANDSHAKE", "READY", "ConnState", "Connection", "Handler",
           "Pinned", "ServerParts", "SlotSet", "WaitQueue"]
