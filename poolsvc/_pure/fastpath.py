"""Plain-Python reference of ``ext/fastpath.pyx``: the pool service's ALLOC and
SHM_CLOSE requests of one CONTEXT connection, served end to end.

:class:`ShmRequests` (one per CONTEXT connection, made at HELLO) owns the
per-client admission checks of a new shm (``max_shms_per_client``, and
``max_bytes_per_client`` with the RPC-share rule), and serves

- ALLOC: the checks, the allocation from the System's pool
  (``Context.alloc_*_buf``), the daemon's accounting (``conn.pool_bytes``,
  ``pinned.allocated``, ``conn.alloc_sizes``) and the DESC reply;
- SHM_CLOSE: the lookup by cookie, then ``Handlers._close_shm`` (the release
  and the accounting).

:func:`serve_alloc` and :func:`serve_shm_close` are the daemon's handlers of
the two types (``Handlers._op_alloc`` / ``_op_shm_close``).  The compiled twin
serves the same requests without the Python layers for its common cases and
falls back to the same Python pieces this twin uses for the rest; replies,
errors and state are the same (docs/core.md, "The pool service's requests").

Concurrency: the daemon's loop thread only.
"""
from __future__ import annotations

import struct
from typing import Any

from ..errors import BadParameters, ItemNotFound

_unpack_alloc = struct.Struct("<Iq").unpack
_unpack_cookie = struct.Struct("<Q").unpack


def _kinds_text() -> str:
    from ..service.protocol import AllocKind

    return ", ".join(f"{k.value} ({k.name})" for k in AllocKind)


class ShmRequests:
    """ALLOC and SHM_CLOSE of one CONTEXT connection (see the module doc).

    ``ShmRequests(server, conn)`` after HELLO made ``conn``'s context: it
    keeps the connection's context, quota figures (``conn.pinned``),
    ``alloc_sizes``, allocation constructors (``conn.alloc_fns``) and the
    server's limits (``_max_shms``, ``_max_bytes``).
    """

    __slots__ = ("context", "pinned", "alloc_sizes", "alloc_fns", "max_shms", "max_bytes", "tee",
                 "limit_error")

    def __init__(self, server: Any, conn: Any) -> None:
        from ..service.protocol import LimitExceeded

        self.context = conn.context
        self.pinned = conn.pinned
        self.alloc_sizes = conn.alloc_sizes
        self.alloc_fns = conn.alloc_fns
        self.max_shms = server._max_shms
        self.max_bytes = server._max_bytes
        self.tee = server.system.tee
        self.limit_error = LimitExceeded

    def admit(self, server: Any, nbytes: int, what: str) -> None:
        """Refuse one more shm of ``nbytes`` pinned bytes: LIMIT when the client holds
        ``max_shms_per_client`` shms, or (``server._over_quota``) when ``nbytes`` more
        take it over ``max_bytes_per_client``.  ``what`` names the request in that
        error (``"allocating 4096 bytes"``)."""
        held = len(self.context.shms)
        if held >= self.max_shms:
            raise self.limit_error(f"client holds {held} shms, the daemon's limit (max_shms_per_client)")
        limit = self.max_bytes
        if not limit:
            return
        pinned = self.pinned
        total = pinned.allocated + pinned.registered + nbytes
        if total > limit or (self.tee.rpc_shms and server._rpc_over_limit(pinned, total)):
            server._over_quota(pinned, what, nbytes)

    def alloc(self, server: Any, conn: Any, body: Any) -> bytes:
        """Serve ALLOC ``body`` (kind u32, size i64): the DESC reply body."""
        kind, size = _unpack_alloc(body)
        fns = self.alloc_fns
        if kind >= len(fns):
            raise BadParameters(f"allocation kind {kind} is not one of {_kinds_text()}")
        self.admit(server, size, f"allocating {size} bytes")
        shm = fns[kind](size)
        conn.pool_bytes += shm.size
        self.pinned.allocated += shm.size
        self.alloc_sizes[shm.cookie] = shm.size
        return server._describe(conn, shm, True)

    def close(self, server: Any, conn: Any, body: Any) -> bytes:
        """Serve SHM_CLOSE ``body`` (cookie u64): the CLOSED reply body."""
        (cookie,) = _unpack_cookie(body)
        shm = self.context.shms.get(cookie)
        if shm is None:
            raise ItemNotFound(f"no shm with cookie {cookie:#x} in this client's context")
        return server._close_shm(conn, shm)


def serve_alloc(server: Any, conn: Any, body: Any) -> bytes:
    """The daemon's ALLOC handler: ``conn.shm_requests.alloc(server, conn, body)``."""
    return conn.shm_requests.alloc(server, conn, body)


def serve_shm_close(server: Any, conn: Any, body: Any) -> bytes:
    """The daemon's SHM_CLOSE handler: ``conn.shm_requests.close(server, conn, body)``."""
    return conn.shm_requests.close(server, conn, body)


__all__ = ["ShmRequests", "serve_alloc", "serve_shm_close"]
