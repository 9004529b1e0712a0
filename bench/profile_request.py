"""Where one request's time goes: ALLOC and SHM_CLOSE through the daemon, part by part.

Usage (from the repository root)::

    python bench/profile_request.py                    # both transports, both pools: print the tables
    python bench/profile_request.py --write            # ... and write bench/results/request.md
    python bench/profile_request.py --transport shm --pool dynamic --batch 64 --json

Owns the request profile of docs/benchmarks.md ("Where a request's time
goes").  For each pool (``dynamic``; ``static``: the reserved carve-out, with
``dynamic_shm`` off) it measures ALLOC (of ``--kind``, ``--size`` bytes) and
SHM_CLOSE, each alone (one round trip) and in BATCHes of ``--batch``, on each
transport, in three places:

- **client** (a ``poolsvc serve`` subprocess, this process its client):
  the public call (``alloc_*_buf``; ``close`` + ``flush``; ``Batch.run``)
  and its parts, timed by a replica of the call that does the same steps:
  encode, the round trip (send, wait, receive: ``Channel.call_frame``, or
  what ``Channel.drain`` does), decode (``Context._make_shm``; the close
  reply's handler; for a batch, ``Batch.run`` less its round trip);
- **daemon** (a :class:`~poolsvc.service.server.Server` in this process,
  with real connections accepted from its listening socket): the same
  requests through the daemon's own entry points, nested so that each part
  is a difference of two measurements: the transport's whole serve
  (``_on_readable`` with its reply written to the socket, plus the slices
  of a socket BATCH; ``_serve_slot`` for the shm slot), ``_request``
  (dispatch: handler lookup, latency ring, reply header; on the shm slot
  the compiled slot kernel dispatches PING, ALLOC and SHM_CLOSE itself, so
  there its dispatch counts with the transport), ``_op_batch``
  and the compiled ``run_batch`` alone (around handlers that return at
  once), and the handler (``_op_alloc``, ``_op_shm_close``: the
  connection's compiled ``ShmRequests``, which does the checks, the
  allocation or release, the registration, the id, the accounting and the
  reply, ext/fastpath.pyx), with the part of it that the compiled calls
  under the System take (their floors, below; inside a BATCH the compiled
  ``run_batch`` enters the kernel through its typed entries, without the
  call the handler row times, so the batch's "calls above their per-call
  medians" row can be negative: what those entries save); and a cProfile of the
  handlers, naming the Python functions they run (none on their common
  path: the kernel shows as one built-in call);
- **throughput**: ``--clients`` forked client processes allocating and
  closing for ``--seconds`` against the daemon subprocess, beside bounds
  derived from the columns;
- **floors**: an empty request (PING) on each transport, measured the
  same way; the timer; a Python call; ``eventfd_write`` + ``eventfd_read``
  without a wake-up; an eventfd and a pipe ping-pong between two processes
  (one round trip = two wake-ups and two context switches), placed by the
  scheduler, pinned to one CPU and to two; and the compiled calls under the
  System (``FrameAllocator`` pair, ``ArenaPages`` take + give, the
  REGISTER/UNREGISTER message, the static pool's ``RangeAllocator`` pair).

Every figure is the median of per-call samples (per-batch samples for
batches, divided by the batch size), less the timer's own cost.  A table's
rows add up to the client-measured total: what the daemon parts do not
explain of the round trip is shown as "unattributed" (wake-ups, the
daemon's epoll loop, scheduling, the kernel's socket path).

Single figures on a shared machine deserve scepticism: compare figures of one
run, and read the load average in the header.

Concurrency: one thread; the daemon under the client measurements is a
subprocess, the ping-pong peers and the throughput clients are forked
children; everything started is stopped (and waited for) before the script
returns.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's package, not an installed one
    sys.path.insert(0, str(ROOT))
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import results  # noqa: E402  (bench/results.py: machine() and commit())

import poolsvc  # noqa: E402
from poolsvc import Config  # noqa: E402
from poolsvc._backend import BACKEND, core  # noqa: E402
from poolsvc.service import protocol as P  # noqa: E402
from poolsvc.service import slot as S  # noqa: E402
from poolsvc.service.channel import ALLOC_BODY, pack_alloc_frame, pack_close_frame  # noqa: E402
from poolsvc.service.server import Server  # noqa: E402
from poolsvc.service.settings import ServiceSettings  # noqa: E402

OUTPUT = BENCH / "results" / "request.md"
KINDS = {"user": 0, "kernel": 1, "priv": 2}
POOLS = ("dynamic", "static")
TRANSPORTS = ("socket", "shm")
#: The issue's goals: 8 clients on this machine, ops/s (each alloc and each close counts one).
GOAL_BATCHED, GOAL_SINGLE = 400_000, 40_000
#: Batches measured per round for each batch figure (one batch is one sample).
BATCH_REPS = 4
_OK, _ERROR = int(P.MsgType.OK), int(P.MsgType.ERROR)
_ALLOC, _CLOSE, _PING = int(P.MsgType.ALLOC), int(P.MsgType.SHM_CLOSE), int(P.MsgType.PING)
_BATCH, _BATCH_REPLY = int(P.MsgType.BATCH), int(P.MsgType.BATCH_REPLY)
_DOORBELL, _HELLO = int(P.MsgType.DOORBELL), int(P.MsgType.HELLO)
_CLOSED_REPLY = P.CLOSED.pack(1, 0)
_run_batch = core.run_batch
clock = time.perf_counter_ns


# -- measuring -----------------------------------------------------------------------------------
class Samples:
    """Per-call samples in nanoseconds, by name; medians in microseconds less the timer's cost."""

    def __init__(self, timer_ns: float = 0.0) -> None:
        self.timer_ns = timer_ns
        self.data: dict[str, list[float]] = {}

    def add(self, name: str, ns: float) -> None:
        self.data.setdefault(name, []).append(ns)

    def us(self, name: str, per: int = 1) -> float:
        """Median of ``name``'s samples divided by ``per``, timer cost removed, in µs."""
        return (statistics.median(self.data[name]) - self.timer_ns) / per / 1000.0


