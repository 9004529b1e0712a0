"""The client's connection to the pool service: socket, framing, descriptors, slot.

A :class:`Channel` is one Unix-socket connection speaking the protocol of
:mod:`.protocol`: connecting, the handshake, fork checks, the descriptor
queue, the storage segments those descriptors map, and closing.  The request
path (pipelined request frames and their reply callbacks, sends with
SCM_RIGHTS, receives, reply framing, and with the shm transport the client
end of the connection's request/reply slot) is the wire of the selected
backend, ``core.ClientWire`` and ``core.ClientSlot`` (``ext/clientwire.pyx``,
twin ``poolsvc/_pure/clientwire.py``; docs/core.md "The client wire"), to
which the request methods here delegate.

Handshake: one HELLO (version 2 with the shm transport, version 1 when the
daemon only speaks that), said again on a new connection, backing off, when
the daemon hangs up without answering (a daemon flooded with connections
drops some before their HELLO); a refusal comes as an ERROR and is raised.

Timeouts: ``connect_timeout`` bounds the socket connect and the handshake,
``timeout`` every later wait for the daemon; both are kernel socket timeouts
(``SO_RCVTIMEO`` / ``SO_SNDTIMEO``), so a request costs no extra system call.
A wait that runs out closes the channel (its stream position is unknown) and
raises :class:`DaemonTimeout`.

Processes: a channel belongs to the process that opened it.  In a forked
child every request raises :class:`UsedAfterFork` before anything is sent or
written into the slot, so the parent's connection is never disturbed;
``close()`` there only drops the child's copies of the descriptors and
mappings.  Objects holding a channel refuse to be pickled (spawn and
forkserver children must call ``connect()`` themselves).

Concurrency: a channel belongs to one thread at a time.
"""
from __future__ import annotations

import mmap
import os
import random
import socket
import stat
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Self, Sequence

from .._backend import core
from ..errors import BadParameters, Closed, NotSupported, ProtocolError
from . import protocol as P
from .slot import ClientSlot

#: Room a receive asks the kernel to fill, in bytes (one preallocated buffer).
RECV_SIZE = 256 << 10
#: Pipelined requests whose replies a channel reads before sending more.
MAX_IN_FLIGHT = 64
#: Default time a client polls for a reply before sleeping in ``recvmsg``,
#: in microseconds (see :func:`~.client.connect`).
DEFAULT_SPIN_US = 0
#: Transports a client may ask for (see :func:`~.client.connect`).
TRANSPORTS = ("socket", "shm")
#: Default transport of :func:`~.client.connect`.
DEFAULT_TRANSPORT = "shm"
#: Default longest time a shm-slot client polls its slot for a reply before
#: it sleeps on the socket, in microseconds (see :class:`~.slot.ClientSlot`
#: for when it polls at all).
DEFAULT_SHM_SPIN_US = 200
#: First and longest pause, in seconds, before saying HELLO again on a new
#: connection when the daemon hung up without answering (see ``Channel._greet``).
RETRY_FIRST, RETRY_MAX = 0.002, 0.2
#: Default bound, in seconds, on connecting and on the handshake.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Default bound, in seconds, on each later wait for the daemon.
DEFAULT_TIMEOUT = 60.0

pack_header = P.HEADER.pack
_GOODBYE = int(P.MsgType.GOODBYE)
#: Message types, ALLOC kinds and body sizes as ints, for the hot request paths
#: (an IntEnum member costs an attribute lookup and a conversion per use).
ALLOC, SHM_CLOSE = int(P.MsgType.ALLOC), int(P.MsgType.SHM_CLOSE)
ALLOC_USER, ALLOC_KERNEL, ALLOC_PRIV = int(P.AllocKind.USER), int(P.AllocKind.KERNEL), int(P.AllocKind.PRIV)
ALLOC_BODY, COOKIE_BODY, CLOSED_SIZE = P.ALLOC.size, P.COOKIE.size, P.CLOSED.size
#: Whole ALLOC and SHM_CLOSE frames (header and body) in one struct call.
pack_alloc_frame = struct.Struct("<" + P.HEADER.format.lstrip("<") + P.ALLOC.format.lstrip("<")).pack
pack_close_frame = struct.Struct("<" + P.HEADER.format.lstrip("<") + P.COOKIE.format.lstrip("<")).pack


