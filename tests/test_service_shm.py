"""The shm-slot transport of the pool service (protocol version 2).

Round trips through the slot, the socket fallbacks (spinning timed out on
either side, requests too big for the slot, replies too big for it), old
clients beside new ones, a hostile client scribbling anything into its slot
(hypothesis), and SIGKILL of shm clients mid-request with exact accounting
and no ``/dev/shm`` leftovers afterwards.
"""
from __future__ import annotations

import array
import mmap
import os
import random
import signal
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolsvc.errors import Closed, ProtocolError
from poolsvc.service import protocol as P
from poolsvc.service import slot as S
from poolsvc.service.client import connect
from poolsvc.storage import LIVE

from waiting import wait_until
from svcutil import DaemonThread, idle, kill_at_random_moments, read_frames, spawn_client, summary
from sysutil import shm_leftovers
from test_service import CHURN


@pytest.fixture
def daemon(tmp_path):
    before_storage = LIVE["storage"]
    before_shm = shm_leftovers()
    d = DaemonThread(tmp_path / "d.sock")
    d.baseline = summary(d.stats())
    yield d
    d.stop()
    assert LIVE["storage"] == before_storage, "daemon storage objects (slots included) leaked"
    assert shm_leftovers() == before_shm


def _transports(stats):
    return sorted(c["transport"] for c in stats["clients"] if c["name"] != "test-monitor")


def test_round_trips_through_the_slot(daemon):
    with connect(daemon.path, name="shm", transport="shm") as client:
        assert client._monitor.transport == "socket"  # a MONITOR connection gets no slot
        assert client.ping(b"hello") == b"hello"
        ctx = client.open_context("shm")
        assert ctx._channel.transport == "shm"
        shm = ctx.alloc_user_buf(10_000)
        shm.view()[:5] = b"abcde"
        again = ctx.shm_from_id(shm.id)
        assert again is shm and bytes(shm.view()[:5]) == b"abcde"
        again.close()
        for _ in range(500):  # pipelined closes ride in the slot with the next request
            ctx.alloc_priv_buf(4096).close()
            ctx.alloc_kernel_buf(5000).close()
        b = ctx.batch()
        for _ in range(100):
            b.alloc_priv_buf(4096)
        got = b.run()
        assert len(got) == 100 and all(s.size == 4096 for s in got)
        b = ctx.batch()
        for s in got:
            b.close(s)
        assert b.run() == [None] * 100
        seq = ctx._channel.slot.seq
        assert seq > 1000, "requests did not go through the slot"
        stats = client.stats()
        assert client._monitor is None  # the context's connection carries STATS
        assert _transports(stats["service"]) == ["shm"]
        assert [c["shms"] for c in stats["service"]["clients"] if c["role"] == "CONTEXT"] == [1]
        shm.close()
    daemon.wait_for(idle(daemon.baseline))


def test_old_and_new_clients_side_by_side(tmp_path):
    d = DaemonThread(tmp_path / "d.sock")
    try:
        base = summary(d.stats())
        with connect(d.path, transport="socket") as old, connect(d.path, transport="shm") as new:
            a, b = old.open_context("old"), new.open_context("new")
            sa, sb = a.alloc_user_buf(4096), b.alloc_user_buf(4096)
            sa.view()[:1], sb.view()[:1] = b"a", b"b"
            assert a._channel.version == P.VERSION and b._channel.version == P.VERSION_2
            assert sorted(c["transport"] for c in d.stats()["clients"] if c["role"] == "CONTEXT") == \
                ["shm", "socket"]
        d.wait_for(idle(base))
    finally:
        d.stop()
    # A daemon that offers no slots: the client asks, gets version 2 without one.
    d = DaemonThread(tmp_path / "n.sock", shm_slots=False)
    try:
        with connect(d.path, transport="shm") as client:
            ctx = client.open_context()
            assert ctx._channel.transport == "socket" and ctx._channel.version == P.VERSION_2
            ctx.alloc_priv_buf(4096).close()
            assert client.ping(b"x") == b"x"
    finally:
        d.stop()


@pytest.mark.parametrize("client_spin, daemon_spin", [(0, 100), (200, 0), (0, 0)])
def test_fallback_to_the_socket_when_spinning_times_out(tmp_path, client_spin, daemon_spin):
    """Spin windows of 0: every wait ends in a sleep and a DOORBELL wakes the sleeper."""
    d = DaemonThread(tmp_path / "d.sock", shm_spin_us=daemon_spin)
    try:
        base = summary(d.stats())
        with connect(d.path, transport="shm", shm_spin_us=client_spin) as client:
            ctx = client.open_context()
            held = [ctx.alloc_user_buf(4096 * (1 + i % 3)) for i in range(200)]
            for s in held:
                s.close()
            for _ in range(200):
                assert client.ping(b"p") == b"p"
            assert ctx._channel.slot is not None
            words = ctx._channel.slot.words
            if daemon_spin == 0 or client_spin == 0:  # the daemon goes to sleep and says so in the slot
                wait_until(lambda: words[S.W_DAEMON_SLEEPING] == 1, what="the daemon asleep")
            assert ctx.alloc_priv_buf(4096).size == 4096
        d.wait_for(idle(base))
    finally:
        d.stop()