def timer_cost(n: int = 20000) -> float:
    """Median nanoseconds of two back-to-back clock reads (subtracted from every sample)."""
    return statistics.median(-(clock() - clock()) for _ in range(n))


def median_call_ns(fn: Callable[[], Any], n: int) -> float:
    """Median nanoseconds of ``fn()`` over ``n`` calls, each timed alone."""
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def time_alloc_close(s: Samples, part: str, alloc: Callable[[int], Any], size: int, count: int,
                     close: Callable[[Any], None]) -> None:
    """Time ``count`` calls of ``alloc(size)``, then ``close(shm)`` of each, every call alone;
    the samples go under ``alloc.<part>`` and ``close.<part>``."""
    shms = []
    for _ in range(count):
        t0 = clock()
        shms.append(alloc(size))
        s.add(f"alloc.{part}", clock() - t0)
    for shm in shms:
        t0 = clock()
        close(shm)
        s.add(f"close.{part}", clock() - t0)


# -- floors ----------------------------------------------------------------------------------------
def _ping_pong(kind: str, n: int, cpus: tuple[int, int] | None) -> float:
    """Median ns of one round trip between this process and a forked child over two
    eventfds or two pipes (blocking reads); ``cpus``: pin parent and child there."""
    if kind == "eventfd":
        a, b = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
        fds = [a, b]

        def ring(fd: int) -> None:
            os.eventfd_write(fd, 1)

        def wait(fd: int) -> None:
            os.eventfd_read(fd)
        to_child, to_parent = a, b
        child_in, parent_in = a, b
    else:
        r1, w1 = os.pipe2(os.O_CLOEXEC)
        r2, w2 = os.pipe2(os.O_CLOEXEC)
        fds = [r1, w1, r2, w2]

        def ring(fd: int) -> None:
            os.write(fd, b"x")

        def wait(fd: int) -> None:
            os.read(fd, 1)
        to_child, to_parent = w1, w2
        child_in, parent_in = r1, r2
    warm = 200
    mine = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:  # the peer: answer every ring, then leave without running any cleanup
        try:
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[1]})
            for _ in range(warm + n):
                wait(child_in)
                ring(to_parent)
        finally:
            os._exit(0)
    try:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[0]})
        for _ in range(warm):
            ring(to_child)
            wait(parent_in)
        times = []
        for _ in range(n):
            t0 = clock()
            ring(to_child)
            wait(parent_in)
            times.append(clock() - t0)
    finally:
        os.sched_setaffinity(0, mine)
        os.waitpid(pid, 0)
        for fd in fds:
            os.close(fd)
    return statistics.median(times)


def _socket_echo(n: int) -> float:
    """Median ns of a 20-byte echo over a Unix socket pair between this process and a forked child."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    msg = P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096))
    warm = 200
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            for _ in range(warm + n):
                b.sendall(b.recv(65536))
        finally:
            os._exit(0)
    b.close()
    try:
        times = []
        for i in range(warm + n):
            t0 = clock()
            a.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(a.recv(65536))
            if i >= warm:
                times.append(clock() - t0)
    finally:
        a.close()
        os.waitpid(pid, 0)
    return statistics.median(times)


def measure_floors(n: int, timer_ns: float) -> dict[str, float]:
    """The machine's floors in µs (see the module doc)."""
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def syscalls() -> None:
        os.eventfd_write(efd, 1)
        os.eventfd_read(efd)

    def nothing() -> None:
        pass

    out = {"timer (two clock reads)": timer_ns / 1000.0}
    try:
        out["Python call of an empty function"] = (median_call_ns(nothing, n) - timer_ns) / 1000.0
        out["eventfd_write + eventfd_read, no wake-up"] = (median_call_ns(syscalls, n) - timer_ns) / 1000.0
    finally:
        os.close(efd)
    cpus = sorted(os.sched_getaffinity(0))
    placements: list[tuple[str, tuple[int, int] | None]] = [("placed by the scheduler", None)]
    if len(cpus) >= 2:
        placements += [("one CPU", (cpus[0], cpus[0])), ("two CPUs", (cpus[0], cpus[1]))]
    for kind in ("eventfd", "pipe"):
        for label, pin in placements:
            out[f"{kind} ping-pong round trip, {label}"] = (_ping_pong(kind, n, pin) - timer_ns) / 1000.0
    out["Unix socket echo round trip (20 bytes)"] = (_socket_echo(n) - timer_ns) / 1000.0
    return out


# -- the daemon, in this process ------------------------------------------------------------------
def pool_config(pool: str) -> Config:
    """The System of every daemon here: 256 MiB of dynamic RAM, 4 MiB arena steps;
    ``static``: dynamic shared memory off, so allocations come from the carve-out
    (32 MiB: room for the batches of every throughput client at once)."""
    return Config(dynamic_size=256 << 20, arena_step=4 << 20, dynamic_shm=(pool == "dynamic"),
                  static_size=32 << 20)


