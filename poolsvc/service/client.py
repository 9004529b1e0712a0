"""The client of the pool service: ``connect(path)`` and :class:`Client`.

``connect(path)`` returns a :class:`Client`, a handle with the embedded
System's API (docs/design.md section 9), so that code written against
``poolsvc.System`` runs unchanged against a daemon:

- ``Client.open_context()`` opens one connection to the daemon, which owns
  one Context for it (as opening ``/dev/tee0`` gives one file);
- the Client's own requests (``ping``, ``stats``) ride on its first open
  context's connection; only while it has no context does it hold a
  MONITOR connection (the one ``connect()`` opens, closed when the first
  context opens, opened again when needed), so a process with one context
  holds one connection;
- ``Context.alloc_*_buf`` return Shm handles whose ``view()`` is a
  zero-copy window on the context's own storage, mapped from descriptors
  the daemon passes with ``SCM_RIGHTS`` (never another client's);
- ``Context.register_*_buf(obj)`` registers the POSIX shm object behind
  ``obj``; both sides see the same bytes;
- ``Context.open_session(uuid)`` returns a Session whose
  ``invoke(func, params)`` runs in the daemon's secure world;
- ``Context.batch()`` collects many operations into one round trip.

The client is split by concern: :mod:`.channel` (connecting, the
handshake, descriptors, segments, timeouts, fork checks), the backend's
wire (``ext/clientwire.pyx``, twin ``poolsvc/_pure/clientwire.py``: the
request path, framing and the client's end of the shared-memory slot),
:mod:`.slot` (the slot's layout), :mod:`.objects` (Context, Session, Shm),
:mod:`.params` (session parameters) and :mod:`.batch` (Batch, LocalBatch).

Differences from the embedded System, by design: ``phys`` and ``tee`` (raw
physical memory and raw secure-world messages) are not offered, since they
would reach other clients' memory; ``view()`` of a private buffer from the
reserved static pool raises NotSupported, since it may share its page with
other clients' buffers; ``stats()`` returns the
System's figures plus a ``"service"`` entry with the daemon's own.

Transports (``connect(path, transport=...)``): ``"shm"``, the default, asks
the daemon (protocol version 2) for a shared-memory request/reply slot per
connection; ordinary requests and replies then go through the slot, and
the socket carries only descriptors, wake-ups and what does not fit the
slot.  A client polls the slot for its reply only when that pays (the daemon
is awake and recent waits were short: :class:`~.slot.ClientSlot`), else it
sleeps on the socket until a DOORBELL.  ``"socket"`` sends every frame on the Unix socket (version 1).
A daemon that offers no slot gives the socket transport either way.

Processes: a Client and everything it opened belong to the process that
called ``connect()``.  Used in a forked child they raise
:class:`~.channel.UsedAfterFork` and leave the parent's connections alone;
they refuse to be pickled, so a spawn or forkserver child connects itself.

Timeouts: ``connect_timeout`` bounds connecting and the handshake,
``timeout`` every later wait for the daemon; a daemon that stops answering
gives :class:`~.channel.DaemonTimeout` (a Closed) and the connection is closed.

Concurrency: a Client and its contexts belong to one thread at a time (as
an embedded System does).  Each context is its own socket, so different
threads may use different contexts; the Client's ``ping`` and ``stats`` use
the first open context's socket, so they belong to that context's thread.
"""
from __future__ import annotations

import json
import os
from typing import Any

from ..errors import BadParameters, Closed, NotSupported
from . import protocol as P
from .channel import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_SHM_SPIN_US,
    DEFAULT_SPIN_US,
    DEFAULT_TIMEOUT,
    DEFAULT_TRANSPORT,
    Channel,
    Dialer,
    DaemonTimeout,
    UsedAfterFork,
    check_process,
    check_reply,
    check_timeout,
    Handle,
)
from .batch import Batch, LocalBatch, batch
from .objects import Context, Session, Shm
from .settings import default_socket_path