def test_eventfd_doorbell_wakes_a_sleeping_daemon(daemon, monkeypatch):
    """A new client rings the eventfd the daemon granted, never a DOORBELL frame on
    the socket (whose "sync" wake-up would pull the daemon onto the client's CPU)."""
    with connect(daemon.path, transport="shm") as client:
        ctx = client.open_context()
        channel = ctx._channel
        assert channel.bell >= 0
        sent = []
        real_send = channel._send
        monkeypatch.setattr(channel, "_send", lambda data, fds=(): (sent.append(bytes(data)),
                                                                    real_send(data, fds)))
        words = channel.slot.words
        for _ in range(5):
            deadline = time.monotonic() + 5
            while not words[S.W_DAEMON_SLEEPING]:
                assert time.monotonic() < deadline, "the daemon never went to sleep"
                time.sleep(0.001)
            shm = ctx.alloc_priv_buf(4096)  # published while the daemon sleeps: the bell wakes it
            assert shm.size == 4096
            shm.close()
            ctx.flush()
        assert P.DOORBELL_FRAME not in sent


def test_requests_and_replies_too_big_for_the_slot(daemon):
    with connect(daemon.path, transport="shm") as client:
        ctx = client.open_context()
        big = b"x" * (S.SLOT_REQ_CAP + 100)
        assert client.ping(big) == big  # request over the socket
        b = ctx.batch()
        for _ in range(1500):  # 30 KB of requests, ~130 KB of replies: REP_ON_SOCKET
            b.alloc_priv_buf(4096)
        got = b.run()
        assert len(got) == 1500 and len({s.cookie for s in got}) == 1500
        b = ctx.batch()
        for s in got:
            b.close(s)
        assert b.run() == [None] * 1500
        # a registration (its descriptor travels on the socket) between slot requests
        buf = mmap.mmap(-1, 1 << 16)
        del buf
        from multiprocessing import shared_memory
        obj = shared_memory.SharedMemory(create=True, size=1 << 16)
        try:
            reg = ctx.register_user_buf(obj.buf[100:9000])
            obj.buf[100:103] = b"reg"
            assert bytes(reg.view()[:3]) == b"reg"
            assert client.ping(b"after") == b"after"
            reg.close()
            ctx.flush()
        finally:
            obj.close()
            obj.unlink()
    daemon.wait_for(idle(daemon.baseline))


# -- a hostile client writing into its slot ---------------------------------------------------------
def _raw_shm_conn(d: DaemonThread) -> tuple[socket.socket, mmap.mmap]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(d.path)
    sock.sendall(P.frame(P.MsgType.HELLO, P.HELLO2.pack(P.MAGIC, P.VERSION_2, P.Role.CONTEXT,
                                                         P.Feature.SHM_SLOT) + b"scribbler"))
    data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % 4])
    assert len(fds) == 1 and P.HEADER.unpack_from(data)[1] == P.MsgType.WELCOME
    mm = mmap.mmap(fds[0], S.SLOT_BYTES)
    os.close(fds[0])
    return sock, mm


_WORD = st.one_of(st.integers(0, 4), st.integers(0, (1 << 64) - 1),
                  st.sampled_from([S.SLOT_REQ_CAP, S.SLOT_REQ_CAP + 1, P.HEADER_SIZE - 1]))
_FRAMES = st.lists(st.tuples(st.sampled_from([int(t) for t in P.MsgType] + [0, 99, 0xFFFF]),
                             st.binary(max_size=40)), max_size=6).map(
    lambda fs: b"".join(P.frame(t, body) for t, body in fs))
_WRITES = st.lists(st.one_of(
    st.tuples(st.just("word"), st.integers(0, S.SLOT_WORDS - 1), _WORD),
    st.tuples(st.just("bytes"), st.integers(0, S.SLOT_BYTES - 1), st.binary(min_size=1, max_size=200)),
    st.tuples(st.just("request"), _FRAMES, st.integers(-8, 8)),
), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def scribble_daemon(tmp_path_factory):
    d = DaemonThread(tmp_path_factory.mktemp("scribble") / "s.sock")
    d.baseline = summary(d.stats())
    bystander = connect(d.path, name="bystander", transport="shm")
    d.bystander = bystander.open_context("bystander")
    keep = d.bystander.alloc_user_buf(4096)
    keep.view()[:4] = b"keep"
    d.keep = keep
    d.baseline = summary(d.stats())
    yield d
    bystander.close()
    d.stop()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          max_examples=60, deadline=None)