class _Peer:
    """The client end of one in-process daemon connection: reads reply frames
    (skipping DOORBELLs) and closes the descriptors that come with them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []

    def _recv(self, wait: bool) -> bool:
        """Take what the socket holds; with ``wait``, wait up to 10 s for something."""
        if wait and not select.select([self.sock], [], [], 10.0)[0]:
            raise TimeoutError("in-process daemon sent no reply within 10 s")
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 16)
        except BlockingIOError:
            return False
        if not data:
            raise ConnectionError("in-process daemon hung up")
        self.buf += data
        self.fds.extend(fds)
        return True

    def frame(self) -> tuple[int, bytes]:
        """The next reply frame that is not a DOORBELL (waits for it)."""
        while True:
            if len(self.buf) >= P.HEADER_SIZE:
                length, msg_type, _ = P.HEADER.unpack_from(self.buf)
                end = P.HEADER_SIZE + length
                if len(self.buf) >= end:
                    body = bytes(self.buf[P.HEADER_SIZE:end])
                    del self.buf[:end]
                    if msg_type != _DOORBELL:
                        return msg_type, body
                    continue
            self._recv(True)

    def drain(self) -> None:
        """Read what the socket holds without waiting; drop DOORBELLs and descriptors."""
        while self._recv(False):
            pass
        while self.buf[:P.HEADER_SIZE] == P.DOORBELL_FRAME:
            del self.buf[:P.HEADER_SIZE]
        self.close_fds()

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class InProcessDaemon:
    """A Server in this process and two CONTEXT connections accepted from its socket:
    ``sock`` (protocol version 1) and ``shm`` (version 2 with a slot)."""

    def __init__(self, pool: str, folder: str) -> None:
        settings = ServiceSettings(socket_path=os.path.join(folder, f"inproc-{pool}.sock"),
                                   log_level="WARNING")
        self.server = Server(pool_config(pool), settings)
        self.server.start()
        self.conns: dict[str, Any] = {}
        self.peers: dict[str, _Peer] = {}
        self.slot: S.ClientSlot | None = None
        try:
            self._open("socket", P.HELLO.pack(P.MAGIC, P.VERSION, P.Role.CONTEXT))
            self._open("shm", P.HELLO2.pack(P.MAGIC, P.VERSION_2, P.Role.CONTEXT, P.Feature.SHM_SLOT))
        except BaseException:
            self.close()
            raise

    def _open(self, transport: str, hello: bytes) -> None:
        srv = self.server
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(srv.socket_path)
        sock.setblocking(False)
        srv._accept()
        conn = next(c for c in srv.connections.values() if c.serial == srv._serials)
        peer = _Peer(sock)
        self.conns[transport], self.peers[transport] = conn, peer
        sock.sendall(P.frame(_HELLO, hello + b"profile"))
        srv._on_readable(conn)
        msg_type, body = peer.frame()
        if msg_type != int(P.MsgType.WELCOME):
            raise P.error_from_body(body)
        if transport == "shm":
            granted, size = P.WELCOME_EXT.unpack_from(body, P.WELCOME.size)
            assert granted & P.Feature.SHM_SLOT, "the daemon granted no slot"
            self.slot = S.ClientSlot(peer.fds[0], size, 0.0)
        peer.close_fds()

    def serve(self, transport: str, frames: bytes) -> tuple[float, bytes]:
        """Hand request ``frames`` to the daemon as the transport does, and time the daemon's
        whole serve of them (reply written); returns (ns, reply frames)."""
        srv, conn, peer = self.server, self.conns[transport], self.peers[transport]
        if transport == "shm":
            assert self.slot is not None
            self.slot.publish(frames)
            t0 = clock()
            srv._serve_slot(conn)
            while conn.batch is not None:  # a BATCH longer than a slice: the loop's turns
                srv._run_batch_slice(conn)
            ns = clock() - t0
            reply = self.slot.reply()
            peer.drain()
            if reply is None:  # too long for the slot: on the socket
                msg_type, body = peer.frame()
                return ns, P.HEADER.pack(len(body), msg_type, 0) + body
            return ns, bytes(reply)
        peer.sock.sendall(frames)
        t0 = clock()
        srv._on_readable(conn)
        while conn.batch is not None:  # a socket BATCH longer than a slice: the loop's turns
            srv._run_batch_slice(conn)
        ns = clock() - t0
        msg_type, body = peer.frame()
        peer.close_fds()
        return ns, P.HEADER.pack(len(body), msg_type, 0) + body

    def reply_fds_done(self) -> None:
        """Close descriptors a direct handler call left for the next reply."""
        for fd in self.server._reply_fds:
            os.close(fd)
        self.server._reply_fds.clear()

    def close(self) -> None:
        if self.slot is not None:
            self.slot.close()
            self.slot = None
        for peer in self.peers.values():
            peer.close_fds()
            peer.sock.close()
        self.server.stop()
        self.server.close()


def _cookies(reply_frames: bytes, msg_type: int) -> list[int]:
    """The cookies of the shm descriptors in OK reply frames (of one BATCH_REPLY or not)."""
    if msg_type == _BATCH:
        (length, reply_type, _) = P.HEADER.unpack_from(reply_frames)
        assert reply_type == _BATCH_REPLY, P.type_name(reply_type)
        body = memoryview(reply_frames)[P.HEADER_SIZE:]
    else:
        body = memoryview(reply_frames)
    out = []
    for sub_type, start, _end in P.split_frames(body, 1 << 20, 1 << 26):
        if sub_type != _OK:
            raise P.error_from_body(body[start:_end])
        out.append(P.COOKIE.unpack_from(body, start)[0])
    return out


def _alloc_frames(kind: int, size: int, count: int) -> bytes:
    return pack_alloc_frame(ALLOC_BODY, _ALLOC, 0, kind, size) * count


def _close_frames(cookies: list[int]) -> bytes:
    return b"".join(pack_close_frame(P.COOKIE.size, _CLOSE, 0, c) for c in cookies)


def profile_daemon(pool: str, kind: str, size: int, batch: int, rounds: int, transports: tuple[str, ...],
                   folder: str, timer_ns: float) -> dict[str, Any]:
    """The daemon's parts of ALLOC, SHM_CLOSE and PING in µs, per transport, alone and batched;
    and the compiled calls under the System."""
    d = InProcessDaemon(pool, folder)
    srv = d.server
    k = KINDS[kind]
    s = Samples(timer_ns)
    alloc_body = P.ALLOC.pack(k, size)
    try:
        conn = d.conns["socket"]
        desc_reply = bytes(P.DESC.size)
        constant = {_ALLOC: lambda conn, body: desc_reply, _CLOSE: lambda conn, body: _CLOSED_REPLY}
        for _ in range(rounds):
            # the handlers, dispatch
            cookies = []
            for _ in range(batch):
                t0 = clock()
                desc = srv._op_alloc(conn, alloc_body)
                s.add("alloc.handler", clock() - t0)
                d.reply_fds_done()
                cookies.append(P.COOKIE.unpack_from(desc)[0])
            for c in cookies:
                body = P.COOKIE.pack(c)
                t0 = clock()
                srv._op_shm_close(conn, body)
                s.add("close.handler", clock() - t0)
            cookies = []
            for _ in range(batch):
                t0 = clock()
                rep = srv._request(conn, _ALLOC, alloc_body)
                s.add("alloc.request", clock() - t0)
                d.reply_fds_done()
                cookies.append(P.COOKIE.unpack_from(rep, P.HEADER_SIZE)[0])
            for c in cookies:
                body = P.COOKIE.pack(c)
                t0 = clock()
                srv._request(conn, _CLOSE, body)
                s.add("close.request", clock() - t0)
            for _ in range(batch):
                t0 = clock()
                srv._request(conn, _PING, b"")
                s.add("ping.request", clock() - t0)
                t0 = clock()
                srv._op_ping(conn, b"")
                s.add("ping.handler", clock() - t0)
            # the transports' whole serve
            for t in transports:
                cookies = []
                for _ in range(batch):
                    ns, rep = d.serve(t, _alloc_frames(k, size, 1))
                    s.add(f"alloc.io.{t}", ns)
                    cookies += _cookies(rep, _ALLOC)
                for c in cookies:
                    ns, _ = d.serve(t, _close_frames([c]))
                    s.add(f"close.io.{t}", ns)
                for _ in range(batch):
                    ns, _ = d.serve(t, P.frame(_PING))
                    s.add(f"ping.io.{t}", ns)
            # batches: each figure BATCH_REPS times a round, the measurements side by side
            for _ in range(BATCH_REPS):
                # the compiled batch loop around handlers that do nothing but return a reply
                for op, frames in (("alloc", _alloc_frames(k, size, batch)), ("close", _close_frames([0] * batch))):
                    t0 = clock()
                    _run_batch(frames, batch, srv._max_frame, constant, conn, srv._refuse_in_batch, srv._error,
                               srv._max_output, {})
                    s.add(f"{op}.loop", clock() - t0)
                # the batch as the daemon runs it
                t0 = clock()
                rep = srv._op_batch(conn, _alloc_frames(k, size, batch))
                s.add("alloc.op_batch", clock() - t0)
                d.reply_fds_done()
                cookies = _cookies(rep, _ALLOC)
                body = _close_frames(cookies)
                t0 = clock()
                srv._op_batch(conn, body)
                s.add("close.op_batch", clock() - t0)
                for t in transports:  # the transports' whole serve
                    ns, rep = d.serve(t, P.frame(_BATCH, _alloc_frames(k, size, batch)))
                    s.add(f"alloc.io_batch.{t}", ns)
                    ns, _ = d.serve(t, P.frame(_BATCH, _close_frames(_cookies(rep, _BATCH))))
                    s.add(f"close.io_batch.{t}", ns)
        hot = _handler_profile(srv, conn, alloc_body, rounds * batch)
        emb = srv.system.open_context("profile-embedded")
        floors, compiled_op = _compiled_floors(srv.system, emb, pool, kind, max(200, rounds * batch // 4),
                                               timer_ns)
        emb.close()
        latency = srv.metrics.snapshot()["latency"]
    finally:
        d.close()
    out: dict[str, Any] = {"compiled": floors, "compiled_per_op": compiled_op, "hot": hot, "served_p50_us": {
        name: latency[name]["p50_us"] for name in ("ALLOC", "SHM_CLOSE", "PING") if name in latency}}
    # the part of a handler that the compiled calls under the System take (their floors),
    # split evenly between the ALLOC and the SHM_CLOSE of a pair
    for t in transports:
        for op in ("alloc", "close", "ping"):
            handler = s.us(f"{op}.handler")
            system = compiled_op if op != "ping" else 0.0
            request = s.us(f"{op}.request")
            io = s.us(f"{op}.io.{t}")
            if t == "shm":  # the slot kernel dispatches in C: no `_request` on this path
                handler = min(handler, io)  # (medians of separate samples: the part cannot exceed its whole)
                transport, dispatch = io - handler, 0.0
            else:
                transport, dispatch = io - request, request - handler
            out[f"{t}.single.{op}"] = {
                "transport": transport, "dispatch": dispatch,
                "handler": handler - system, "system": system,
                "batch loop": 0.0, "spread": 0.0, "total": io}
        for op in ("alloc", "close"):
            handler = s.us(f"{op}.handler")
            system = compiled_op
            loop = s.us(f"{op}.loop", batch)
            op_batch = s.us(f"{op}.op_batch", batch)
            io = s.us(f"{op}.io_batch.{t}", batch)
            out[f"{t}.batched.{op}"] = {
                "transport": io - op_batch, "dispatch": 0.0, "batch loop": loop,
                "spread": op_batch - loop - handler, "handler": handler - system, "system": system,
                "total": io}
    return out


def _handler_profile(srv: Any, conn: Any, alloc_body: bytes, n: int, top: int = 14) -> list[dict[str, Any]]:
    """cProfile of ``n`` ALLOC + SHM_CLOSE handler pairs: the functions with the most own
    time, each with its share of the profiled time and its calls per pair.  (cProfile
    inflates every call alike, so shares, not its times, are the figures to read.)"""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    op_alloc, op_close, pack = srv._op_alloc, srv._op_shm_close, P.COOKIE.pack
    cookies = []
    prof.enable()
    for _ in range(n):
        cookies.append(pack(P.COOKIE.unpack_from(op_alloc(conn, alloc_body))[0]))
        if len(cookies) >= 256:
            for body in cookies:
                op_close(conn, body)
            cookies.clear()
    for body in cookies:
        op_close(conn, body)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    out = []
    for (filename, line, name), (_cc, calls, tottime, _ct, _callers) in rows:
        where = f"{Path(filename).name}:{line}" if line else "built-in"
        out.append({"function": f"{name} ({where})", "share": tottime / total, "calls_per_pair": calls / n})
    return out


def _compiled_floors(system: Any, ctx: Any, pool: str, kind: str, n: int,
                     timer_ns: float) -> tuple[dict[str, float], float]:
    """The compiled calls under the System, in µs per pair (alloc + free); and the sum of
    those one alloc + close of ``kind`` from ``pool`` makes, per operation (half a pair)."""
    out: dict[str, float] = {}
    pages = ctx.arena.pages
    ctx.arena.give(ctx.arena.take(1))  # the first segment exists before the timing

    def arena_pair() -> None:
        pages.give(pages.take(1))

    arena = "ArenaPages take + give (frames, storage page, mapping)"
    out[arena] = (median_call_ns(arena_pair, n) - timer_ns) / 1000.0
    path = [arena]
    if pool == "dynamic":
        frames = system.dynamic

        def frame_pair() -> None:
            frames.free_contig(frames.alloc_contig(1), 1)

        pa = system.config.dynamic_base + (100 << 12)
        driver = system.driver

        def register_pair() -> None:
            driver.register_run(pa, 1, 4096, 0xC0FFEE)
            driver.unregister(0xC0FFEE)

        out["FrameAllocator alloc_contig + free_contig (1 page)"] = (median_call_ns(frame_pair, n)
                                                                     - timer_ns) / 1000.0
        register = "REGISTER_SHM + UNREGISTER_SHM message (contiguous run)"
        out[register] = (median_call_ns(register_pair, n) - timer_ns) / 1000.0
        if kind != "priv":
            path.append(register)
    else:
        ranges = system.pools.static

        def range_pair() -> None:
            ranges.free(ranges.alloc(4096, 4096))

        carveout = "RangeAllocator alloc + free (4 KiB of the carve-out)"
        out[carveout] = (median_call_ns(range_pair, n) - timer_ns) / 1000.0
        path.append(carveout)
    return out, sum(out[k] for k in path) / 2


# -- the client, against a daemon subprocess -----------------------------------------------------
class DaemonProcess:
    """``python -m poolsvc serve`` in a subprocess, with the pool's config; stopped by close()."""

    def __init__(self, pool: str, folder: str) -> None:
        cfg = pool_config(pool)
        conf = Path(folder) / f"{pool}.toml"
        conf.write_text(f'dynamic_size = {cfg.dynamic_size}\narena_step = {cfg.arena_step}\n'
                        f'static_size = {cfg.static_size}\n'
                        f'dynamic_shm = {str(cfg.dynamic_shm).lower()}\n'
                        '[service]\nlog_level = "WARNING"\n')
        self.path = os.path.join(folder, f"{pool}.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc", "serve", "--config", str(conf),
                                      "--socket", self.path], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("daemon did not create its socket within 60 s")
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


