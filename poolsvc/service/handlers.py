"""The pool service's request handlers: handshake, shared memory, batches, monitoring.

Each ``_op_*`` method of :class:`Handlers` takes a connection and a request
body and returns the reply body, or raises a :mod:`poolsvc.errors` class
that becomes an ERROR reply (see :mod:`.transport`).  Descriptors a reply
carries are appended to ``_reply_fds`` last, once nothing can fail.  The
handlers of sessions with trusted apps are in :mod:`.sessions`.

ALLOC and SHM_CLOSE are served by the connection's ``core.ShmRequests``
(compiled: ext/fastpath.pyx; its twin poolsvc/_pure/fastpath.py), made at
HELLO: ``_op_alloc`` and ``_op_shm_close`` are its module functions, and it
calls back into :meth:`Handlers._describe`, :meth:`Handlers._close_shm`,
:meth:`Handlers._over_quota` and :meth:`Handlers._rpc_over_limit` for its
rare paths.

Per-client bounds: CONTEXT and MONITOR connections (``max_clients``,
``max_monitors``, checked here at HELLO), live shms
(``max_shms_per_client``) and pinned bytes (``max_bytes_per_client``: pool
memory allocated plus pages registered), both checked by
``ShmRequests.admit`` for ALLOC and REGISTER.  Each refusal is a LIMIT error
that names the setting.

A BATCH on the socket with more than ``batch_slice`` requests is served in
slices: :meth:`Handlers._start_batch` checks the whole body (a malformed
batch runs nothing), :meth:`Handlers._run_batch_slice` runs the next slice
(at most ``batch_slice`` requests, and no longer than ``batch_slice_us``
give or take a request), and the loop serves other clients between slices.
The connection reads nothing more until its batch is done, so replies stay
in request order; the reply goes on the socket, or to the receiver given to
``_start_batch`` (the shm slot's server gives one: a BATCH published in a
slot is served in slices too).

Concurrency: the daemon's loop thread only.
"""
from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from typing import Any, Callable

from .._backend import core
from ..constants import PAGE_SIZE
from ..errors import BadParameters, PoolsvcError, ProtocolError
from . import protocol as P
from . import slot as S
from .connection import CLOSED, CLOSING, READY, Connection, Pinned, ServerParts
from .provider import ZERO_COPY, Registration, SegmentTokens, cannot_shrink, describe
from .sessions import rpc_bytes_of

log = logging.getLogger("poolsvc.service")

_pack_closed = P.CLOSED.pack
#: SHM_CLOSE replies: references remain; freed, no segment dropped.
_CLOSED_KEPT, _CLOSED_FREED = _pack_closed(0, 0), _pack_closed(1, 0)
_run_batch = core.run_batch
_split_frames = core.split_frames
_pack_header = P.HEADER.pack
_BATCH, _BATCH_REPLY = int(P.MsgType.BATCH), int(P.MsgType.BATCH_REPLY)
_clock_ns = time.perf_counter_ns
#: Most requests a time-bounded slice runs between two readings of the clock.
_SLICE_CHECK = 16