@given(writes=_WRITES, ring=st.booleans())
def test_garbage_in_the_slot_never_hurts_the_daemon(scribble_daemon, writes, ring):
    d = scribble_daemon
    sock, mm = _raw_shm_conn(d)
    words = S.words_of(mm)
    try:
        seq = 0
        for write in writes:
            if write[0] == "word":
                words[write[1]] = write[2]
            elif write[0] == "bytes":
                off = write[1]
                mm[off:off + len(write[2][:S.SLOT_BYTES - off])] = write[2][:S.SLOT_BYTES - off]
            else:
                frames, skew = write[1], write[2]
                n = min(len(frames), S.SLOT_REQ_CAP)
                mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + n] = frames[:n]
                words[S.W_REQ_LEN] = max(0, n + skew)
                seq += 1
                words[S.W_REQ_SEQ] = seq
        if ring:
            sock.sendall(P.DOORBELL_FRAME)
        # The daemon either answers in the slot or hangs up; both are fine.
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline and words[S.W_REP_SEQ] != words[S.W_REQ_SEQ]:
            time.sleep(0.002)
    finally:
        words.release()
        mm.close()
        sock.close()
    # The bystander is served as before and nothing leaked once the scribbler is gone.
    assert bytes(d.keep.view()[:4]) == b"keep"
    d.bystander.alloc_priv_buf(4096).close()
    d.bystander.flush()
    d.wait_for(idle(d.baseline), timeout=10)


def test_bad_slot_fields_are_protocol_errors(daemon):
    for field, value in ((S.W_REQ_SEQ, 5), (S.W_REQ_LEN, S.SLOT_REQ_CAP + 1), (S.W_REQ_LEN, 3)):
        sock, mm = _raw_shm_conn(daemon)
        words = S.words_of(mm)
        mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + 8] = P.frame(P.MsgType.PING)
        words[S.W_REQ_LEN] = 8
        words[field] = value
        if field != S.W_REQ_SEQ:
            words[S.W_REQ_SEQ] = 1
        try:
            sock.sendall(P.DOORBELL_FRAME)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a polled slot: the daemon found the bad field before the ring, and hung up
        frames = read_frames(sock)  # until the daemon hangs up
        assert frames and frames[-1][0] == P.MsgType.ERROR
        assert P.ERROR.unpack_from(frames[-1][1])[0] == P.ErrorCode.PROTOCOL
        words.release()
        mm.close()
        sock.close()
    # A well-formed request in a raw slot is answered in the slot.
    sock, mm = _raw_shm_conn(daemon)
    words = S.words_of(mm)
    req = P.frame(P.MsgType.PING, b"raw") + P.frame(P.MsgType.ALLOC, P.ALLOC.pack(2, 4096))
    mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(req)] = req
    words[S.W_REQ_LEN] = len(req)
    words[S.W_REQ_SEQ] = 1
    sock.sendall(P.DOORBELL_FRAME)
    deadline = time.monotonic() + 10
    while words[S.W_REP_SEQ] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    n = words[S.W_REP_LEN]
    reply = mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + n]
    length, kind, _ = P.HEADER.unpack_from(reply)
    assert kind == P.MsgType.OK and reply[8:8 + length] == b"raw"
    assert P.HEADER.unpack_from(reply, 8 + length)[1] == P.MsgType.OK
    words.release()
    mm.close()
    sock.close()  # the buffer it allocated is reclaimed
    daemon.wait_for(idle(daemon.baseline))


# -- SIGKILL on the fast path -------------------------------------------------------------------------
def test_sigkill_of_shm_clients_then_exact_accounting(daemon):
    rng = random.Random(4321)
    env = {"POOLSVC_TRANSPORT": "shm"}
    for _round in range(3):
        procs = [spawn_client(CHURN, daemon.path, str(rng.getrandbits(32)), env=env) for _ in range(3)]
        for proc in procs:
            line = proc.stdout.readline().strip()
            assert line == "ready", proc.stderr.read()
        assert all(c["transport"] == "shm" for c in daemon.stats()["clients"] if c["role"] == "CONTEXT")
        kill_at_random_moments(procs, rng)
        stats = daemon.wait_for(idle(daemon.baseline))
    assert stats["requests"]["crashes"] == 9