def profile_client(path: str, transport: str, kind: str, size: int, batch: int, rounds: int,
                   timer_ns: float) -> dict[str, Any]:
    """The client's parts of ALLOC, SHM_CLOSE and PING in µs, alone and batched."""
    s = Samples(timer_ns)
    k = KINDS[kind]
    with poolsvc.connect(path, name="profile", transport=transport) as client:
        ctx = client.open_context("profile")
        ch = ctx._channel
        assert ch.transport == transport, (ch.transport, transport)
        alloc = getattr(ctx, f"alloc_{kind}_buf")
        for _ in range(2 * batch):  # warm up: segments mapped, caches filled
            alloc(size).close()
        ctx.flush()

        call = ch.call
        batching = ["alloc"]  # which batch the round trip being timed belongs to

        def timed_call(msg_type: int, body: bytes = b"", fds: Any = ()) -> Any:
            t0 = clock()
            try:
                return call(msg_type, body, fds)
            finally:
                s.add(f"{batching[0]}.batch_rt", clock() - t0)

        def close_and_flush(shm: Any) -> None:
            shm.close()
            ctx.flush()

        for _ in range(rounds):
            # the public calls
            time_alloc_close(s, "total", alloc, size, batch, close_and_flush)
            for _ in range(batch):
                t0 = clock()
                client.ping()
                s.add("ping.total", clock() - t0)
            # the same steps, timed part by part
            shms = []
            for _ in range(batch):
                t0 = clock()
                frame = pack_alloc_frame(ALLOC_BODY, _ALLOC, 0, k, size)
                t1 = clock()
                reply_type, reply = ch.call_frame(frame)
                t2 = clock()
                if reply_type != _OK:
                    raise P.error_from_body(reply)
                shms.append(ctx._make_shm(reply))
                t3 = clock()
                s.add("alloc.encode", t1 - t0)
                s.add("alloc.rt", t2 - t1)
                s.add("alloc.decode", t3 - t2)
            for shm in shms:
                t0 = clock()
                shm.close()  # local release, SHM_CLOSE queued (Context._post_close)
                t1 = clock()
                on_reply = ch.pending.popleft()  # Channel.drain, the round trip apart from the decode
                replies: list[tuple[int, memoryview]] = []
                ch.pending.append(lambda t, body, out=replies: out.append((t, body)))
                ch.drain()
                t2 = clock()
                on_reply(*replies[0])
                t3 = clock()
                s.add("close.encode", t1 - t0)
                s.add("close.rt", t2 - t1)
                s.add("close.decode", t3 - t2)
            for _ in range(batch):
                t0 = clock()
                ch.call(_PING, b"")
                s.add("ping.rt", clock() - t0)
            # batches: queueing is the encode, Batch.run less its round trip the decode
            ch.call = timed_call
            try:
                for _ in range(BATCH_REPS):
                    b = ctx.batch()
                    queue = getattr(b, f"alloc_{kind}_buf")
                    t0 = clock()
                    for _ in range(batch):
                        queue(size)
                    t1 = clock()
                    batching[0] = "alloc"
                    shms = b.run()
                    t2 = clock()
                    s.add("alloc.batch_encode", t1 - t0)
                    s.add("alloc.batch_run", t2 - t1)
                    b = ctx.batch()
                    t0 = clock()
                    for shm in shms:
                        b.close(shm)
                    t1 = clock()
                    batching[0] = "close"
                    b.run()
                    t2 = clock()
                    s.add("close.batch_encode", t1 - t0)
                    s.add("close.batch_run", t2 - t1)
            finally:
                del ch.call
        doc = client.service_stats()
    out: dict[str, Any] = {"served_p50_us": _served_p50(doc)}
    for op in ("alloc", "close", "ping"):
        total, rt = s.us(f"{op}.total"), s.us(f"{op}.rt")
        encode = s.us(f"{op}.encode") if op != "ping" else 0.0
        decode = s.us(f"{op}.decode") if op != "ping" else 0.0
        out[f"single.{op}"] = {"encode": encode, "decode": decode, "other": total - encode - rt - decode,
                               "rt": rt, "total": total}
    for op in ("alloc", "close"):
        encode, run, rt = (s.us(f"{op}.batch_encode", batch), s.us(f"{op}.batch_run", batch),
                           s.us(f"{op}.batch_rt", batch))
        out[f"batched.{op}"] = {"encode": encode, "decode": run - rt, "other": 0.0, "rt": rt,
                                "total": encode + run}
    return out


