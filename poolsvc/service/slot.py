"""The shared-memory request/reply slot: its layout and the code both ends use.

A version-2 connection that is granted :attr:`~.protocol.Feature.SHM_SLOT`
gets one POSIX shm object, created by the daemon (O_EXCL, 0600, unlinked at
once) and passed with WELCOME.  The first page holds u64 words (native
little-endian, 8-byte aligned, so that each is read and written by one
instruction); the request and reply areas follow.  Offsets only, never
pointers.  Each side writes only its own line of words; the daemon keeps its
own copy of every field it relies on and validates everything it reads.

One exchange::

    client: request frames -> request area, W_REQ_LEN, W_REQ_SEQ = seq + 1
            fence; if W_DAEMON_SLEEPING: ring the doorbell
    daemon: serves W_REQ_SEQ == its seq + 1 only; reply frames -> reply area
            (or REP_ON_SOCKET and the frames on the socket), W_REP_LEN,
            W_REP_SEQ = seq; fence; if W_CLIENT_SLEEPING: DOORBELL on the socket

Each party sets its "sleeping" word, fences, then looks once more at the
peer's sequence before it sleeps (Dekker's handshake), so a reply or request
published meanwhile is never missed.

This module owns the layout (word indexes, areas, :func:`slot_header`),
:func:`fence`, :func:`words_of` and :func:`check_header`, which both ends
use, the client's wait policy constants and :func:`map_client_slot`.  The
client's end, ``ClientSlot``, is the selected backend's (``ext/clientwire.pyx``
and its twin ``poolsvc/_pure/clientwire.py``), re-exported here; the daemon's
end (creating slots, serving requests, parking idle slots) lives in
``slotserve.py``.

Concurrency: one slot belongs to one connection; each end drives its half
from one thread.  The words are shared with another process: read each one
once per decision, and order stores before loads with :func:`fence`.
"""
from __future__ import annotations

import mmap
import os
import threading

from .._backend import core
from ..errors import ProtocolError

SLOT_MAGIC = 0x544C5350        # b"PSLT"
SLOT_VERSION = 1
#: Word indexes.  Header (daemon, at creation): magic | version << 32, size,
#: request area offset and capacity, reply area offset and capacity.
W_MAGIC, W_SIZE, W_REQ_OFF, W_REQ_CAP, W_REP_OFF, W_REP_CAP = 0, 1, 2, 3, 4, 5
#: Client line (its own cache line): sequence of the latest request (the
#: daemon serves ``last + 1`` only), its length in bytes (complete request
#: frames, back to back), 1 while the client sleeps waiting for a reply.
W_REQ_SEQ, W_REQ_LEN, W_CLIENT_SLEEPING = 8, 9, 10
#: Daemon line: sequence of the latest reply (equal to the request's), its
#: length (reply frames back to back, or REP_ON_SOCKET), 1 while the daemon
#: does not poll this slot (parked, or asleep in epoll: see ``slotserve``).
W_REP_SEQ, W_REP_LEN, W_DAEMON_SLEEPING = 16, 17, 18
#: Words of the first page read through a ``memoryview.cast("Q")``.
SLOT_WORDS = 32
SLOT_REQ_OFF = 4096
SLOT_REQ_CAP = 32 << 10
SLOT_REP_OFF = SLOT_REQ_OFF + SLOT_REQ_CAP
SLOT_REP_CAP = 64 << 10
SLOT_BYTES = SLOT_REP_OFF + SLOT_REP_CAP
#: W_REP_LEN when the replies did not fit: they follow on the socket, in order.
REP_ON_SOCKET = (1 << 64) - 1

#: The lock behind :func:`fence`; hot loops may inline ``acquire(); release()``.
fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier (a locked instruction on x86): orders our slot
    store before the load of the peer's "sleeping" word (Dekker's handshake)."""
    fence_lock.acquire()
    fence_lock.release()


def slot_header() -> tuple[int, ...]:
    """The six header words a daemon writes into a new slot and a client checks."""
    return (SLOT_MAGIC | SLOT_VERSION << 32, SLOT_BYTES, SLOT_REQ_OFF, SLOT_REQ_CAP,
            SLOT_REP_OFF, SLOT_REP_CAP)


def words_of(mm: mmap.mmap) -> memoryview:
    """The slot's first page as u64 words (release it before closing ``mm``)."""
    return memoryview(mm)[:SLOT_WORDS * 8].cast("Q")


def check_header(words: memoryview) -> None:
    """Raise ProtocolError unless ``words`` start with :func:`slot_header`."""
    if tuple(words[:6]) != slot_header():
        raise ProtocolError("daemon's shm slot has an unknown layout")


#: Shortest polling window of a client that spins at all, in seconds.
MIN_SPIN = 2e-6
#: The most one check of a polling client (four polls and a yield) is charged
#: to its window, in seconds.  A check that takes longer has given the CPU to
#: other tasks, whose time is not the cost of polling: with more clients than
#: CPUs a client's turn comes back long after its reply did, and a window of
#: wall time would put it to sleep (and the daemon to ringing it) for waits
#: that cost it one switch.  About the cost of switching away and back.
YIELD_CHARGE = 10e-6
#: A client whose expected wait exceeds its longest window still polls on
#: one wait in ``probe_gap`` (when the daemon is awake), so that a wait which
#: shrank again (fewer clients ahead) is noticed.  ``probe_gap`` starts at
#: PROBE_EVERY, doubles after a probe that ended asleep (up to MAX_PROBE_GAP)
#: and returns to PROBE_EVERY after one that caught its reply, so that
#: failing probes cost at most one polling window per MAX_PROBE_GAP waits.
PROBE_EVERY = 32
MAX_PROBE_GAP = PROBE_EVERY << 6


def map_client_slot(fd: int, size: int) -> tuple[mmap.mmap, memoryview]:
    """The client's mapping of the slot behind ``fd`` (announced as ``size``
    bytes) and its words, checked: ProtocolError on a size or layout this end
    does not know (nothing stays mapped then).  ``fd`` stays the caller's."""
    actual = os.fstat(fd).st_size
    if size != SLOT_BYTES or actual != size:
        raise ProtocolError(f"daemon's shm slot is {actual} bytes, announced {size}, "
                            f"expected {SLOT_BYTES}")
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    words = words_of(mm)
    try:
        check_header(words)
    except ProtocolError:
        words.release()
        mm.close()
        raise
    return mm, words


#: The client's end of a slot, from the selected backend (``ext/clientwire.pyx``
#: or ``poolsvc/_pure/clientwire.py``): ``ClientSlot(fd, size, max_spin)``
#: maps the slot with :func:`map_client_slot`; ``publish``, ``daemon_sleeping``,
#: ``answered``, ``spins``, ``wait``, ``set_sleeping``, ``reply``, ``close``
#: (docs/core.md "The client wire").  A wait polls the daemon's reply sequence
#: only when polling pays: the daemon was awake when the request was published
#: and the expected wait (``expect``, a moving average of the polling recent
#: waits needed) is within ``max_spin`` seconds; otherwise, or once the polling
#: window (twice ``expect``, between MIN_SPIN and ``max_spin``) has passed, it
#: sleeps on the socket until a DOORBELL.  Windows count the polling's own
#: time (see YIELD_CHARGE).  When the daemon is slow to answer, windows run
#: out and clients sleep at once instead of taking CPU time from the daemon
#: that serves them; one wait in ``probe_gap`` still polls (see PROBE_EVERY).
ClientSlot = core.ClientSlot
