"""The pool service's request handlers: handshake, shared memory, batches, monitoring.

Each ``_op_*`` method of :class:`Handlers` takes a connection and a request
body and returns the reply body, or raises a :mod:`poolsvc.errors` class
that becomes an ERROR reply (see :mod:`.transport`).  Descriptors a reply
carries are appended to ``_reply_fds`` last, once nothing can fail.  The
handlers of sessions with trusted apps are in :mod:`.sessions`.

Per-client bounds checked here: live shms (``max_shms_per_client``) and pool
bytes (``max_bytes_per_client``).

Concurrency: the daemon's loop thread only.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from .._backend import core
from ..errors import BadParameters, ItemNotFound, PoolsvcError, ProtocolError
from . import protocol as P
from .connection import CLOSING, READY, Connection, ServerParts
from .provider import SegmentTokens, describe

log = logging.getLogger("poolsvc.service")

_unpack_alloc = P.ALLOC.unpack
_unpack_cookie = P.COOKIE.unpack
_pack_closed = P.CLOSED.pack
#: SHM_CLOSE replies: references remain; freed, no segment dropped.
_CLOSED_KEPT, _CLOSED_FREED = _pack_closed(0, 0), _pack_closed(1, 0)
_run_batch = core.run_batch


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
        conn.state = READY
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
        conn.state = CLOSING
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


__all__ = ["Handlers"]