class UsedAfterFork(Closed):
    """A client object was used in a process forked from the one that connected it.

    The connection belongs to the parent; the child must ``connect()`` on its own.
    """


class DaemonTimeout(Closed):
    """The daemon did not answer within the client's timeout; the connection is closed."""


#: Forks this process has gone through (counted in the child); a channel
#: opened at another count belongs to an ancestor.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


def refuse_pickle(what: object) -> NoReturn:
    """``__reduce__`` of the objects holding a channel: they cannot cross processes."""
    raise NotSupported(f"{type(what).__name__} objects hold a connection of this process and "
                       "cannot be sent to another process; call poolsvc.connect() there")


class Handle:
    """Base of the client's closable objects: ``with`` closes them, pickling is refused."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> NoReturn:
        refuse_pickle(self)


def check_process(forks: int, path: str) -> None:
    """UsedAfterFork unless this process is the one that counted ``forks``
    (the ``forks`` of a channel it opened) when connecting to ``path``."""
    if forks != _forks:
        raise UsedAfterFork(f"this connection to the pool service at {path} was opened by "
                            f"another process (pid {os.getppid()} or an ancestor) before a fork; "
                            "call poolsvc.connect() in this process")


def check_timeout(what: str, value: Any) -> float | None:
    """``value`` as a timeout in seconds (None: wait forever); BadParameters otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise BadParameters(f"{what} {value!r} is not a positive number of seconds or None")
    return float(value)


def check_reply(reply_type: int, body: memoryview, what: str) -> memoryview:
    """``body`` of an OK reply; the daemon's error (or ProtocolError) otherwise."""
    if reply_type == P.MsgType.OK:
        return body
    if reply_type == P.MsgType.ERROR:
        raise P.error_from_body(body)
    raise ProtocolError(f"daemon answered {what} with {P.type_name(reply_type)}")


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO (zero: no bound)."""
    if seconds is None:
        return struct.pack("ll", 0, 0)
    whole = int(seconds)
    micros = int((seconds - whole) * 1e6)
    return struct.pack("ll", whole, micros if whole or micros else 1)


def _why_unreachable(path: str, exc: OSError) -> str:
    """Why ``connect(path)`` failed, naming a path that is not a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            return f"directory {parent} does not exist"
        return "no socket there (is the daemon running?)"
    except OSError:
        return exc.strerror or str(exc)
    if stat.S_ISDIR(mode):
        return "it is a directory, not a socket"
    if not stat.S_ISSOCK(mode):
        return "it is a regular file, not a socket" if stat.S_ISREG(mode) else "it is not a socket"
    return exc.strerror or str(exc)


@dataclass(frozen=True)
class Dialer:
    """How a client reaches its daemon: the socket path and the connection options
    of :func:`~.client.connect`; :meth:`open` makes one connection."""

    path: str
    spin_us: float = DEFAULT_SPIN_US
    timeout: float | None = DEFAULT_TIMEOUT
    transport: str = DEFAULT_TRANSPORT
    shm_spin_us: float = DEFAULT_SHM_SPIN_US
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT

    def open(self, role: P.Role, name: str) -> "Channel":
        """A new connection in ``role`` whose context (or monitor) is called ``name``."""
        return Channel(self.path, role, name, self.spin_us, self.timeout, self.transport,
                       self.shm_spin_us, self.connect_timeout)


