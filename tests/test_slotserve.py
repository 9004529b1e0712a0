"""The daemon's slot kernel (ext/slotserve.pyx) against its plain-Python twin
(poolsvc/_pure/slotserve.py) as the oracle, and the kernel's own cases on both backends.

Two in-process daemons, each with one CONTEXT connection that has a shm slot,
get the same random slot requests written into their slots, and the loop's
``_serve_slot`` serves them: one daemon through the compiled kernel and the
compiled ``ShmRequests``, the other through the twin kernel, the twin's
``ShmRequests`` and the twin's handlers.  The requests mix PING, ALLOC and
SHM_CLOSE frames (the kernel's own) with frames it hands over to the Python
loop (BATCH, SHM_FROM_ID, unknown types), bad sequences, bad lengths,
truncated, oversized and flagged frames, requests whose replies cross
``max_output`` or the reply area, ALLOCs that send a new segment's
descriptor, with the client asleep or not and with the doorbells rung at
once or at the end of the loop's turn.  After every request the two must
agree on the return value, the reply area and the daemon's words, what the
client's socket received (bytes and descriptor count), the connection's
state and counters, the accounting, the System's STATS and the daemon's
metrics (counts; the latency figures are timings).

The oracle needs the compiled kernel; under ``POOLSVC_PUREPYTHON=1`` the
daemons' own tests (and the cases below the oracle) run the twin.
"""
from __future__ import annotations

import mmap
import os
import socket
import types
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc import Config
from poolsvc._backend import BACKEND, core
from poolsvc._pure import fastpath as pure_fastpath
from poolsvc._pure import slotserve as pure_slotserve
from poolsvc.service import protocol as P
from poolsvc.service import slot as S
from poolsvc.service.connection import READY
from poolsvc.service.server import Server
from poolsvc.service.settings import ServiceSettings

from test_fastpath import Daemon as HandlerDaemon

compiled_only = pytest.mark.skipif(BACKEND != "compiled", reason="the compiled kernel against its twin")

PAGE = 4096
MAX_SHMS = 6
MAX_FRAME = 4096
MAX_OUTPUT = 64 << 10           # the smallest the settings allow
PING, ALLOC, SHM_CLOSE = int(P.MsgType.PING), int(P.MsgType.ALLOC), int(P.MsgType.SHM_CLOSE)
BATCH, SHM_FROM_ID = int(P.MsgType.BATCH), int(P.MsgType.SHM_FROM_ID)


