"""The daemon-wide invariants of a load run, judged from ``STATS`` documents.

The daemon is single-threaded, so one STATS document is an atomic snapshot:
the equations below hold *exactly* in every snapshot, even while clients
allocate and die, and :func:`check_snapshot` is run many times during a run.

Per snapshot (``own`` = what the daemon holds for no client, from the
baseline taken before the run)::

    dynamic.free_frames + dynamic.used_frames == dynamic.frames
    dynamic.used_frames == own_frames + sum(client.frames)      (dynamic pool)
    static.free_bytes + static.used_bytes == static.size
    ids == own_ids + sum(client.ids)
    contexts == number of CONTEXT connections past their handshake
    daemon.pid == the baseline's

After every client exited, :func:`leaks` compares the figures of
:func:`summary` with the baseline (they must be equal), and
:func:`shm_objects` lists ``/dev/shm`` objects left by dead processes.

Concurrency: pure functions of their arguments (and of ``/dev/shm``).
"""
from __future__ import annotations

import os
from typing import Any

#: Figures that must return to their baseline once every client is gone.
LEAK_KEYS = ("dynamic_used_frames", "static_used_bytes", "ids", "registered_cookies",
             "mapped_frames", "contexts", "context_clients", "storage_objects", "storage_fds",
             "registered_mappings", "daemon_fds")


def summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The accounting figures compared before and after a run."""
    pools = stats["pools"]
    res = stats["resources"]
    return {
        "dynamic_used_frames": pools["dynamic"]["used_frames"] if "dynamic" in pools else None,
        "static_used_bytes": pools["static"]["used_bytes"] if "static" in pools else None,
        "ids": stats["ids"],
        "registered_cookies": stats["registered_cookies"],
        "mapped_frames": stats["mapped_frames"],
        "contexts": stats["contexts"],
        "context_clients": sum(1 for c in stats["clients"] if c["role"] == "CONTEXT"),
        "storage_objects": res["storage_objects"],
        "storage_fds": res["storage_fds"],
        "registered_mappings": res["registered_mappings"],
        "daemon_fds": res["open_fds"],
    }


def own_figures(stats: dict[str, Any]) -> dict[str, int]:
    """What the daemon holds for nobody: totals minus the clients' shares."""
    clients = [c for c in stats["clients"] if c.get("context") is not None]
    dyn = stats["pools"].get("dynamic")
    return {
        "frames": (dyn["used_frames"] - sum(c["frames"] for c in clients)) if dyn else 0,
        "ids": stats["ids"] - sum(c["ids"] for c in clients),
        "pid": stats["daemon"]["pid"],
    }


def check_snapshot(stats: dict[str, Any], own: dict[str, int]) -> list[str]:
    """Violations of the per-snapshot equations (empty when all hold)."""
    out: list[str] = []
    pools = stats["pools"]
    clients = [c for c in stats["clients"] if c.get("context") is not None]
    dyn = pools.get("dynamic")
    if stats["daemon"]["pid"] != own["pid"]:
        out.append(f"the daemon's pid changed from {own['pid']} to {stats['daemon']['pid']}: it restarted")
    if dyn is not None:
        if dyn["free_frames"] + dyn["used_frames"] != dyn["frames"]:
            out.append(f"dynamic pool: free {dyn['free_frames']} + used {dyn['used_frames']} frames "
                       f"!= {dyn['frames']}")
        if stats["daemon"]["pool"] == "dynamic":
            held = sum(c["frames"] for c in clients)
            if dyn["used_frames"] != own["frames"] + held:
                out.append(f"dynamic pool: {dyn['used_frames']} frames used, but the daemon's own "
                           f"{own['frames']} + the clients' {held} = {own['frames'] + held} "
                           "(a frame counted twice or lost)")
    st = pools.get("static")
    if st is not None and st["free_bytes"] + st["used_bytes"] != st["size"]:
        out.append(f"static pool: free {st['free_bytes']} + used {st['used_bytes']} bytes != {st['size']}")
    ids = sum(c["ids"] for c in clients)
    if stats["ids"] != own["ids"] + ids:
        out.append(f"ids: {stats['ids']} live in the id table, but the clients hold {ids} "
                   f"(+{own['ids']} of the daemon's own)")
    if stats["contexts"] != len(clients):
        out.append(f"contexts: the System has {stats['contexts']}, connections hold {len(clients)}")
    return out


def leaks(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """``{figure: after - before}`` for each figure of LEAK_KEYS that did not come back."""
    out = {}
    for key in LEAK_KEYS:
        a, b = before.get(key), after.get(key)
        if a is None and b is None:
            continue
        if a != b:
            out[key] = (b or 0) - (a or 0)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shm_objects(prefix: str = "poolsvc") -> dict[str, int | None]:
    """``/dev/shm`` objects named ``PREFIX-PID-...``: name -> creating pid (None if unnamed)."""
    out: dict[str, int | None] = {}
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return out
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name.split("-")
        out[name] = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
    return out


def shm_leftovers(before: dict[str, int | None], pids: set[int]) -> list[str]:
    """Objects not in ``before`` created by one of ``pids`` or by a process that is dead."""
    left = []
    for name, pid in shm_objects().items():
        if name in before:
            continue
        if pid is None or pid in pids or not _alive(pid):
            left.append(name)
    return sorted(left)
