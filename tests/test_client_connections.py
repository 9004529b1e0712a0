"""The client's connections to the daemon and how it waits for replies.

One connection per client process: a Client holds its MONITOR connection
only while it has no context; a context's connection carries the Client's
PING and STATS.  Also: a connect that finds the listen backlog full waits
for room (bounded by ``connect_timeout``), and the shm slot's wait polls only
when polling pays (see :class:`poolsvc.service.slot.ClientSlot`).
"""
from __future__ import annotations

import array
import mmap
import os
import socket
import threading
import time

import pytest

from poolsvc.errors import Closed
from poolsvc.service import protocol as P
from poolsvc.service import slot as S
from poolsvc.service.client import DaemonTimeout, UsedAfterFork, connect
from svcutil import DaemonThread

TRANSPORTS = ["socket", "shm"]


@pytest.fixture
def daemon(tmp_path):
    d = DaemonThread(tmp_path / "d.sock")
    yield d
    d.stop()


def _roles(stats, name):
    """Roles of the connections called ``name``, in connection order."""
    return [c["role"] for c in stats["clients"] if c["name"] == name]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_with_one_context_holds_one_connection(daemon, transport):
    with connect(daemon.path, name="one", transport=transport) as client:
        assert _roles(daemon.stats(), "one") == ["MONITOR"]
        ctx = client.open_context()
        assert _roles(daemon.wait_for(lambda s: len(_roles(s, "one")) == 1), "one") == ["CONTEXT"]
        assert client.ping(b"via the context") == b"via the context"
        shm = ctx.alloc_user_buf(4096)
        shm.close()  # pipelined: STATS flushes it first
        stats = client.service_stats()
        assert _roles(stats, "one") == ["CONTEXT"]
        assert [c["shms"] for c in stats["clients"] if c["name"] == "one"] == [0]
        second = client.open_context()
        assert _roles(daemon.stats(), "one") == ["CONTEXT", "CONTEXT"]
        ctx.close()
        assert client.ping(b"second") == b"second"  # the remaining context carries it
        assert _roles(daemon.wait_for(lambda s: len(_roles(s, "one")) == 1), "one") == ["CONTEXT"]
        second.close()
        assert client.ping(b"again") == b"again"  # no context left: a MONITOR connection again
        assert _roles(daemon.wait_for(lambda s: _roles(s, "one") == ["MONITOR"]), "one") == ["MONITOR"]
        assert client.stats()["service"]["clients"]
    daemon.wait_for(lambda s: not _roles(s, "one"))
    with pytest.raises(Closed, match="client is closed"):
        client.ping()


def test_a_lost_context_hands_ping_to_a_new_monitor(daemon):
    client = connect(daemon.path, name="lost", transport="socket")
    ctx = client.open_context()
    with pytest.raises(Closed, match="test cut the connection"):
        ctx._channel._lost("test cut the connection")  # what a daemon timeout does
    assert ctx.closed and not client.contexts
    assert client.ping(b"still here") == b"still here"
    assert _roles(daemon.wait_for(lambda s: _roles(s, "lost") == ["MONITOR"]), "lost") == ["MONITOR"]
    client.close()


def test_forked_child_cannot_reopen_the_monitor(daemon):
    client = connect(daemon.path, name="forked", transport="socket")
    client.open_context().close()  # no connection left open: the next ping would open one
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            client.ping()
        except UsedAfterFork:
            try:
                client.open_context()
            except UsedAfterFork:
                code = 0
        except BaseException:
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.ping(b"parent") == b"parent"
    client.close()


def test_connect_waits_for_room_in_a_full_backlog(tmp_path):
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    try:
        while True:  # fill the backlog: the next connect would block
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:
                sock.close()
                break
            queued.append(sock)
        with pytest.raises(DaemonTimeout, match="no answer within 0.2 s"):
            connect(path, connect_timeout=0.2)
    finally:
        for sock in queued:
            sock.close()
        listener.close()


# -- the slot's wait --------------------------------------------------------------------------