class SlotDaemon:
    """An in-process Server and one CONTEXT connection with a shm slot, the client's
    end of it mapped here (words written directly, as a hostile client may)."""

    def __init__(self, path: str, twin: bool, server: Server | None = None) -> None:
        """A new daemon at ``path``, or (``server`` given) one more client of that one."""
        self.owner = server is None
        if server is None:
            config = Config(dynamic_size=16 << 20, arena_step=1 << 20, static_size=4 << 20)
            settings = ServiceSettings(socket_path=path, log_level="CRITICAL", max_shms_per_client=MAX_SHMS,
                                       max_frame=MAX_FRAME, max_output=MAX_OUTPUT)
            server = Server(config, settings)
            server.start()
        self.server = srv = server
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        srv._accept()
        self.conn = conn = next(c for c in srv.connections.values() if c.serial == srv._serials)
        hello = P.HELLO2.pack(P.MAGIC, P.VERSION_2, P.Role.CONTEXT, P.Feature.SHM_SLOT)
        self.sock.sendall(P.frame(int(P.MsgType.HELLO), hello))
        srv._on_readable(conn)
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 16)
        assert P.HEADER.unpack_from(data)[1] == int(P.MsgType.WELCOME) and fds
        self.mm = mmap.mmap(fds[0], S.SLOT_BYTES)
        for fd in fds:
            os.close(fd)
        self.words = memoryview(self.mm)[:S.SLOT_WORDS * 8].cast("Q")
        self.sock.setblocking(False)
        if twin:
            srv._slot_kernel = pure_slotserve.serve_slot
            srv._ring = pure_slotserve.ring_doorbell
            conn.shm_requests = pure_fastpath.ShmRequests(srv, conn)
            handlers = dict(conn.handlers)
            handlers[ALLOC] = types.MethodType(pure_fastpath.serve_alloc, srv)
            handlers[SHM_CLOSE] = types.MethodType(pure_fastpath.serve_shm_close, srv)
            conn.handlers = handlers
            srv._batch_handlers = {**srv._batch_handlers, ALLOC: handlers[ALLOC],
                                   SHM_CLOSE: handlers[SHM_CLOSE]}

    def publish(self, request: bytes, seq: int, length: int, sleeping: int) -> None:
        """Write a request into the slot as a client (or a hostile one) would."""
        self.mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(request)] = request
        self.words[S.W_REQ_LEN] = length
        self.words[S.W_CLIENT_SLEEPING] = sleeping
        self.words[S.W_REQ_SEQ] = seq % (1 << 64)

    def serve(self, defer: bool) -> Any:
        """One turn of the loop for this slot: serve it; with ``defer``, as the loop
        does for the ready slots (writes and doorbells at the end of the turn)."""
        srv = self.server
        srv._defer_writes = defer
        try:
            return srv._serve_slot(self.conn)
        finally:
            srv._defer_writes = False
            srv._write_turn()

    def received(self) -> tuple[bytes, int, bool]:
        """What the client's socket has: bytes, descriptors (closed here), end of stream."""
        data, fds, eof = b"", 0, False
        while True:
            try:
                chunk, got, _, _ = socket.recv_fds(self.sock, 1 << 20, 64)
            except BlockingIOError:
                break
            for fd in got:
                os.close(fd)
            fds += len(got)
            if not chunk:
                eof = True
                break
            data += chunk
        return data, fds, eof

    def outcome(self, served: Any) -> dict[str, Any]:
        """Everything a slot request may change, without what differs between daemons
        (pids, timings, object names)."""
        srv, conn, words = self.server, self.conn, self.words
        rep_len = words[S.W_REP_LEN]
        reply = bytes(self.mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + rep_len]) if rep_len <= S.SLOT_REP_CAP else None
        metrics = srv.metrics.snapshot()
        metrics.pop("uptime_s")
        metrics["latency"] = {name: ring["count"] for name, ring in metrics["latency"].items()}
        return {
            "served": served, "rep_seq": words[S.W_REP_SEQ], "rep_len": rep_len, "reply": reply,
            "socket": self.received(), "state": conn.state, "seq": conn.seq, "requests": conn.requests,
            "out": (conn.out_bytes, len(conn.out)), "slot": conn.slot is not None,
            "bells": len(srv._bells), "metrics": metrics,
            # test_fastpath's: the accounting, the ids, the System's STATS (descriptors left
            # for the next reply counted and closed); none once the context is released
            "accounting": None if conn.context is None else HandlerDaemon.state(self),  # type: ignore[arg-type]
        }

    def close(self) -> None:
        self.words.release()
        self.mm.close()
        self.sock.close()
        if self.conn.state == READY:
            self.server._on_readable(self.conn)  # EOF: the connection and its context go
        if self.owner:
            self.server.stop()
            self.server.close()


def alloc_frame(kind: int, size: int) -> bytes:
    return P.frame(ALLOC, P.ALLOC.pack(kind, size))


