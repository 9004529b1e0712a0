"""Malformed traffic over a real socket (hypothesis): the daemon answers or hangs up,
never crashes, never leaks, and keeps serving a well-behaved client meanwhile.

Each example opens a connection to an in-process daemon, writes generated
bytes (random junk, frames with random types/lengths/bodies, or a valid
HELLO followed by such frames, batches included), half-closes, and reads
until the daemon hangs up.  Every frame it gets back must be well formed.
Afterwards the daemon's accounting must be back to its idle figures and a
bystander client, connected the whole time, must still work.
"""
from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolsvc.service import protocol as P
from poolsvc.service.client import connect

from svcutil import DaemonThread, idle, read_frames, summary

_TYPES = st.one_of(st.sampled_from([int(t) for t in P.MsgType]), st.integers(0, 0xFFFF))


def _body_for(msg_type: int) -> st.SearchStrategy[bytes]:
    structured = {
        P.MsgType.ALLOC: st.builds(lambda k, s: P.ALLOC.pack(k, s), st.integers(0, 5),
                                   st.integers(-(1 << 63), (1 << 63) - 1)),
        P.MsgType.SHM_CLOSE: st.builds(P.COOKIE.pack, st.integers(0, (1 << 64) - 1)),
        P.MsgType.SHM_FROM_ID: st.builds(P.SHM_ID.pack, st.integers(-(1 << 63), (1 << 63) - 1)),
        P.MsgType.REGISTER: st.builds(lambda k, o, n: P.REGISTER.pack(k, o, n), st.integers(0, 3),
                                      st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1)),
        P.MsgType.INVOKE: st.builds(lambda sid, n, rest: P.SESSION.pack(sid, 0, 0) + P.COOKIE.pack(n) + rest,
                                    st.integers(0, 3), st.integers(0, 6), st.binary(max_size=200)),
    }
    strategy = structured.get(msg_type)
    raw = st.binary(max_size=300)
    return raw if strategy is None else st.one_of(strategy, raw)


@st.composite
def frames(draw: st.DrawFn, depth: int = 0) -> bytes:
    msg_type = draw(_TYPES)
    if msg_type == P.MsgType.BATCH and depth == 0:
        body = b"".join(draw(st.lists(frames(depth=1), max_size=6)))
    else:
        body = draw(_body_for(msg_type))
    length = draw(st.one_of(st.just(len(body)), st.integers(0, len(body) + 16),
                            st.integers(0, (1 << 32) - 1)))
    flags = draw(st.sampled_from([0, 0, 0, 1, 0x8000]))
    return struct.pack("<IHH", length, msg_type, flags) + body


traffic = st.one_of(
    st.binary(max_size=400),
    st.lists(frames(), max_size=8).map(b"".join),
    st.tuples(st.sampled_from([int(P.Role.CONTEXT), int(P.Role.MONITOR), 0, 7]),
              st.lists(frames(), max_size=8)).map(
        lambda t: P.frame(P.MsgType.HELLO, P.HELLO.pack(P.MAGIC, P.VERSION, t[0])) + b"".join(t[1])),
)


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    d = DaemonThread(tmp_path_factory.mktemp("fuzz") / "f.sock", max_frame=64 << 10)
    d.baseline = summary(d.stats())
    bystander = connect(d.path, name="bystander")
    d.bystander_ctx = bystander.open_context("bystander")
    d.bystander_shm = d.bystander_ctx.alloc_user_buf(4096)
    d.bystander_shm.view()[:4] = b"keep"
    d.baseline = summary(d.stats())
    yield d
    bystander.close()
    d.stop()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=traffic)
def test_malformed_traffic_never_hurts_the_daemon(fuzz_daemon, data):
    d = fuzz_daemon
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(d.path)
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already hung up on an early violation
        replies = read_frames(sock)  # until the daemon hangs up: it must, after EOF
    finally:
        sock.close()
    for kind, body in replies:
        assert kind in (P.MsgType.WELCOME, P.MsgType.OK, P.MsgType.ERROR, P.MsgType.BATCH_REPLY)
        if kind == P.MsgType.ERROR:
            P.ErrorCode(P.ERROR.unpack_from(body)[0])  # a known code
    d.wait_for(idle(d.baseline), timeout=20)
    ctx = d.bystander_ctx
    assert bytes(d.bystander_shm.view()[:4]) == b"keep"
    ctx.alloc_kernel_buf(100).close()
    ctx.flush()