class Channel:
    """One connection: framing, descriptor queue, pipelined replies, mapped segments."""

    def __init__(self, path: str, role: P.Role, name: str, spin_us: float,
                 timeout: float | None, transport: str = DEFAULT_TRANSPORT,
                 shm_spin_us: float = DEFAULT_SHM_SPIN_US,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.path = path
        self.spin = max(0.0, spin_us) / 1e6
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.forks = _forks
        self.closed = False
        #: The client's end of the shm slot (a ``core.ClientSlot``), None on the socket transport.
        self.slot: Any = None
        #: The daemon's eventfd doorbell for this connection (-1: DOORBELL frames).
        self.bell = -1
        self.fds: deque[int] = deque()
        self.segments: dict[int, mmap.mmap] = {}
        self.stale: list[mmap.mmap] = []
        if transport not in TRANSPORTS:
            self.closed = True
            raise BadParameters(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        #: The request path (a ``core.ClientWire``); its outbox and reply callbacks
        #: are this channel's ``outbox`` and ``pending`` (pipelined requests queue there).
        self.wire: Any = core.ClientWire(self._lost, DaemonTimeout, self.fds, self.spin)
        self.outbox: bytearray = self.wire.outbox
        self.pending: deque[Callable[[int, memoryview], None]] = self.wire.pending
        self._connect()
        self.shm_spin = max(0.0, shm_spin_us) / 1e6
        #: Cookies of the pipelined SHM_CLOSE requests, in order (``wire.post_close``).
        self.close_cookies: deque[int] = deque()
        self.on_lost: Callable[[], None] | None = None
        self.max_frame = P.DEFAULT_MAX_FRAME
        raw_name = P.encode_name(name)
        try:
            reply_type, body = self._greet(role, raw_name, transport)
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
            self._set_timeouts(timeout)
        except BaseException:
            self.close()
            raise
        (self.version, pool, self.daemon_pid, self.cid, self.sec_caps, self.gen_caps,
         self.max_batch, self.max_frame, self.dynamic_base, self.dynamic_size, self.static_base,
         self.static_size) = fields
        self.transport = "shm" if self.slot is not None else "socket"
        self.pool = "dynamic" if pool == 0 else "static"
        self.context_name = bytes(body[name_at:]).decode("utf-8", "replace")

    def _hello(self, role: P.Role, raw_name: bytes, transport: str) -> tuple[int, memoryview]:
        """Say HELLO on the connected socket; the daemon's answer ``(type, body)``.

        A version-1 daemon refuses a version-2 HELLO and hangs up: then say
        a version-1 HELLO on a new connection (the socket transport).
        """
        if transport == "shm":
            hello = P.HELLO2.pack(P.MAGIC, P.VERSION_2, role,
                                  P.Feature.SHM_SLOT | P.Feature.EVENTFD_BELL) + raw_name
            reply_type, body = self.call(P.MsgType.HELLO, hello)
            if reply_type != P.MsgType.ERROR or P.ERROR.unpack_from(body)[0] != P.ErrorCode.VERSION:
                return reply_type, body
            self.wire.close()
            self.sock.close()
            self._connect()
        return self.call(P.MsgType.HELLO, P.HELLO.pack(P.MAGIC, P.VERSION, role) + raw_name)

    def _greet(self, role: P.Role, raw_name: bytes, transport: str) -> tuple[int, memoryview]:
        """:meth:`_hello`, on new connections while the daemon hangs up without an answer.

        A daemon flooded with new connections may drop one before reading its
        HELLO (it bounds the connections that have not said HELLO); a refusal,
        by contrast, comes as an ERROR and is not retried.  Retries back off
        (RETRY_FIRST doubling up to RETRY_MAX seconds, jittered) within the
        connect timeout; then the last hang-up is raised as Closed.
        """
        start = time.monotonic()
        limit = self.connect_timeout
        delay = RETRY_FIRST
        tries = 1
        while True:
            try:
                return self._hello(role, raw_name, transport)
            except DaemonTimeout:
                raise
            except Closed as exc:
                pause = delay * (0.5 + random.random())
                left = None if limit is None else limit - (time.monotonic() - start) - pause
                if left is not None and left <= 0:
                    raise Closed(f"the pool service at {self.path} hung up before answering HELLO "
                                 f"{tries} times within {limit} s; last: {exc}") from exc
            time.sleep(pause)
            delay = min(2 * delay, RETRY_MAX)
            tries += 1
            self.closed = False
            self._connect(left)

    def _connect(self, limit: float | None = None) -> None:
        """Open ``self.sock``: connected, its waits bounded by the connect
        timeout (or by ``limit`` seconds, what a retry has left of it).

        The socket stays blocking with kernel timeouts, so a connect that
        finds the daemon's listen backlog full waits (up to the connect
        timeout) for room instead of failing with EAGAIN.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(True)  # the kernel timeouts bound every wait, whatever socket.setdefaulttimeout says
        try:
            # The connect and the handshake are bounded by the connect timeout,
            # later waits by ``timeout``.
            self._set_timeouts(self.connect_timeout if limit is None else limit, sock)
            sock.connect(self.path)
        except BlockingIOError as exc:
            sock.close()
            raise DaemonTimeout(f"cannot connect to the pool service at {self.path}: no answer "
                                f"within {self.connect_timeout} s") from exc
        except OSError as exc:
            sock.close()
            raise Closed(f"cannot connect to the pool service at {self.path}: "
                         f"{_why_unreachable(self.path, exc)}") from exc
        self.sock = sock
        self.wire.attach(sock.fileno())

    def _set_timeouts(self, seconds: float | None, sock: socket.socket | None = None) -> None:
        """Bound every blocking connect, receive and send on ``sock`` (default:
        the channel's) by kernel timeouts: the socket stays in blocking mode,
        so no poll precedes each call."""
        self.wire.wait_limit = seconds
        value = _timeval(seconds)
        if sock is None:
            sock = self.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    def _map_slot(self, size: int, bell: bool) -> None:
        """Map the slot whose descriptor came with WELCOME; keep the eventfd
        doorbell that follows it when granted."""
        if len(self.fds) < 1 + bell:
            raise ProtocolError("daemon granted a shm slot without sending its descriptor(s)")
        fd = self.fds.popleft()
        if bell:
            self.bell = self.fds.popleft()
        try:
            self.slot = ClientSlot(fd, size, self.shm_spin)
        finally:
            os.close(fd)
        self.wire.set_slot(self.slot, self.bell)

    def check_process(self) -> None:
        """UsedAfterFork in a process forked from the one that opened the channel."""
        check_process(self.forks, self.path)

    # -- requests (the wire's) ---------------------------------------------------------------
    def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` on the socket, with the descriptors ``fds`` on its first byte."""
        self.wire.send(data, fds)

    def post(self, msg_type: int, body: bytes, on_reply: Callable[[int, memoryview], None]) -> None:
        """Queue a request without waiting; it leaves with the next call (or :meth:`drain`).

        ``on_reply`` runs when its reply is read, in order.  Queued requests
        ride in the same ``sendmsg`` (or slot exchange) as the next request, so
        a pipelined close costs no system call and no wake-up of its own.
        """
        self.wire.post(msg_type, body, on_reply)

    def call_frame(self, frame: bytes, fds: Sequence[int] = (), slot_ok: bool = True) -> tuple[int, memoryview]:
        """Send one request already framed and return its reply ``(type, body)``
        (the replies of earlier pipelined requests are handled first).

        Through the slot when there is one and ``slot_ok`` (no descriptors, not
        GOODBYE, room in the request area); else on the socket.
        """
        if self.forks != _forks:
            check_process(self.forks, self.path)
        result: tuple[int, memoryview] = self.wire.call_frame(frame, fds, slot_ok)
        return result

    def call(self, msg_type: int, body: bytes = b"", fds: Sequence[int] = ()) -> tuple[int, memoryview]:
        """Send a request and return its reply ``(type, body)`` (earlier replies first)."""
        return self.call_frame(pack_header(len(body), msg_type, 0) + body, fds,
                               not fds and msg_type != _GOODBYE)

    def drain(self) -> None:
        """Send queued requests and read the replies of every pipelined request."""
        if self.forks != _forks:
            check_process(self.forks, self.path)
        self.wire.drain()

    def _lost(self, why: str, kind: type[Closed] = Closed) -> NoReturn:
        """Close the channel, tell ``on_lost``, raise ``kind`` saying ``why``
        (the wire calls it when the connection breaks)."""
        self.close()
        if self.on_lost is not None:
            self.on_lost()
        raise kind(f"connection to the pool service at {self.path} lost: {why}")

    # -- segments ------------------------------------------------------------------------------
    def map_segment(self, token: int, size: int) -> None:
        """Map the segment whose descriptor came with the reply just read."""
        while not self.fds and self.slot is not None:  # it comes on the socket, ahead of the slot reply
            self.wire.fill()
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
        """Drop the socket, slot, descriptors and segments (idempotent; sends nothing)."""
        if self.closed:
            return
        self.closed = True
        wire = getattr(self, "wire", None)
        if wire is not None:
            wire.close()
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()
        if self.bell >= 0:
            os.close(self.bell)
            self.bell = -1
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