def encode(frame: tuple[Any, ...], cookies: list[int]) -> bytes:
    """One request frame (or several, or a malformed one) of the strategy below."""
    what = frame[0]
    if what == "ping":
        return P.frame(PING, frame[1])
    if what == "alloc":
        return alloc_frame(frame[1], frame[2])
    if what == "close":
        cookie = cookies[frame[1] % len(cookies)] if cookies else 0x1000 + frame[1]
        return P.frame(SHM_CLOSE, P.COOKIE.pack(cookie))
    if what == "bad_body":
        return P.frame(frame[1], frame[2])
    if what == "from_id":
        return P.frame(SHM_FROM_ID, P.SHM_ID.pack(frame[1]))
    if what == "unknown":
        return P.frame(frame[1], b"x")
    if what == "batch":
        return P.frame(BATCH, b"".join(encode(inner, cookies) for inner in frame[1]))
    if what == "flood":  # replies that cross max_output and the reply area
        return alloc_frame(3, PAGE) * frame[1]
    if what == "flags":
        return P.HEADER.pack(1, PING, frame[1]) + b"z"
    if what == "oversized":
        return P.HEADER.pack(MAX_FRAME + frame[1], PING, 0) + bytes(MAX_FRAME + frame[1])
    assert what == "truncated"
    return P.HEADER.pack(frame[1], PING, 0) + bytes(frame[2])


sizes = st.one_of(st.sampled_from([1, PAGE, PAGE + 1, 3 * PAGE]), st.integers(1, 2 * PAGE),
                  st.integers(1, 300 * PAGE), st.integers(-2, 0))
own = st.one_of(
    st.tuples(st.just("ping"), st.binary(max_size=64)),
    st.tuples(st.just("alloc"), st.sampled_from([0, 0, 1, 2, 3]), sizes),
    st.tuples(st.just("close"), st.integers(0, 20)),
    st.tuples(st.just("bad_body"), st.sampled_from([ALLOC, SHM_CLOSE]), st.sampled_from([b"", b"\0" * 7])),
)
other = st.one_of(
    st.tuples(st.just("from_id"), st.integers(0, 4)),
    st.tuples(st.just("unknown"), st.sampled_from([0, 999, int(P.MsgType.HELLO)])),
    st.tuples(st.just("batch"), st.lists(own, max_size=4)),
    st.tuples(st.just("flood"), st.sampled_from([100, 650, 700, 1600])),
    st.tuples(st.just("flags"), st.sampled_from([1, 0x8000])),
    st.tuples(st.just("oversized"), st.sampled_from([1, 100])),
    st.tuples(st.just("truncated"), st.integers(0, 40), st.integers(0, 20)),
)
requests = st.tuples(
    st.lists(st.one_of(own, own, own, own, other), min_size=1, max_size=6),
    # the sequence: the next one mostly; the same (nothing to serve) or a wrong one
    st.sampled_from([1] * 12 + [0, 2, -1]),
    # the length: the frames' own mostly; too short, past the area, at its edge, stale bytes after
    st.sampled_from(["exact"] * 12 + ["short", "long", "cap", "more"]),
    st.booleans(),      # the client sleeps
    st.booleans(),      # the doorbells wait for the end of the loop's turn
)


def run_both(tmp_path: Any, steps: list[tuple[Any, ...]]) -> None:
    compiled = SlotDaemon(str(tmp_path / "c.sock"), twin=False)
    twin = SlotDaemon(str(tmp_path / "t.sock"), twin=True)
    try:
        for frames, seq_delta, length_mode, sleeping, defer in steps:
            cookies = sorted(compiled.conn.context.shms) if compiled.conn.context is not None else []
            request = b"".join(encode(frame, cookies) for frame in frames)[:S.SLOT_REQ_CAP]
            length = {"exact": len(request), "short": len(request) % P.HEADER_SIZE,
                      "long": S.SLOT_REQ_CAP + 1, "cap": S.SLOT_REQ_CAP,
                      "more": min(S.SLOT_REQ_CAP, len(request) + 5)}[length_mode]
            results = []
            for daemon in (compiled, twin):
                daemon.publish(request, daemon.conn.seq + seq_delta, length, int(sleeping))
                results.append(daemon.outcome(daemon.serve(defer)))
            assert results[0] == results[1], (frames, seq_delta, length_mode, sleeping, defer)
            if compiled.conn.state != READY:
                break
    finally:
        compiled.close()
        twin.close()