def many_clients(path: str, transport: str, kind: str, size: int, batch: int, clients: int,
                 seconds: float, mode: str) -> float:
    """Operations per second of ``clients`` forked client processes for ``seconds``, each
    allocating and closing as fast as it can: ``single``, ``alloc_*_buf`` then ``close``
    (pipelined with the next request, as ``Shm.close`` sends it); ``batched``, BATCHes of
    ``batch`` allocs then of their closes.  Every alloc and every close counts one."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pids = []
    try:
        for _ in range(clients):
            pid = os.fork()
            if pid == 0:  # a client: connect, say ready, wait for go, count until the end
                code = 1
                try:
                    with poolsvc.connect(path, name="profile-load", transport=transport) as client:
                        ctx = client.open_context("profile-load")
                        alloc = getattr(ctx, f"alloc_{kind}_buf")
                        os.write(ready_w, b"r")
                        os.read(go_r, 1)
                        ops = 0
                        end = time.perf_counter() + seconds
                        while time.perf_counter() < end:
                            if mode == "single":
                                alloc(size).close()
                                ops += 2
                            else:
                                b = ctx.batch()
                                queue = getattr(b, f"alloc_{kind}_buf")
                                for _ in range(batch):
                                    queue(size)
                                shms = b.run()
                                b = ctx.batch()
                                for shm in shms:
                                    b.close(shm)
                                b.run()
                                ops += 2 * batch
                        ctx.flush()
                        os.write(done_w, ops.to_bytes(8, "little"))
                        code = 0
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            pids.append(pid)
        for fd in (ready_w, done_w):  # the children's ends: a client that dies gives end of file
            os.close(fd)
        ready_w = done_w = -1
        if len(_read_exactly(ready_r, clients)) != clients:
            raise RuntimeError("a load client failed before it was ready")
        os.write(go_w, b"g" * clients)
        counts = _read_exactly(done_r, 8 * clients)
        if len(counts) != 8 * clients:
            raise RuntimeError("a load client failed during the run")
        return sum(int.from_bytes(counts[i:i + 8], "little") for i in range(0, len(counts), 8)) / seconds
    finally:
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if status:
                raise RuntimeError(f"load client {pid} exited with status {status:#x}")
        for fd in (ready_r, ready_w, go_r, go_w, done_r, done_w):
            if fd >= 0:
                os.close(fd)


def _read_exactly(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from pipe ``fd``: fewer only at end of file."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _served_p50(doc: Any) -> dict[str, float]:
    """The daemon's own p50 of ``_request`` per message type, from a STATS document."""
    if isinstance(doc, dict):
        latency = doc.get("latency")
        if isinstance(latency, dict) and all(isinstance(v, dict) for v in latency.values()):
            return {name: v["p50_us"] for name, v in latency.items() if "p50_us" in v}
        for value in doc.values():
            found = _served_p50(value)
            if found:
                return found
    return {}