@pytest.fixture
def slot():
    fd = os.memfd_create("slot-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, S.SLOT_BYTES)
    os.pwrite(fd, array.array("Q", S.slot_header()).tobytes(), 0)
    try:
        s = S.ClientSlot(fd, S.SLOT_BYTES, 200e-6)
    finally:
        os.close(fd)
    yield s
    s.close()


def _answer(slot, seq):
    slot.words[S.W_REP_LEN] = 0
    slot.words[S.W_REP_SEQ] = seq


def test_slot_sleeps_at_once_when_the_daemon_sleeps(slot):
    seq = slot.publish(P.frame(P.MsgType.PING))
    slept = []

    def sleep(s):
        assert not slot.answered(s)
        slept.append(s)
        _answer(slot, s)

    slot.wait(seq, sleep, daemon_asleep=True)
    assert slept == [seq] and slot.slept == 1


def test_slot_polls_while_waits_are_short(slot):
    assert slot.spins(False) == S.MIN_SPIN  # no history: the shortest window
    slot.expect = 50e-6
    assert slot.spins(False) == 100e-6
    assert slot.spins(True) == 0.0
    slot.expect = 150e-6
    assert slot.spins(False) == slot.max_spin  # capped
    seq = slot.publish(P.frame(P.MsgType.PING))
    _answer(slot, seq)
    slot.wait(seq, lambda _s: pytest.fail("slept on a published reply"))
    assert slot.expect < 150e-6  # an immediate answer shortens the expected wait


def test_slot_sleeps_at_once_while_waits_are_long_and_probes_now_and_then(slot):
    slot.expect = 10 * slot.max_spin
    windows = []
    for _ in range(2 * S.PROBE_EVERY):
        slot.waits += 1
        windows.append(slot.spins(False))
    assert windows.count(0.0) == 2 * S.PROBE_EVERY - 2
    assert windows[S.PROBE_EVERY - 1] == windows[-1] == slot.max_spin
    seq = slot.publish(P.frame(P.MsgType.PING))
    slept = []
    slot.waits = 0  # the next wait is not a probe
    slot.wait(seq, lambda s: (slept.append(s), _answer(slot, s)))
    assert slept == [seq]


def test_slot_that_never_spins(slot):
    slot.max_spin = 0.0
    assert slot.spins(False) == 0.0
    slot.waits = S.PROBE_EVERY - 1
    seq = slot.publish(P.frame(P.MsgType.PING))
    slept = []
    slot.wait(seq, lambda s: (slept.append(s), _answer(slot, s)))  # a probe turn: still no polling
    assert slept == [seq]


def test_slot_sleeps_at_once_after_three_windows_polled_in_vain(slot):
    slot.max_spin = 1e-6  # every window runs out before anyone answers
    windows = []
    for _ in range(4):
        slot.waits = 1  # never a probe turn (one in probe_gap, from 0)
        windows.append(slot.spins(False))
        seq = slot.publish(P.frame(P.MsgType.PING))
        slept: list[int] = []
        slot.wait(seq, lambda s, slept=slept: (slept.append(s), _answer(slot, s)))
        assert slept == [seq]
    # each vain window counts as twice the longest one: the third makes the expected wait exceed it
    assert windows == [slot.max_spin] * 3 + [0.0]
    assert slot.slept == 4 and slot.expect > slot.max_spin


def test_slot_probe_that_catches_its_reply_resets_the_expected_wait(slot):
    slot.expect = 100.0  # waits were long: only probes poll
    slot.max_spin = 5.0
    slot.waits = S.PROBE_EVERY - 1  # the next wait is a probe turn
    seq = slot.publish(P.frame(P.MsgType.PING))
    answerer = threading.Thread(target=_answer_when_polled, args=(slot, seq))
    answerer.start()
    slot.wait(seq, lambda _s: pytest.fail("a probe slept on a reply that came within its window"))
    answerer.join()
    assert slot.expect < slot.max_spin and slot.spins(False) > 0.0


def _answer_when_polled(slot, seq):
    """Publish the reply to ``seq`` once the client polls for it (its wait count moved)."""
    words = S.words_of(slot.mm)
    try:
        while slot.waits != S.PROBE_EVERY:
            os.sched_yield()
        words[S.W_REP_LEN] = 0
        words[S.W_REP_SEQ] = seq
    finally:
        words.release()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
@pytest.mark.parametrize("others", [0, 3], ids=["alone", "with-3-busy-processes"])
def test_slot_window_charges_polling_not_the_time_others_run(slot, others):
    """A client polls on a CPU shared with ``others`` busy processes; the reply comes
    once they have run 40 ms of CPU time (or, alone, once the client sleeps).  Each
    check that gave the CPU away is charged at most YIELD_CHARGE, so a 10 ms window
    outlasts 40 ms of their work; alone, the window is the polling's whole time."""
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    slot.max_spin, slot.expect = 10e-3, 10e-3
    seq = slot.publish(P.frame(P.MsgType.PING))
    burned = mmap.mmap(-1, 8 * (others + 1))  # per process: ms of CPU time run; then the stop word
    pids = []
    os.sched_setaffinity(0, {cpu})
    try:
        for k in range(others):
            pid = os.fork()
            if pid == 0:  # a busy process: counts its CPU milliseconds; the first answers at 40 in all
                try:
                    counts = memoryview(burned).cast("Q")
                    words = S.words_of(slot.mm)
                    start = time.thread_time()
                    while not counts[others]:
                        counts[k] = int((time.thread_time() - start) * 1e3)
                        if k == 0 and sum(counts[:others]) >= 40 and words[S.W_REP_SEQ] != seq:
                            words[S.W_REP_LEN] = 0
                            words[S.W_REP_SEQ] = seq
                finally:
                    os._exit(0)
            pids.append(pid)
        slept = []
        slot.wait(seq, lambda s: (slept.append(s), _answer(slot, s)))
        assert slept == ([] if others else [seq])
    finally:
        os.sched_setaffinity(0, saved)
        memoryview(burned).cast("Q")[others] = 1
        for pid in pids:
            os.waitpid(pid, 0)
        burned.close()


def _hang_up_server(path, drops, then=None):
    """A listener on ``path`` that hangs up on its first ``drops`` connections
    (after reading their HELLO) and hands later ones to ``then(sock)``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    seen = []

    def serve():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            seen.append(sock)
            if len(seen) <= drops or then is None:
                sock.recv(4096)
                sock.close()
            else:
                then(sock)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, seen


def test_connect_says_hello_again_when_the_daemon_hangs_up_unanswered(daemon, tmp_path):
    def forward(sock):  # splice the connection to the real daemon (descriptors included)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(daemon.path)

        def pump(src, dst):
            try:
                while True:
                    data, fds, _flags, _addr = socket.recv_fds(src, 1 << 16, 8)
                    if not data:
                        break
                    socket.send_fds(dst, [data], fds) if fds else dst.sendall(data)
                    for fd in fds:
                        os.close(fd)
            except OSError:
                pass
            finally:
                dst.close()

        threading.Thread(target=pump, args=(sock, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, sock), daemon=True).start()

    path = str(tmp_path / "flaky.sock")
    listener, seen = _hang_up_server(path, drops=2, then=forward)
    try:
        with connect(path, name="retried", transport="socket") as client:
            assert len(seen) == 3  # two hang-ups, then the daemon answered
            assert client.ping(b"through") == b"through"
    finally:
        listener.close()


def test_connect_gives_up_on_a_daemon_that_always_hangs_up(tmp_path):
    path = str(tmp_path / "rude.sock")
    listener, seen = _hang_up_server(path, drops=1 << 30)
    try:
        with pytest.raises(Closed, match=r"hung up before answering HELLO \d+ times within 0.3 s"):
            connect(path, connect_timeout=0.3)
        assert len(seen) > 1
    finally:
        listener.close()