@compiled_only
@given(steps=st.lists(requests, min_size=1, max_size=25))
def test_compiled_matches_twin(tmp_path_factory: Any, steps: list[tuple[Any, ...]]) -> None:
    run_both(tmp_path_factory.mktemp("slotserve"), steps)


@compiled_only
@pytest.mark.parametrize("length_mode", ["exact", "short", "long", "cap", "more"])
@pytest.mark.parametrize("seq_delta", [1, 0, 2])
def test_slot_checks_alike(tmp_path: Any, seq_delta: int, length_mode: str) -> None:
    """Every sequence and length case, on a request of the kernel's own frames."""
    frames = [("ping", b"abc"), ("alloc", 0, PAGE), ("close", 0)]
    run_both(tmp_path, [(frames, 1, "exact", False, False), (frames, seq_delta, length_mode, True, False)])


@compiled_only
def test_limits_alike(tmp_path: Any) -> None:
    """Replies across max_output and the reply area, a new segment's descriptor, and
    allocations up to the shm limit, asleep and awake, the rings deferred or not."""
    steps: list[tuple[Any, ...]] = []
    for n in (100, 650, 700, 820, 1600):
        steps.append(([("flood", n)], 1, "exact", n % 2 == 0, n > 700))
    steps += [([("alloc", k % 3, (k + 1) * 100 * PAGE)], 1, "exact", True, k % 2 == 0)
              for k in range(MAX_SHMS + 1)]
    steps += [([("close", k)], 1, "exact", k % 2 == 1, True) for k in range(MAX_SHMS + 1)]
    steps.append(([("ping", b"p" * 4000)] * 8, 1, "exact", True, True))
    run_both(tmp_path, steps)


# -- the kernel's own cases, on the selected backend ---------------------------------------------

@pytest.fixture
def daemon(tmp_path: Any) -> Any:
    d = SlotDaemon(str(tmp_path / "d.sock"), twin=False)
    yield d
    d.close()


def test_served_in_the_slot_and_rung(daemon: SlotDaemon) -> None:
    """PING, ALLOC and SHM_CLOSE are served in the slot; a sleeping client gets its DOORBELL
    on the socket (a direct send: nothing else is queued), an awake one nothing."""
    request = P.frame(PING, b"hi") + alloc_frame(0, PAGE)
    daemon.publish(request, 1, len(request), 0)
    assert daemon.serve(False) is True
    assert daemon.words[S.W_REP_SEQ] == 1
    frames = P.split_frames(daemon.mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + daemon.words[S.W_REP_LEN]], 8, 1 << 20)
    assert [f[0] for f in frames] == [int(P.MsgType.OK)] * 2
    data, fds, eof = daemon.received()
    assert fds == 1 and not eof and data == P.DOORBELL_FRAME  # the new segment's descriptor goes first
    cookie = next(iter(daemon.conn.context.shms))
    request = P.frame(SHM_CLOSE, P.COOKIE.pack(cookie))
    for defer in (False, True):
        daemon.publish(request, daemon.conn.seq + 1, len(request), 1)
        assert daemon.serve(defer) is True
        assert daemon.received() == (P.DOORBELL_FRAME, 0, False)
        assert daemon.conn.out_bytes == 0 and not daemon.server._bells
    assert not daemon.conn.context.shms
    assert daemon.server.metrics.ops[SHM_CLOSE] == 2 and daemon.conn.requests == 5  # HELLO, then 4
    daemon.publish(request, daemon.conn.seq, len(request), 1)
    assert daemon.serve(False) is False  # nothing new


def test_handed_over_after_the_kernels_frames(daemon: SlotDaemon) -> None:
    """A BATCH after a PING: the PING's reply is the kernel's, the BATCH the Python loop's;
    one reply, in order."""
    request = P.frame(PING, b"a") + P.frame(BATCH, P.frame(PING, b"b")) + P.frame(PING, b"c")
    daemon.publish(request, 1, len(request), 0)
    assert daemon.serve(False) is True
    reply = daemon.mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + daemon.words[S.W_REP_LEN]]
    frames = P.split_frames(reply, 8, 1 << 20)
    assert [(t, bytes(reply[a:b])) for t, a, b in frames] == [
        (int(P.MsgType.OK), b"a"), (int(P.MsgType.BATCH_REPLY), P.frame(int(P.MsgType.OK), b"b")),
        (int(P.MsgType.OK), b"c")]


