"""The client wire's request round trip (ext/clientwire.pyx) next to its
plain-Python twin, against an in-process echo peer (one run).

Owns the compiled/twin ratio of the client's request path: ``ping`` (an
empty request and its empty reply) and ``alloc`` (an ALLOC frame behind a
pipelined SHM_CLOSE, answered by a CLOSED and a descriptor-sized reply),
each on both transports.  The peer answers in place, before each request,
so that no wait and no other process is timed: on ``shm`` it publishes the
reply in the slot's reply area and the sequence the request will carry
(two word stores); on ``socket`` it writes the reply frames into its end of
a socketpair (and drains the requests every few hundred).  What is timed is
the client's part: framing, publishing with its fence (or sendmsg), the
wait's check, receiving or copying the reply, and handing out its frames.
Per-request medians go in ``extra_info["ns_per_op"]``;
``test_clientwire_ratios`` interleaves the backends round by round and
reports the medians of the per-round twin/compiled ratios.  In smoke mode
(``--benchmark-disable``) every path runs a few times and the replies are
checked.

Concurrency: single-threaded.  Figures from a shared 2-core machine deserve
scepticism: compare the two backends within one run, read the ratios.
"""
from __future__ import annotations

import array
import os
import socket
import statistics
import time
from collections import deque
from typing import Any, Callable

import pytest

from poolsvc.service import protocol as P
from poolsvc.service import slot as S

OK, PING, ALLOC, SHM_CLOSE = int(P.MsgType.OK), int(P.MsgType.PING), int(P.MsgType.ALLOC), int(P.MsgType.SHM_CLOSE)
PING_FRAME = P.HEADER.pack(0, PING, 0)
ALLOC_FRAME = P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096))
COOKIE = P.COOKIE.pack(7)
#: Replies of one request: empty for ping; CLOSED then a DESC-sized body for alloc.
REPLIES = {"ping": P.HEADER.pack(0, OK, 0),
           "alloc": P.frame(P.MsgType.OK, P.CLOSED.pack(1, 0)) + P.frame(P.MsgType.OK, bytes(P.DESC.size))}
DRAIN_EVERY = 256


def _lost(why: str, kind: type) -> None:
    raise kind(why)


class EchoPeer:
    """A wire of ``mod`` on a socketpair (and a memfd slot for ``shm``), answered in place."""

    def __init__(self, mod: Any, transport: str, op: str) -> None:
        self.client, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wire = mod.ClientWire(_lost, TimeoutError, deque(), 0.0)
        self.wire.attach(self.client.fileno())
        self.reply = REPLIES[op]
        self.op = op
        self.slot = None
        self.sent = 0
        if transport == "shm":
            fd = os.memfd_create("bench-clientwire", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, S.SLOT_BYTES)
                os.pwrite(fd, array.array("Q", S.slot_header()).tobytes(), 0)
                os.pwrite(fd, self.reply, S.SLOT_REP_OFF)
                self.slot = mod.ClientSlot(fd, S.SLOT_BYTES, 0.0)
            finally:
                os.close(fd)
            self.wire.set_slot(self.slot, -1)
            self.words = self.slot.words
        self.callbacks = 0

    def _on_close(self, reply_type: int, body: memoryview) -> None:
        self.callbacks += 1

    def answer(self) -> None:
        """The reply of the next request, in place."""
        if self.slot is not None:
            words = self.words
            words[S.W_REP_LEN] = len(self.reply)
            words[S.W_REP_SEQ] = self.slot.seq + 1
            return
        self.peer.sendall(self.reply)
        self.sent += 1
        if self.sent % DRAIN_EVERY == 0:
            while True:
                try:
                    self.peer.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break

    def round_trip(self) -> tuple[int, memoryview]:
        self.answer()
        if self.op == "alloc":
            self.wire.post(SHM_CLOSE, COOKIE, self._on_close)
            return self.wire.call_frame(ALLOC_FRAME)
        return self.wire.call_frame(PING_FRAME)

    def close(self) -> None:
        self.wire.close()
        if self.slot is not None:
            self.slot.close()
        self.client.close()
        self.peer.close()


def _loop(peer: EchoPeer, n: int) -> Callable[[], None]:
    trip = peer.round_trip

    def run() -> None:
        for _ in range(n):
            trip()
    return run


@pytest.mark.benchmark(group="clientwire")
@pytest.mark.parametrize("op", ["ping", "alloc"])
@pytest.mark.parametrize("transport", ["shm", "socket"])
@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_round_trip(benchmark, compiled, pure, smoke, backend, transport, op):
    """One request through the wire, its reply answered in place, per request."""
    mod = compiled if backend == "compiled" else pure
    peer = EchoPeer(mod, transport, op)
    try:
        reply_type, body = peer.round_trip()
        assert reply_type == OK and len(body) == (P.DESC.size if op == "alloc" else 0)
        n = 3 if smoke else 200
        benchmark(_loop(peer, n))
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            benchmark.extra_info["ns_per_op"] = round(stats.stats.median / n * 1e9, 1)
        if op == "alloc":
            assert peer.callbacks >= 1 + n
    finally:
        peer.close()


def _per_op_ns(peer: EchoPeer, n: int) -> float:
    run = _loop(peer, n)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - t0)
    return best / n


def test_clientwire_ratios(benchmark, compiled, pure, smoke):
    """Medians of per-round twin/compiled ratios, each path measured interleaved."""
    rounds = 3 if smoke else 21
    n = 5 if smoke else 300
    peers = {(b, t, op): EchoPeer(compiled if b == "compiled" else pure, t, op)
             for b in ("compiled", "pure") for t in ("shm", "socket") for op in ("ping", "alloc")}
    try:
        rows: dict[tuple[str, str, str], list[float]] = {key: [] for key in peers}
        for _ in range(rounds):
            for key, peer in peers.items():
                rows[key].append(_per_op_ns(peer, n))
        lines = []
        for t in ("shm", "socket"):
            for op in ("ping", "alloc"):
                c, p = rows[("compiled", t, op)], rows[("pure", t, op)]
                ratio = statistics.median(b / a for a, b in zip(c, p))
                benchmark.extra_info[f"{t}_{op}_compiled_ns"] = round(statistics.median(c), 1)
                benchmark.extra_info[f"{t}_{op}_pure_ns"] = round(statistics.median(p), 1)
                benchmark.extra_info[f"{t}_{op}_ratio"] = round(ratio, 2)
                lines.append(f"{t} {op}: compiled {statistics.median(c):.0f} ns, twin "
                             f"{statistics.median(p):.0f} ns, {ratio:.1f}x")
        benchmark.extra_info["figures"] = True
        print("\nclient wire per request: " + "; ".join(lines))
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    finally:
        for peer in peers.values():
            peer.close()