def page_span(offset: int, length: int) -> int:
    """Bytes of the whole pages that ``[offset, offset+length)`` of an object touches."""
    if length <= 0:
        return 0
    return (-(-(offset + length) // PAGE_SIZE) - offset // PAGE_SIZE) * PAGE_SIZE


#: What receives a BATCH served in slices: the connection and the BATCH_REPLY frame
#: (its descriptors wait in ``_reply_fds``).
BatchDone = Callable[[Connection, bytes], None]


class PendingBatch:
    """A BATCH being served in slices: its body, its frames (``split_frames``),
    the next frame to run, the reply parts so far, and what receives the reply."""

    __slots__ = ("body", "frames", "next", "parts", "size", "ns", "counts", "fds", "on_done")

    def __init__(self, body: bytes, frames: list[tuple[int, int, int]], on_done: BatchDone | None) -> None:
        self.body = body
        #: None: the reply is queued on the socket.
        self.on_done = on_done
        self.frames = frames
        self.next = 0
        self.parts: list[bytes] = []
        #: ``size == sum(len(p) for p in parts)``
        self.size = 0
        self.ns = 0
        #: Operations run so far, by type (counted in the metrics when the batch is done).
        self.counts: dict[int, int] = {}
        #: Descriptors the replies so far carry (sent with the BATCH_REPLY).
        self.fds: list[int] = []


class Handlers(ServerParts):
    """Request handlers for HELLO, PING, GOODBYE, STATS, ALLOC, REGISTER, SHM_CLOSE,
    SHM_FROM_ID and BATCH."""

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
        if conn.role == P.Role.CONTEXT:
            limit, setting = self.settings.max_clients, "max_clients"
        else:
            limit, setting = self.settings.max_monitors, "max_monitors"
        if self._census[conn.role] >= limit:
            raise P.LimitExceeded(f"daemon serves {limit} {conn.role.name} connections already ({setting})")
        granted = 0
        # A MONITOR connection stays on the socket: its STATS, PING and CANCEL are rare,
        # and must not wait behind the contexts' turns ("Turns" in docs/protocol.md).
        if features & P.Feature.SHM_SLOT and self.settings.shm_slots and conn.role == P.Role.CONTEXT:
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
            conn.pinned = self._pinned_of(conn.pid)
            conn.tokens = SegmentTokens(ctx.arena)
            conn.alloc_fns = (ctx.alloc_user_buf, ctx.alloc_kernel_buf, ctx.alloc_priv_buf)
            conn.register_fns = (partial(ctx.register_fd, user=True), partial(ctx.register_fd, user=False))
            conn.shm_requests = core.ShmRequests(self, conn)
            cid = ctx.cid
        conn.state = READY
        self._count_as(conn, conn.role)
        conn.handlers = (self._context_handlers if conn.role == P.Role.CONTEXT
                         else self._monitor_handlers)
        if conn.slot is not None:
            self._slots.append(conn, len(self._waiting))
        cfg = self.config
        log.debug("%s: HELLO as %s (version %d, features %#x)", conn.label(), conn.role.name, version,
                  granted)
        welcome = P.WELCOME.pack(version, 0 if self.system.pool == "dynamic" else 1, os.getpid(), cid,
                                 int(cfg.sec_caps), int(cfg.gen_caps), self.settings.max_batch,
                                 self.settings.max_frame, cfg.dynamic_base, cfg.dynamic_size,
                                 cfg.static_base, cfg.static_size)
        if version >= P.VERSION_2:
            welcome += P.WELCOME_EXT.pack(granted, S.SLOT_BYTES if granted & P.Feature.SHM_SLOT else 0)
        return welcome + name.encode()

    def _op_ping(self, conn: Connection, body: Any) -> bytes:
        return bytes(body)

    def _op_goodbye(self, conn: Connection, body: Any) -> bytes:
        conn.goodbye = True
        self._release_context(conn)
        conn.state = CLOSING
        if conn in self._slots:  # the slot stays mapped (its reply may be in it) until hang-up
            self._slots.remove(conn)
        return b""

    def _op_stats(self, conn: Connection, body: Any) -> bytes:
        return json.dumps(self.stats(), sort_keys=True).encode()

    #: ALLOC and SHM_CLOSE: served by the connection's ``core.ShmRequests`` (compiled:
    #: ext/fastpath.pyx), which calls back into the methods below only for its rare paths.
    _op_alloc = core.serve_alloc
    _op_shm_close = core.serve_shm_close

    def _rpc_over_limit(self, pinned: Pinned, held: int) -> bool:
        """Whether a client that would pin ``held`` bytes without its RPC memory is over
        its byte quota with it (``ShmRequests.admit`` asks only while RPC memory lives).

        The client's RPC memory is looked up (a walk over the connections) only
        when all the RPC memory the secure world holds could make the difference.
        """
        limit = self._max_bytes
        rpc_shms = self.system.tee.rpc_shms
        if held + sum(m.capacity for m in rpc_shms.values() if not m.freed) <= limit:
            return False
        return held + rpc_bytes_of(self.connections.values(), self.system.tee, pinned.pid) > limit

    def _pinned_bytes(self, pinned: Pinned) -> int:
        """What a client pins against its byte quota: allocated and registered bytes,
        and the RPC memory trusted apps hold for its sessions."""
        held = pinned.allocated + pinned.registered
        if self.system.tee.rpc_shms:
            held += rpc_bytes_of(self.connections.values(), self.system.tee, pinned.pid)
        return held

    def _over_quota(self, pinned: Pinned, what: str, size: int) -> None:
        """Raise the LIMIT error of a request that would take a client over its byte quota."""
        held = self._pinned_bytes(pinned)
        rpc = held - pinned.allocated - pinned.registered
        raise P.LimitExceeded(f"{what} would take this client (pid {pinned.pid}, over its {pinned.users} "
                              f"context(s)) to {held + size} bytes pinned ({pinned.allocated} allocated, "
                              f"{pinned.registered} registered, {rpc} RPC), "
                              f"over max_bytes_per_client {self._max_bytes}")

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
            pinned = page_span(offset, length)
            conn.shm_requests.admit(self, pinned, f"registering {pinned} bytes of pages")
            if cannot_shrink(fd):  # sealed by the client: the System may map it, zero-copy
                shm = conn.register_fns[kind](fd, offset, length)
                reg = Registration(ZERO_COPY, -1, offset, length, None, 0)
            else:  # the System registers the daemon's shadow, never the client's object
                reg = self.files.map(fd, offset, length)
                assert reg.storage is not None
                try:
                    shm = conn.register_fns[kind](reg.storage.fd, reg.shadow_offset, length)
                except BaseException:
                    self.files.forget_unused(reg)
                    raise
                self.files.get(reg)
        finally:
            os.close(fd)
        conn.registered[shm.cookie] = reg
        conn.registered_bytes += pinned
        conn.pinned.registered += pinned
        return self._describe(conn, shm, fresh=True)

    def _close_shm(self, conn: Connection, shm: Any) -> bytes:
        shm.close()
        if shm.refs > 0:  # shm_from_id references remain
            return _CLOSED_KEPT
        cookie = shm.cookie
        if conn.alloc_sizes:
            size = conn.alloc_sizes.pop(cookie, 0)
            conn.pool_bytes -= size
            conn.pinned.allocated -= size
        if conn.registered:
            reg = conn.registered.pop(cookie, None)
            if reg is not None:
                span = page_span(reg.offset, reg.length)
                conn.registered_bytes -= span
                conn.pinned.registered -= span
                if reg.storage is not None:
                    self.files.put(reg)
        segment = getattr(shm.backing, "segment", None)
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
        counts: dict[int, int] = {}
        reply = _run_batch(body, self.settings.max_batch, self._max_frame, self._batch_handlers, conn,
                           self._refuse_in_batch, self._error, self._max_output, counts)
        self.metrics.add_ops(counts)
        return reply

    def _start_batch(self, conn: Connection, body: Any, on_done: BatchDone | None = None) -> bool:
        """Begin serving a BATCH in slices; False if it is to run whole (no more
        requests than a slice, or malformed: the ordinary path replies).

        ``on_done(conn, reply_frame)`` receives the BATCH_REPLY frame (its
        descriptors in ``_reply_fds``); by default it is queued on the socket.
        """
        if len(body) <= self._batch_slice * P.HEADER_SIZE:
            return False
        try:
            frames = _split_frames(body, self.settings.max_batch, self._max_frame)
        except Exception:
            return False
        if len(frames) <= self._batch_slice:
            return False
        conn.requests += 1
        conn.batch = PendingBatch(bytes(body), frames, on_done)
        self._batches.append(conn)
        self._update_interest(conn)  # read nothing more until the batch is done
        return True

    def _run_batch_slice(self, conn: Connection) -> None:
        """Run the next slice of ``conn``'s pending BATCH; after the last, hand over the reply.

        A slice ends after ``batch_slice`` requests, or once it has run for
        ``batch_slice_us``.  It runs in chunks with a look at the clock after
        each: a chunk is as many requests as fit the rest of the time bound at
        the batch's cost per request so far (one for the batch's first, at
        most ``_SLICE_CHECK``), so a slice overruns its bound by about one
        request when requests are expensive and by at most ``_SLICE_CHECK``
        cheap ones.
        """
        batch: PendingBatch = conn.batch
        frames = batch.frames
        first = batch.next
        end = min(len(frames), first + self._batch_slice)
        budget = self.settings.batch_slice_us * 1000
        t0 = _clock_ns()
        spent = 0
        # The descriptors this slice's replies carry wait with the batch, not in
        # _reply_fds, where the next reply queued for any client would take them.
        self._reply_fds = batch.fds
        try:
            with memoryview(batch.body) as view:
                while True:
                    if not budget:
                        last = end
                    elif first:  # requests that fit the rest of the budget at the cost so far
                        cost = (batch.ns + spent) // first
                        last = min(end, first + (_SLICE_CHECK if not cost else
                                                 max(1, min(_SLICE_CHECK, (budget - spent) // cost))))
                    else:  # the batch's first request: its cost is not known yet
                        last = first + 1
                    part = _run_batch(view[frames[first][1] - P.HEADER_SIZE:frames[last - 1][2]],
                                      last - first, self._max_frame, self._batch_handlers, conn,
                                      self._refuse_in_batch, self._error, self._max_output - batch.size,
                                      batch.counts)
                    batch.next = first = last
                    batch.parts.append(part)
                    batch.size += len(part)
                    spent = _clock_ns() - t0
                    if last >= end or spent >= budget:
                        break
        finally:
            self._reply_fds = []
        batch.ns += spent
        if first < len(frames):
            return
        conn.batch = None
        self._batches.remove(conn)
        self.metrics.add_ops(batch.counts)
        self.metrics.record(_BATCH, batch.ns)
        self._reply_fds = batch.fds  # sent with the reply's first byte
        reply = _pack_header(batch.size, _BATCH_REPLY, 0) + b"".join(batch.parts)
        if batch.on_done is None:
            self._queue(conn, reply)
        else:
            batch.on_done(conn, reply)
        if conn.state != CLOSED:
            self._flush(conn)  # writes, then runs the requests that waited behind the batch

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


__all__ = ["BatchDone", "Handlers", "PendingBatch", "page_span"]