def test_violation_in_the_kernel(daemon: SlotDaemon) -> None:
    """A sequence that is not the next one: ERROR on the socket, slot dropped, hang-up."""
    daemon.publish(P.frame(PING, b""), 5, 8, 0)
    assert daemon.serve(False) is True
    data, _, eof = daemon.received()
    assert eof and b"slot request sequence 5, expected 1" in data
    assert daemon.conn.slot is None and daemon.server.metrics.protocol_errors == 1


def test_ring_falls_back_to_the_queue(daemon: SlotDaemon) -> None:
    """A DOORBELL with replies queued goes after them, through the socket's queue."""
    srv, conn = daemon.server, daemon.conn
    srv._queue(conn, P.frame(int(P.MsgType.OK), b"queued"))
    srv._ring(srv, conn)
    data, _, _ = daemon.received()
    assert data == P.frame(int(P.MsgType.OK), b"queued") + P.DOORBELL_FRAME
    assert not conn.out and conn.out_bytes == 0


def test_the_loop_uses_the_backends_kernel() -> None:
    server = Server(Config(), ServiceSettings())
    assert server._slot_kernel is core.serve_slot and server._ring is core.ring_doorbell


@compiled_only
def test_ready_slots_alike(tmp_path: Any) -> None:
    """The polling scan: compiled and twin pick the same slots, in order."""
    daemons = [SlotDaemon(str(tmp_path / f"{k}.sock"), twin=False) for k in range(4)]
    try:
        for d, ahead in zip(daemons, (0, 1, 2, 1 << 63)):
            d.words[S.W_REQ_SEQ] = d.conn.seq + ahead
        polled = {d.conn: None for d in reversed(daemons)}
        want = [d.conn for d in reversed(daemons) if d.words[S.W_REQ_SEQ] != d.conn.seq]
        assert len(want) == 3
        assert core.ready_slots(polled) == pure_slotserve.ready_slots(polled) == want
    finally:
        for d in daemons:
            d.close()


@compiled_only
def test_serve_ready_alike(tmp_path: Any) -> None:
    """The loop's turn: compiled and twin serve the same ready slots (one handed over to
    the Python loop, one with nothing new), mark them served and ring the sleepers."""
    requests = [P.frame(PING, b"one"), b"", P.frame(PING, b"x") + P.frame(BATCH, P.frame(PING, b"y"))]
    outcomes = []
    for twin in (False, True):
        first = SlotDaemon(str(tmp_path / f"{twin}.sock"), twin=twin)
        daemons = [first] + [SlotDaemon(first.server.socket_path, twin, first.server) for _ in range(2)]
        try:
            for d, request in zip(daemons, requests):
                if request:
                    d.publish(request, d.conn.seq + 1, len(request), 1)
                d.conn.served_at = -1.0
            srv = daemons[0].server
            serve_ready = pure_slotserve.serve_ready if twin else core.serve_ready
            srv._defer_writes = True
            served = serve_ready(srv, {d.conn: None for d in daemons}, srv._bells, 5.0)
            # the kernel's reply rings at the end of the turn; the Python loop's queues its DOORBELL
            assert srv._bells == [daemons[0].conn] and srv._unwritten == [daemons[2].conn]
            srv._defer_writes = False
            srv._write_turn()
            outcomes.append((served, [d.conn.served_at for d in daemons],
                             [d.outcome(None)["reply"] for d in daemons],
                             [d.received() for d in daemons]))
        finally:
            for d in reversed(daemons):
                d.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][:2] == (2, [5.0, -1.0, 5.0])