# -- the tables -------------------------------------------------------------------------------------
ROWS = (
    ("client: encode", "client", "encode"),
    ("client: round trip (below)", None, None),
    ("  daemon: transport (receive or copy out, frame split, reply send or publish)", "daemon", "transport"),
    ("  daemon: dispatch (`_request`: handler lookup, latency ring, reply header)", "daemon", "dispatch"),
    ("  daemon: batch loop (compiled `run_batch` around handlers that return at once)", "daemon", "batch loop"),
    ("  daemon: calls in a batch above their per-call medians", "daemon", "spread"),
    ("  daemon: handler, compiled `ShmRequests` (body, limits, quota, Shm, id, accounting, reply)",
     "daemon", "handler"),
    ("  daemon: handler, its compiled System calls (floors below: pool pages, REGISTER/UNREGISTER)",
     "daemon", "system"),
    ("  unattributed: wake-ups, daemon loop, scheduling, kernel", "rest", None),
    ("client: decode", "client", "decode"),
    ("client: other (API layers)", "client", "other"),
    ("**total, client-measured**", "client", "total"),
)


def combine(client: dict[str, Any], daemon: dict[str, Any], transport: str, mode: str,
            op: str) -> dict[str, float]:
    """One column: each row's µs per operation (rows add up to ``total``)."""
    c, d = client[f"{mode}.{op}"], daemon[f"{transport}.{mode}.{op}"]
    col: dict[str, float] = {}
    for label, side, key in ROWS:
        if side == "client":
            col[label] = c[key]
        elif side == "daemon":
            col[label] = d[key]
        elif side == "rest":
            col[label] = c["rt"] - d["total"]
        else:
            col[label] = c["rt"]
    return col


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def markdown_table(columns: dict[str, dict[str, float]]) -> list[str]:
    names = list(columns)
    out = ["| µs per operation | " + " | ".join(names) + " |",
           "|---|" + "---:|" * len(names)]
    for label, _, _ in ROWS:
        if all(abs(columns[n][label]) < 0.005 for n in names) and "total" not in label:
            continue
        out.append(f"| {label} | " + " | ".join(_fmt(columns[n][label]) for n in names) + " |")
    return out


