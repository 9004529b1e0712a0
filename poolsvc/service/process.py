"""Process-wide settings of a daemon process: not dumpable, enough descriptors.

A process that is not dumpable (``prctl(PR_SET_DUMPABLE, 0)``, as OpenSSH's
``platform_disable_tracing`` and ssh-agent do) cannot be traced by, and its
``/proc/<pid>`` files (``fd/*``, ``mem``, ``maps``, ``environ``) cannot be
opened by, other processes of the same uid; only root (CAP_SYS_PTRACE) can.
It also writes no core file.  The daemon holds every client's buffers, so a
same-uid process must not reach them through ``/proc``.

This is applied by the daemon's entry point (``poolsvc serve``, through
:func:`poolsvc.service.server.serve`), not by :class:`~.server.Server`
itself: a process that embeds a Server in one of its threads decides for
itself.

Each client costs the daemon a few descriptors (its socket, its shm slot, its
eventfd doorbell, an arena segment's memfd, registered objects), so
:func:`raise_descriptor_limit` lifts the soft ``RLIMIT_NOFILE`` (often 1024)
towards the hard limit, enough for ``max_clients`` and ``max_monitors``; past
the hard limit, ``accept()`` under EMFILE is handled by the server (a
reserve descriptor, no busy loop).

Concurrency: process-wide; call from the main thread at start-up.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def disable_tracing() -> None:
    """Make this process not dumpable (OSError if the kernel refuses)."""
    if _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}")


def dumpable() -> int:
    """This process's dumpable flag (0: not dumpable, 1: dumpable, 2: root-only dumps)."""
    return int(_prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


#: Descriptors budgeted per connection (socket, slot, doorbell, segments, registrations).
FDS_PER_CONNECTION = 8


def raise_descriptor_limit(connections: int) -> int:
    """Lift the soft RLIMIT_NOFILE to ``FDS_PER_CONNECTION`` per connection plus
    256, capped by the hard limit (never lowered); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FDS_PER_CONNECTION * connections + 256
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    return soft


__all__ = ["FDS_PER_CONNECTION", "disable_tracing", "dumpable", "raise_descriptor_limit"]