KILL_IN_SLOT = """
import os, signal, sys
from poolsvc.service import protocol as P
from poolsvc.service import slot as S
from poolsvc.service.client import connect
client = connect(sys.argv[1], transport="shm")
ctx = client.open_context("victim")
held = [ctx.alloc_user_buf(4096) for _ in range(50)]
ch = ctx._channel
allocs = b"".join(P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096)) for _ in range(1500))
req = P.frame(P.MsgType.BATCH, allocs)
ch.slot.mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(req)] = req
ch.slot.words[S.W_REQ_LEN] = len(req)
ch.slot.words[S.W_REQ_SEQ] = ch.slot.seq + 1
if sys.argv[2] == "ring":
    os.write(ch.sock.fileno(), P.DOORBELL_FRAME)
os.kill(os.getpid(), signal.SIGKILL)   # die while the daemon works on it
"""


@pytest.mark.parametrize("ring", ["ring", "quiet"])
def test_sigkill_mid_slot_request(daemon, ring):
    proc = spawn_client(KILL_IN_SLOT, daemon.path, ring)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    daemon.wait_for(idle(daemon.baseline))


def test_daemon_gone_while_client_waits(tmp_path):
    d = DaemonThread(tmp_path / "d.sock")
    client = connect(d.path, transport="shm", shm_spin_us=0)
    ctx = client.open_context()
    ctx.alloc_priv_buf(4096)
    d.stop()
    with pytest.raises(Closed):
        ctx.alloc_priv_buf(4096)
    client.close()


def test_slot_client_over_the_output_bound_waits_without_busy_looping(tmp_path):
    """Replies too big for the slot go to the socket; a client that does not read them
    is not served further (max_output), and the daemon sleeps meanwhile."""
    d = DaemonThread(tmp_path / "d.sock", max_output=64 << 10)
    try:
        sock, mm = _raw_shm_conn(d)
        words = S.words_of(mm)
        req = P.frame(P.MsgType.BATCH, P.frame(P.MsgType.ALLOC, P.ALLOC.pack(2, 4096)) * 1500)
        mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(req)] = req
        last = 6  # 6 x 120 KB of replies: more than the kernel's socket buffer plus max_output
        for seq in range(1, last + 1):
            words[S.W_REQ_LEN] = len(req)
            words[S.W_REQ_SEQ] = seq
            sock.sendall(P.DOORBELL_FRAME)
            deadline = time.monotonic() + 0.3
            while words[S.W_REP_SEQ] != seq and time.monotonic() < deadline:
                time.sleep(0.001)
            if words[S.W_REP_SEQ] != seq:
                break
        assert words[S.W_REP_SEQ] < last, "the daemon kept serving a client that reads none of its replies"
        # not serving a blocked client, the daemon goes to sleep (no busy loop) and says so
        wait_until(lambda: words[S.W_DAEMON_SLEEPING] == 1, what="the daemon asleep beside a blocked slot")
        # Reading the socket unblocks it.
        sock.settimeout(5)
        got = 0
        while words[S.W_REP_SEQ] != seq:
            got += len(sock.recv(1 << 20))
        assert got > 0
        words.release()
        mm.close()
        sock.close()
    finally:
        d.stop()


def _slot_fd(size: int = S.SLOT_BYTES, header: tuple[int, ...] | None = None) -> int:
    fd = os.memfd_create("slot-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if header is not None:
        os.pwrite(fd, array.array("Q", header).tobytes(), 0)
    return fd


def test_client_slot_checks_what_the_daemon_sent():
    fd = _slot_fd(header=S.slot_header())
    try:
        slot = S.ClientSlot(fd, S.SLOT_BYTES, 0.0)
    finally:
        os.close(fd)
    try:
        seq = slot.publish(P.frame(P.MsgType.PING))
        assert seq == 1 and slot.words[S.W_REQ_SEQ] == 1 and slot.words[S.W_REQ_LEN] == P.HEADER_SIZE
        assert not slot.answered(seq) and not slot.daemon_sleeping()
        slot.words[S.W_REP_LEN] = 3
        slot.mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + 3] = b"abc"
        slot.words[S.W_REP_SEQ] = seq
        assert slot.answered(seq)
        slot.wait(seq, lambda _seq: pytest.fail("slept on a published reply"))
        assert slot.reply() == b"abc"
        slot.words[S.W_REP_LEN] = S.REP_ON_SOCKET
        assert slot.reply() is None
        slot.words[S.W_REP_LEN] = S.SLOT_REP_CAP + 1
        with pytest.raises(ProtocolError, match="more than"):
            slot.reply()
    finally:
        slot.close()
    for size, header, message in [(S.SLOT_BYTES, S.slot_header()[:5] + (0,), "unknown layout"),
                                  (S.SLOT_BYTES + 4096, S.slot_header(), "expected"),
                                  (S.SLOT_BYTES, None, "unknown layout")]:
        fd = _slot_fd(size, header)
        try:
            with pytest.raises(ProtocolError, match=message):
                S.ClientSlot(fd, S.SLOT_BYTES, 0.0)
        finally:
            os.close(fd)