def goal_rows(columns: dict[str, dict[str, float]], daemon: dict[str, Any], mode: str,
              transport: str, wake_us: float) -> list[tuple[str, float]]:
    """Throughput bounds (ops/s) from one transport's ALLOC and CLOSE columns of ``mode``."""
    cols = [columns[f"{transport} {mode} ALLOC"], columns[f"{transport} {mode} CLOSE"]]

    def mean(label: str) -> float:
        return sum(c[label] for c in cols) / 2

    total = mean("**total, client-measured**")
    client_cpu = mean("client: encode") + mean("client: decode") + mean("client: other (API layers)")
    daemon_ops = [daemon[f"{transport}.{mode}.{op}"] for op in ("alloc", "close")]
    daemon_cpu = sum(x["total"] for x in daemon_ops) / 2
    # a compiled end-to-end path would still make the System's compiled calls
    compiled = daemon["compiled_per_op"]
    rows = [
        ("one client, measured (1 / total)", 1e6 / total),
        ("bound by the daemon's CPU (1 / daemon parts)", 1e6 / daemon_cpu),
        ("bound by both CPUs, no wake-ups (2 / (client + daemon))", 2e6 / (client_cpu + daemon_cpu)),
    ]
    if mode == "single":
        rows.append(("bound by both CPUs with one wake-up pair per request (2 / (client + daemon + "
                     "eventfd round trip))", 2e6 / (client_cpu + daemon_cpu + wake_us)))
    rows.append(("compiled daemon path (daemon = compiled calls alone), client as now: "
                 "2 / (client + compiled)", 2e6 / (client_cpu + compiled)))
    return rows


# -- the run ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.monotonic()
    info = results.machine(BACKEND)
    timer_ns = timer_cost()
    doc: dict[str, Any] = {"machine": info, "date": started.strftime("%Y-%m-%d %H:%M UTC"),
                           "settings": {"kind": args.kind, "size": args.size, "batch": args.batch,
                                        "rounds": args.rounds, "transports": args.transport,
                                        "clients": args.clients, "seconds": args.seconds,
                                        "pools": args.pool},
                           "floors": measure_floors(args.floor_n, timer_ns), "pools": {}}
    with tempfile.TemporaryDirectory(prefix="poolsvc-profile-") as folder:
        for pool in args.pool:
            daemon = profile_daemon(pool, args.kind, args.size, args.batch, args.rounds,
                                    tuple(args.transport), folder, timer_ns)
            proc = DaemonProcess(pool, folder)
            try:
                clients = {t: profile_client(proc.path, t, args.kind, args.size, args.batch, args.rounds,
                                             timer_ns) for t in args.transport}
                loads = {f"{t} {mode}": many_clients(proc.path, t, args.kind, args.size, args.batch,
                                                     args.clients, args.seconds, mode)
                         for mode in ("single", "batched") for t in args.transport} if args.clients else {}
            finally:
                proc.close()
            columns: dict[str, dict[str, float]] = {}
            for mode in ("single", "batched"):
                for t in args.transport:
                    for op in ("alloc", "close", "ping"):
                        if mode == "batched" and op == "ping":
                            continue
                        name = f"{t} {mode} {'CLOSE' if op == 'close' else op.upper()}"
                        columns[name] = combine(clients[t], daemon, t, mode, op)
            doc["pools"][pool] = {"daemon": daemon, "client": clients, "columns": columns, "load": loads}
    wake = doc["floors"].get("eventfd ping-pong round trip, placed by the scheduler", 0.0)
    for entry in doc["pools"].values():
        entry["bounds"] = {f"{t} {mode}": dict(goal_rows(entry["columns"], entry["daemon"], mode, t, wake))
                           for mode in ("single", "batched") for t in args.transport}
        for name, ops in entry["load"].items():
            entry["bounds"][name][f"{args.clients} clients for {args.seconds:g} s, measured (alloc "
                                  "+ pipelined close; batches of allocs, then of closes)"] = ops
    doc["seconds"] = time.monotonic() - t_start
    doc["started"] = started
    return doc


