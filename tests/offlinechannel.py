"""A pool-service client Channel with no daemon behind it, for tests and benchmarks of
the client's request path (the wire, the reply framing and the decoding of replies).

:class:`OfflineChannel` owns the set-up such a channel shares: a socket pair the
client's wire is attached to (nothing ever arrives on it) and a memfd slot of its
own, in which :meth:`OfflineChannel.publish` places a reply before the request it
answers is sent, so that the wire finds it at once, as it finds a daemon's reply on
the shm transport.  A subclass wraps ``call_frame`` / ``drain`` to publish the reply
each exchange should get.

Users: tests/test_service_client_decode.py (scripted replies) and
bench/test_bench_client.py (canned replies; it puts tests/ on ``sys.path`` to
import this module as ``offlinechannel``).

Concurrency: single-threaded, as a Channel.
"""
from __future__ import annotations

import array
import mmap
import os
import socket
from collections import deque

from poolsvc._backend import core
from poolsvc.service import channel as C
from poolsvc.service import protocol as P
from poolsvc.service import slot as S


class OfflineChannel(C.Channel):
    """A Channel whose replies are published in its slot by the test itself.

    ``OfflineChannel(name, segments, max_batch)``: ``name`` its path and context name,
    ``segments`` the storage segments by token (as a daemon's DESCs would have had
    them mapped), ``max_batch`` the daemon's BATCH limit.  No HELLO is said: the rest
    of what WELCOME tells a Channel is fixed here (protocol version 2, the shm
    transport, the dynamic pool, cid 1, no capability bits, daemon pid 0).
    :meth:`close` drops the socket pair and the slot (the segments are the caller's).
    """

    def __init__(self, name: str, segments: dict[int, mmap.mmap], max_batch: int) -> None:
        self.path = self.context_name = name
        self.spin = 0.0
        self.timeout = self.connect_timeout = None
        self.forks = C._forks
        self.closed = False
        self.bell = -1
        self.fds: deque[int] = deque()
        self.segments = segments
        self.stale: list[mmap.mmap] = []
        self.close_cookies: deque[int] = deque()
        self.on_lost = None
        self.max_frame = P.DEFAULT_MAX_FRAME
        self.max_batch = max_batch
        self.version, self.daemon_pid, self.cid, self.sec_caps, self.gen_caps = 2, 0, 1, 0, 0
        self.transport, self.pool = "shm", "dynamic"
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wire = core.ClientWire(self._lost, C.DaemonTimeout, self.fds, 0.0)
        self.wire.attach(self.sock.fileno())
        self.outbox, self.pending = self.wire.outbox, self.wire.pending
        fd = os.memfd_create(f"{name}-slot", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, S.SLOT_BYTES)
            os.pwrite(fd, array.array("Q", S.slot_header()).tobytes(), 0)
            self.slot = S.ClientSlot(fd, S.SLOT_BYTES, 0.0)
        finally:
            os.close(fd)
        self.wire.set_slot(self.slot, -1)
        self._words, self._mm = self.slot.words, self.slot.mm

    def publish(self, reply: bytes) -> None:
        """Place ``reply`` (whole reply frames) in the slot as the answer of the request
        the wire publishes next."""
        self._mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + len(reply)] = reply
        self._words[S.W_REP_LEN] = len(reply)
        self._words[S.W_REP_SEQ] = self.slot.seq + 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.wire.close()
            self.slot.close()
            self.sock.close()
            self.peer.close()