class Client(Handle):
    """A System-like handle on a running ``poolsvc serve`` (see :func:`connect`)."""

    def __init__(self, path: str, name: str = "", spin_us: float = DEFAULT_SPIN_US,
                 timeout: float | None = DEFAULT_TIMEOUT, transport: str = DEFAULT_TRANSPORT,
                 shm_spin_us: float = DEFAULT_SHM_SPIN_US,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.path = path
        self.name = name
        self.dialer = Dialer(path, spin_us, check_timeout("timeout", timeout), transport, shm_spin_us,
                             check_timeout("connect_timeout", connect_timeout))
        self.contexts: dict[int, Context] = {}
        self._closed = False
        m = self.dialer.open(P.Role.MONITOR, name)
        #: The MONITOR connection, open only while no context is.
        self._monitor: Channel | None = m
        self._forks = m.forks
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
        """A new context in the daemon (one connection).

        The first context's connection also carries this handle's PING and
        STATS, so the MONITOR connection is closed once a context is open.
        """
        self._check()
        check_process(self._forks, self.path)
        ctx = Context(self.dialer, name or self.name, self._forget)
        self.contexts[ctx.cid] = ctx
        monitor = self._monitor
        if monitor is not None:
            self._monitor = None
            monitor.close()
        return ctx

    def _service_channel(self) -> Channel:
        """The connection for PING and STATS: a context's, else the MONITOR
        connection (opened again when every context has closed)."""
        self._check()
        check_process(self._forks, self.path)
        for ctx in self.contexts.values():
            if not ctx._channel.closed:
                return ctx._channel
        monitor = self._monitor
        if monitor is None or monitor.closed:
            monitor = self._monitor = self.dialer.open(P.Role.MONITOR, self.name)
        return monitor

    def _forget(self, ctx: Context) -> None:
        self.contexts.pop(ctx.cid, None)

    def service_stats(self) -> dict[str, Any]:
        """The daemon's whole STATS document (pools, clients, requests, latencies).

        Pipelined closes of this handle's contexts are flushed first, so the
        figures include them.
        """
        channel = self._service_channel()
        for ctx in list(self.contexts.values()):
            ctx.flush()
        reply_type, body = channel.call(P.MsgType.STATS)
        return json.loads(bytes(check_reply(reply_type, body, "STATS")))

    def stats(self) -> dict[str, Any]:
        """The System's figures (as ``System.stats()``), plus ``"service"``: the daemon's own."""
        doc = self.service_stats()
        out = doc.pop("system")
        out["service"] = doc
        return out

    def ping(self, payload: bytes = b"") -> bytes:
        """One round trip to the daemon; returns the echoed payload."""
        reply_type, body = self._service_channel().call(P.MsgType.PING, payload)
        return bytes(check_reply(reply_type, body, "PING"))

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
            if self._monitor is not None:
                self._monitor.close()
                self._monitor = None

    def __repr__(self) -> str:
        return f"<Client {self.path} pool={self.pool} contexts={len(self.contexts)}>"


def connect(socket_path: str | os.PathLike[str] | None = None, *, name: str = "",
            spin_us: float = DEFAULT_SPIN_US, timeout: float | None = DEFAULT_TIMEOUT,
            transport: str | None = None, shm_spin_us: float = DEFAULT_SHM_SPIN_US,
            connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT) -> Client:
    """A System-like handle of the daemon serving ``socket_path``.

    ``socket_path`` defaults to :func:`~poolsvc.service.settings.default_socket_path`.
    ``spin_us``: how long to poll for a reply before sleeping (0 sleeps at
    once; polling yields the CPU between tries, and saves the wake-up of a
    sleeping thread on each round trip).

    ``connect_timeout``: seconds to wait for connecting and for the
    daemon's answer to the handshake; ``timeout``: seconds to wait for the
    daemon on each later request.  None waits forever.  A wait that runs out
    raises :class:`~.channel.DaemonTimeout` (a Closed) and closes that
    connection.

    ``transport``: ``"socket"`` (requests and replies on the Unix socket) or
    ``"shm"`` (ordinary requests and replies through a shared-memory slot
    per connection, the socket carrying only descriptors, wake-ups and
    oversized replies; a daemon that does not offer slots gives the socket
    transport).  None takes ``$POOLSVC_TRANSPORT``, else DEFAULT_TRANSPORT.
    ``shm_spin_us``: the longest a shm client polls its slot for a reply
    before sleeping on the socket; it polls only while the daemon is awake
    and recent waits fit that window (0: never polls).

    Raises BadParameters for arguments of the wrong type or range, Closed
    when nothing serves the path (saying so when the path is not a socket
    or its directory is missing), DaemonTimeout as above.
    """
    if socket_path is None:
        path = default_socket_path()
    else:
        try:
            path = os.fsdecode(os.fspath(socket_path))
        except TypeError:
            raise BadParameters(f"socket path must be a str or os.PathLike, got "
                                f"{type(socket_path).__name__} {socket_path!r}") from None
        path = path or default_socket_path()
    if transport is None:
        transport = os.environ.get("POOLSVC_TRANSPORT") or DEFAULT_TRANSPORT
    return Client(path, name=name, spin_us=spin_us, timeout=timeout, transport=transport,
                  shm_spin_us=shm_spin_us, connect_timeout=connect_timeout)


#: The client's public API (its classes live in the modules named in the module doc).
__all__ = ["Batch", "Client", "Context", "DaemonTimeout", "LocalBatch", "Session", "Shm", "UsedAfterFork",
           "batch", "connect"]