def render(doc: dict[str, Any], command: str) -> list[str]:
    """The Markdown document of a run."""
    settings = doc["settings"]
    started = doc["started"]
    seconds = doc["seconds"]
    out = ["# Results: Where a request's time goes", "",
           "Generated by `bench/profile_request.py`; do not edit by hand. Regenerate with:", "",
           "```sh", command, "```", "",
           "| | |", "|---|---|",
           f"| date | {started.strftime('%Y-%m-%d %H:%M UTC')} |",
           f"| run time | {seconds // 60:.0f} min {seconds % 60:.0f} s |",
           f"| commit | {results.commit()} |"]
    out += [f"| {k} | {v} |" for k, v in doc["machine"].items()]
    out += [f"| load average after the run | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
            f"| request | `alloc_{settings['kind']}_buf({settings['size']})` and its close; batches of "
            f"{settings['batch']}; {settings['rounds']} rounds |", "",
            "The machine may be shared with other jobs, so single figures deserve scepticism: every "
            "figure is a median of per-call samples of this run, and the parts of a column come from "
            "the same run.  docs/benchmarks.md (\"Where a request's time goes\") says what each row "
            "measures.", ""]
    out += ["## Floors", "", "| floor | µs |", "|---|---:|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in doc["floors"].items()]
    for pool, entry in doc["pools"].items():
        for k, v in entry["daemon"]["compiled"].items():
            out.append(f"| {pool} pool: {k} | {_fmt(v)} |")
    out.append("")
    for pool, entry in doc["pools"].items():
        title = "dynamic pool" if pool == "dynamic" else "static pool (`dynamic_shm` off)"
        cols = entry["columns"]
        for mode, what in (("single", "one request per round trip (PING: the empty request, the floor)"),
                           ("batched", f"per operation of a BATCH of {settings['batch']}")):
            out += [f"## {title}: {what}", ""]
            out += markdown_table({k.replace(f" {mode}", ""): v for k, v in cols.items() if f" {mode} " in k})
            out.append("")
        served = entry["daemon"]["served_p50_us"]
        if served:
            out += ["The daemon's own `_request` p50 over the in-process run (its latency ring): " + ", ".join(
                f"{k} {_fmt(v)} µs" for k, v in served.items()) + "; over the client runs (STATS of "
                "the subprocess daemon): " + ", ".join(
                f"{t}: " + ", ".join(f"{k} {_fmt(v)} µs" for k, v in c["served_p50_us"].items()
                                     if k in ("ALLOC", "SHM_CLOSE", "PING", "BATCH"))
                for t, c in entry["client"].items()) + ".", ""]
        hot = entry["daemon"]["hot"]
        out += [f"## {title}: inside the ALLOC and SHM_CLOSE handlers (cProfile)", "",
                "Functions with the most own time over ALLOC + SHM_CLOSE handler pairs (the two handler "
                "rows above), as shares of the profiled time.  The handlers are the compiled kernel "
                "(ext/fastpath.pyx), which cProfile does not see: what it lists is the profiling loop's "
                "own calls, and a Python function would appear only when a rare path (arena growth, a "
                "new segment's descriptor) called back into Python.", "",
                "| function | share of own time | calls per pair |", "|---|---:|---:|"]
        out += [f"| `{h['function']}` | {100 * h['share']:.1f}% | {h['calls_per_pair']:.2f} |" for h in hot]
        out.append("")
        out += [f"## {title}: bounds against the goals (ops/s; each alloc and each close counts one)", "",
                f"Goals: {GOAL_BATCHED:,} ops/s batched, {GOAL_SINGLE:,} ops/s single, 8 clients on this "
                "machine.", "", "| bound | " + " | ".join(entry["bounds"]) + " |",
                "|---|" + "---:|" * len(entry["bounds"])]
        labels: list[str] = []
        for rows in entry["bounds"].values():
            labels += [k for k in rows if k not in labels]
        for label in labels:
            out.append(f"| {label} | " + " | ".join(
                f"{rows[label]:,.0f}" if label in rows else "" for rows in entry["bounds"].values()) + " |")
        out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Break one request (ALLOC, SHM_CLOSE; alone and batched; socket and shm transports) "
                    "into its parts in µs, beside the machine's floors.")
    parser.add_argument("--transport", action="append", choices=TRANSPORTS,
                        help="transport to profile (repeat for both; default both)")
    parser.add_argument("--pool", action="append", choices=POOLS,
                        help="pool to profile: dynamic, or static (dynamic_shm off); default both")
    parser.add_argument("--kind", choices=tuple(KINDS), default="user", help="alloc_<kind>_buf (default user)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per allocation (default 4096)")
    parser.add_argument("--batch", type=int, default=256,
                        help="operations per BATCH, and per group of single requests (default 256)")
    parser.add_argument("--rounds", type=int, default=20, help="groups measured per figure (default 20)")
    parser.add_argument("--floor-n", type=int, default=3000, help="round trips per floor (default 3000)")
    parser.add_argument("--clients", type=int, default=8,
                        help="client processes of the throughput runs (default 8; 0: none)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="length of each throughput run, in seconds (default 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    parser.add_argument("--write", action="store_true", help=f"also write {OUTPUT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    args.transport = args.transport or list(TRANSPORTS)
    args.pool = args.pool or list(POOLS)
    if not 1 <= args.batch <= P.DEFAULT_MAX_BATCH:
        parser.error(f"--batch must be in 1..{P.DEFAULT_MAX_BATCH}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    doc = run(args)
    command = "python bench/profile_request.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = render(doc, command.strip())
    if args.write:
        OUTPUT.write_text("\n".join(lines) + "\n")
    if args.json:
        doc["started"] = doc["started"].isoformat()
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
