"""The daemon's STATS document: pools, clients, requests, latencies and leak counters.

:func:`stats_document` builds the plain-data document a STATS request
returns (``poolsvc stat`` renders it with :mod:`.render`).  Pool figures come
from the System, per-client figures from each connection and its Context,
request figures from :class:`~.metrics.Metrics`.  The RPC memory trusted apps
hold is shown per client (``quota.rpc_bytes``: that of the client's sessions)
and in total; it counts against the client's byte quota (docs/security.md, "Limits").

Concurrency: the daemon's loop thread only (it reads live daemon state).
"""
from __future__ import annotations

import os
import time
from typing import Any

from .._backend import BACKEND
from ..storage import LIVE
from . import protocol as P
from .connection import ConnState
from .process import dumpable
from .sessions import rpc_bytes_by_session


def stats_document(server: Any) -> dict[str, Any]:
    """The daemon's figures: pools, clients, requests and latencies, leak counters.

    ``server`` is the :class:`~.server.Server` (read, never changed).
    """
    system = server.system
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
    settings = server.settings
    # RPC memory trusted apps hold, by secure-world session (charged to the client's byte quota)
    rpc_by_session = rpc_bytes_by_session(system.tee)
    rpc_of_conn = {conn: sum(rpc_by_session.get(sid, 0) for sid in conn.context.sessions)
                   for conn in server.connections.values() if conn.context is not None}
    rpc_by_pid: dict[int, int] = {}
    for conn, rpc in rpc_of_conn.items():
        rpc_by_pid[conn.pid] = rpc_by_pid.get(conn.pid, 0) + rpc
    clients = []
    for conn in sorted(server.connections.values(), key=lambda c: c.serial):
        entry: dict[str, Any] = {"serial": conn.serial, "name": conn.name, "pid": conn.pid,
                                 "uid": conn.uid, "gid": conn.gid,
                                 "role": conn.role.name, "state": ConnState(conn.state).name,
                                 "transport": "shm" if conn.slot is not None else "socket",
                                 "requests": conn.requests,
                                 "connected_s": round(time.monotonic() - conn.accepted, 3)}
        ctx = conn.context
        if ctx is not None:
            usage = ctx.usage()
            shms = list(ctx.shms.values())
            entry.update(context=ctx.name, shms=usage["shms"], bytes=usage["bytes"],
                         frames=sum(len(s.pages) for s in shms if not hasattr(s.backing, "length")),
                         registered=sum(1 for s in shms if s.cookie in conn.registered),
                         ids=sum(1 for s in shms if s.id > 0),
                         arena_bytes=usage["arena_bytes"], sessions=usage["sessions"],
                         segments_sent=len(conn.tokens.tokens) if conn.tokens else 0,
                         quota={"pinned_bytes": conn.pool_bytes + conn.registered_bytes,
                                "allocated_bytes": conn.pool_bytes,
                                "registered_bytes": conn.registered_bytes,
                                "process_pinned_bytes": (conn.pinned.allocated + conn.pinned.registered
                                                         + rpc_by_pid.get(conn.pid, 0)
                                                         if conn.pinned is not None else 0),
                                "max_bytes": server.bytes_quota,
                                "shms": usage["shms"], "max_shms": settings.max_shms_per_client,
                                "sessions": usage["sessions"],
                                "max_sessions": settings.max_sessions_per_client,
                                "rpc_bytes": rpc_of_conn[conn]})
        if conn.batch is not None:
            entry["batch_ops_left"] = len(conn.batch.frames) - conn.batch.next
        clients.append(entry)
    return {
        "daemon": {"pid": os.getpid(), "socket": server.socket_path, "protocol": max(P.VERSIONS),
                   "protocol_versions": list(P.VERSIONS),
                   "backend": BACKEND, "pool": system.pool, "clients": len(server.connections),
                   "dumpable": dumpable(),
                   "connections": server.connection_counts(),
                   "slots": {"served": len(server._slots), "polled": len(server._slots.polled),
                             "waiting": len(server._waiting), "waiting_brief": len(server._waiting.brief)},
                   "limits": limits(server)},
        "pools": pools,
        "ids": sys_stats["ids"],
        "registered_cookies": sys_stats["registered_cookies"],
        "mapped_frames": sys_stats["mapped_frames"],
        "contexts": len(system.contexts),
        "clients": clients,
        "requests": server.metrics.snapshot(),
        "resources": {"storage_objects": LIVE["storage"], "storage_fds": LIVE["fd"],
                      "kernel_arena_bytes": sys_stats["storage"]["kernel_arena_bytes"],
                      "registered_mappings": server.files.mapped,
                      "rpc_bytes": sum(rpc_by_session.values()),
                      "open_fds": _count_fds()},
        "system": sys_stats,
    }


def limits(server: Any) -> dict[str, Any]:
    """Every bound the daemon enforces, with its value (0 or None: unbounded)."""
    settings = server.settings
    return {
        "max_clients": settings.max_clients, "max_monitors": settings.max_monitors,
        "max_pending": settings.max_pending, "handshake_timeout": settings.handshake_timeout,
        "max_connections_per_uid": settings.max_connections_per_uid,
        "max_bytes_per_client": server.bytes_quota, "max_shms_per_client": settings.max_shms_per_client,
        "max_sessions_per_client": settings.max_sessions_per_client,
        "max_frame": settings.max_frame, "max_batch": settings.max_batch,
        "batch_slice": settings.batch_slice, "batch_slice_us": settings.batch_slice_us,
        "max_output": settings.max_output,
        "max_polled_slots": server._slots.cap, "slot_turn_us": settings.slot_turn_us,
        "slot_turn_requests": settings.slot_turn_requests, "slot_round_us": settings.slot_round_us,
        "max_pending_fds": P.MAX_PENDING_FDS,
        "allowed_uids": list(settings.allowed_uids) if settings.allowed_uids is not None else None,
        "allowed_gids": list(settings.allowed_gids) if settings.allowed_gids is not None else None,
    }


def _count_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover
        return -1


__all__ = ["limits", "stats_document"]
