"""The client wire (ext/clientwire.pyx) against its plain-Python twin
(poolsvc/_pure/clientwire.py) as the oracle.

Each hypothesis example is a sequence of operations (single calls, posts then a
call, drains, calls with descriptors) run twice, once through a compiled
``ClientWire`` and once through the twin, each against its own scripted peer:
a thread holding the other end of a socketpair and, with the shm transport,
the daemon's view of a slot (a memfd laid out as ``slot.py`` says).  The peer
answers each request frame as the frame's body asks (:data:`ACTIONS`): a
reply of a given size (in the slot, or on the socket when the exchange's
replies do not fit the slot's reply area), split across receives, behind
DOORBELL frames, with descriptors, with a malformed header, a slot reply
length past the reply area, a reply exactly filling it, a hang-up, or
silence (the client's wait limit is made tiny first).  Both runs must give
the same results and errors (type and text), receive the same files, leave
the same slot words and hand the peer the same request frames.

The peer waits on conditions (its socket, the eventfd, the slot's words,
the kernel's count of unread bytes) with deadlines, never fixed sleeps.
The compiled wire only exists with the compiled backend.
"""
from __future__ import annotations

import array
import fcntl
import mmap
import os
import select
import socket
import struct
import termios
import threading
import time
from collections import deque
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from poolsvc import _pure
from poolsvc._backend import BACKEND
from poolsvc.errors import Closed
from poolsvc.service import protocol as P
from poolsvc.service import slot as S

from profiles import examples

pytestmark = pytest.mark.skipif(BACKEND != "compiled", reason="the compiled wire against its twin")

OK = int(P.MsgType.OK)
PING = int(P.MsgType.PING)
#: What a request asks of the peer (first byte of its body; a u32 size follows).
REPLY, WITH_FDS, BAD_HEADER, HANG_UP, SILENCE, DOORBELLS, BAD_SLOT_LEN, FILL_SLOT, BIG_HEADER = range(9)
#: Answers to a posted SHM_CLOSE (its cookie is the request: action | size << 8): an OK
#: CLOSED whose dropped segment is ``size``, or a CLOSED-sized reply of another type.
CLOSED_OK, CLOSED_OTHER_TYPE = 9, 10
ACTIONS = {REPLY: "reply", WITH_FDS: "reply with descriptors", BAD_HEADER: "malformed header",
           HANG_UP: "hang up", SILENCE: "no answer", DOORBELLS: "DOORBELLs first",
           BAD_SLOT_LEN: "slot reply length past the area", FILL_SLOT: "reply filling the slot",
           BIG_HEADER: "a header of MAX_REPLY_FRAME bytes, then hang up",
           CLOSED_OK: "an OK CLOSED", CLOSED_OTHER_TYPE: "a CLOSED of another type"}
RARE = (BAD_HEADER, HANG_UP, SILENCE, BAD_SLOT_LEN, BIG_HEADER)
REQUEST = struct.Struct("<BI")
WAIT = 10.0
TINY_WAIT = 0.3


class TimedOut(Closed):
    """The ``timeout_error`` handed to the wires."""


def _outq(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the peer waited {WAIT} s for {what}")
        select.select([], [], [], 0.0005)


class Peer(threading.Thread):
    """The daemon's end: answers request frames as their bodies ask (see the module doc)."""

    def __init__(self, sock: socket.socket, mm: Any, bell: int, probe_fd: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.mm = mm
        self.words = S.words_of(mm) if mm is not None else None
        self.bell = bell
        self.probe_fd = probe_fd
        self.seen: list[tuple[str, int, bytes]] = []   # (transport, type, body) of each request frame
        self.fds_received = 0
        self.count = 0
        self.stop = False
        self.gone = False
        self.error: BaseException | None = None
        self.buf = bytearray()

    # -- replies ---------------------------------------------------------------------------
    def _replies(self, frames: list[tuple[int, bytes]], transport: str) -> tuple[bytes, int, set[int]]:
        """The reply bytes for ``frames``, descriptors to send, and the actions met."""
        out = bytearray()
        nfds = 0
        actions: set[int] = set()
        for msg_type, body in frames:
            self.seen.append((transport, msg_type, body))
            self.count += 1
            action, size = REQUEST.unpack_from(body) if len(body) >= REQUEST.size else (REPLY, 0)
            actions.add(action)
            if action == BAD_HEADER:
                out += P.HEADER.pack(4, OK, 1) + b"bad!"
                continue
            if action in (CLOSED_OK, CLOSED_OTHER_TYPE):
                out += P.HEADER.pack(P.CLOSED.size, OK if action == CLOSED_OK else PING, 0)
                out += P.CLOSED.pack(0, size)
                continue
            if action == BIG_HEADER:
                out += P.HEADER.pack(P.MAX_REPLY_FRAME, OK, 0)
                continue
            if action == FILL_SLOT:
                size = S.SLOT_REP_CAP - P.HEADER_SIZE
            if action == WITH_FDS:
                nfds += 1 + size % 2
            reply = bytes([self.count & 0xFF]) * size
            out += P.HEADER.pack(len(reply), OK, 0) + reply
        return bytes(out), nfds, actions

    def _send_chunks(self, data: bytes, nfds: int, wait_read: bool) -> None:
        """``data`` in up to three chunks (descriptors on the first); with ``wait_read``
        each after the client has read the one before (split receives)."""
        cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
        for i in range(3):
            part = data[cut[i]:cut[i + 1]]
            if not part:
                continue
            if nfds and i == 0:
                socket.send_fds(self.sock, [part], [self.probe_fd] * nfds)
                nfds = 0
            else:
                self.sock.sendall(part)
            if wait_read and i < 2:
                _until(lambda: _outq(self.sock) == 0 or self.gone, "the client to read a chunk")

    def _hang_up(self) -> None:
        self.gone = True
        self.sock.shutdown(socket.SHUT_RDWR)

    # -- the two transports ----------------------------------------------------------------
    def _serve_slot(self, seq: int) -> None:
        words = self.words
        assert words is not None
        length = words[S.W_REQ_LEN]
        data = bytes(self.mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + length])
        frames = [(t, data[a:b]) for t, a, b in _pure.split_frames(data, 1 << 20, 1 << 30)]
        reply, nfds, actions = self._replies(frames, "slot")
        if HANG_UP in actions or BIG_HEADER in actions:
            self._hang_up()
            return
        if SILENCE in actions:
            return
        if nfds:  # descriptors come on the socket, ahead of the slot reply
            socket.send_fds(self.sock, [P.DOORBELL_FRAME], [self.probe_fd] * nfds)
        if DOORBELLS in actions:
            self.sock.sendall(P.DOORBELL_FRAME * 3)
        if BAD_SLOT_LEN in actions:
            words[S.W_REP_LEN] = S.SLOT_REP_CAP + 1
        elif len(reply) <= S.SLOT_REP_CAP:
            self.mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + len(reply)] = reply
            words[S.W_REP_LEN] = len(reply)
        else:
            words[S.W_REP_LEN] = S.REP_ON_SOCKET
            self._send_chunks(reply, 0, False)
        words[S.W_REP_SEQ] = seq
        S.fence()
        if words[S.W_CLIENT_SLEEPING]:
            self.sock.sendall(P.DOORBELL_FRAME)

    def _serve_socket(self) -> bool:
        try:
            data, fds, _flags, _ = socket.recv_fds(self.sock, 1 << 20, 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        for fd in fds:
            os.close(fd)
        self.fds_received += len(fds)
        if not data:
            return False
        self.buf += data
        while len(self.buf) >= P.HEADER_SIZE:
            length, msg_type, _ = P.HEADER.unpack_from(self.buf)
            if len(self.buf) < P.HEADER_SIZE + length:
                break
            body = bytes(self.buf[P.HEADER_SIZE:P.HEADER_SIZE + length])
            del self.buf[:P.HEADER_SIZE + length]
            if msg_type == int(P.MsgType.DOORBELL):
                continue
            reply, nfds, actions = self._replies([(msg_type, body)], "socket")
            if HANG_UP in actions or BIG_HEADER in actions:
                if BIG_HEADER in actions:
                    self.sock.sendall(reply)
                self._hang_up()
                return False
            if SILENCE in actions:
                continue
            self._send_chunks(reply, nfds, True)
        return True

    def run(self) -> None:
        served = 0
        try:
            while not self.stop and not self.gone:
                if self.words is not None and self.words[S.W_REQ_SEQ] != served:
                    served = self.words[S.W_REQ_SEQ]
                    self._serve_slot(served)
                    continue
                watch = [self.sock] + ([self.bell] if self.bell >= 0 else [])
                ready, _, _ = select.select(watch, [], [], 0.001)
                if self.bell in ready:
                    os.eventfd_read(self.bell)
                if self.sock in ready and not self._serve_socket():
                    return
        except BaseException as exc:  # reported by the test
            self.error = exc


class Setup:
    """One wire of ``backend`` on a socketpair, with a slot when ``shm``, and its peer."""

    def __init__(self, backend: Any, shm: bool, eventfd: bool, spin_us: float, probe_fd: int) -> None:
        self.client, peer_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.set_wait(WAIT)
        self.fds: deque[int] = deque()
        self.lost_calls: list[str] = []
        self.wire = backend.ClientWire(self._lost, TimedOut, self.fds, 0.0)
        self.wire.attach(self.client.fileno())
        self.wire.wait_limit = WAIT
        self.slot = None
        self.bell = -1
        mm = None
        if shm:
            fd = os.memfd_create("clientwire-test", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, S.SLOT_BYTES)
                os.pwrite(fd, array.array("Q", S.slot_header()).tobytes(), 0)
                self.slot = backend.ClientSlot(fd, S.SLOT_BYTES, spin_us / 1e6)
                mm = mmap.mmap(fd, S.SLOT_BYTES)
            finally:
                os.close(fd)
            if eventfd:
                self.bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.wire.set_slot(self.slot, self.bell)
        self.peer = Peer(peer_sock, mm, self.bell, probe_fd)
        self.peer.start()

    def set_wait(self, seconds: float) -> None:
        whole = int(seconds)
        value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    def _lost(self, why: str, kind: type) -> None:
        self.lost_calls.append(why)
        self.wire.close()
        raise kind(f"lost: {why}")

    def words(self) -> tuple[int, ...]:
        if self.slot is None or self.peer.words is None:
            return ()
        w = self.peer.words
        return (w[S.W_REQ_SEQ], w[S.W_REQ_LEN], w[S.W_CLIENT_SLEEPING], self.slot.seq)

    def close(self) -> None:
        self.peer.stop = True
        self.peer.join(WAIT)
        self.wire.close()
        if self.slot is not None:
            self.slot.close()
        if self.peer.words is not None:
            self.peer.words.release()
            self.peer.mm.close()
        if self.bell >= 0:
            os.close(self.bell)
        self.client.close()
        self.peer.sock.close()
        for fd in self.fds:
            os.close(fd)


def _body(action: int, size: int, pad: int) -> bytes:
    return REQUEST.pack(action, size) + b"p" * pad


def _sync(setup: Setup) -> tuple[Any, ...]:
    """A request on the socket: once its reply is read, so is everything the peer
    sent before (descriptors of slot replies among it)."""
    frame = P.HEADER.pack(REQUEST.size, PING, 0) + _body(REPLY, 0, 0)
    reply_type, body = setup.wire.call_frame(frame, (), False)
    return ("sync", reply_type, bytes(body))


def run(backend: Any, shm: bool, eventfd: bool, spin_us: float, ops: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Run ``ops`` through a wire of ``backend``; everything the oracle compares.

    Before a request whose answer breaks the connection, and at the end, a
    socket request (:func:`_sync`) makes the descriptors received so far exact."""
    probe_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    probe_ino = os.fstat(probe_fd).st_ino
    setup = Setup(backend, shm, eventfd, spin_us, probe_fd)
    results: list[Any] = []
    callbacks: list[Any] = []
    cookies: deque[int] = deque()

    def on_close(t: int, b: memoryview) -> None:  # (one callback, as a Context has)
        callbacks.append(("close", t, bytes(b), cookies.popleft()))

    try:
        for op in ops:
            kind = op[0]
            try:
                if kind == "post":
                    setup.wire.post(PING, _body(*op[1:]), lambda t, b: callbacks.append((t, bytes(b))))
                    results.append(("posted", len(setup.wire.pending)))
                    continue
                if kind == "close":
                    cookie = op[1] | op[2] << 8  # the peer reads it as the request (action, size)
                    count = setup.wire.post_close(cookie, on_close, cookies)
                    results.append(("close posted", count, len(setup.wire.pending), list(cookies)))
                    continue
                if kind == "drain":
                    setup.wire.drain()
                    results.append(("drained",))
                    continue
                action = op[1]
                if action in RARE and not setup.wire.closed:
                    results.append(_sync(setup))
                if action == SILENCE:
                    setup.set_wait(TINY_WAIT)
                    setup.wire.wait_limit = TINY_WAIT
                fds = [probe_fd] if kind == "call_fds" else []
                frame = P.HEADER.pack(REQUEST.size + op[3], PING, 0) + _body(*op[1:])
                reply_type, body = setup.wire.call_frame(frame, fds, kind != "call_fds")
                results.append(("reply", reply_type, bytes(body)))
                if action == WITH_FDS and setup.slot is not None:
                    while not setup.fds:  # as map_segment waits: they come on the socket
                        setup.wire.fill()
            except Closed as exc:
                results.append(("error", type(exc).__name__, str(exc)))
        if not setup.wire.closed:
            results.append(_sync(setup))
        received = [os.fstat(fd).st_ino == probe_ino for fd in setup.fds]
        words = setup.words()
    finally:
        setup.close()
        os.close(probe_fd)
    assert setup.peer.error is None, setup.peer.error
    return {"results": results, "callbacks": callbacks, "cookies": list(cookies), "received": received, "words": words,
            "seen": setup.peer.seen, "peer_fds": setup.peer.fds_received, "lost": setup.lost_calls}


small = st.integers(0, 300)
sizes = st.one_of(small, st.integers(300, 3000), st.sampled_from([S.SLOT_REP_CAP - 8, S.SLOT_REP_CAP,
                                                                   S.SLOT_REP_CAP + 100]))
pads = st.one_of(st.integers(0, 64), st.sampled_from([S.SLOT_REQ_CAP - 16, S.SLOT_REQ_CAP + 50]))
common = st.sampled_from([REPLY, REPLY, REPLY, WITH_FDS, DOORBELLS, FILL_SLOT])
rare = st.sampled_from(RARE)
call = st.tuples(st.sampled_from(["call", "call", "call_fds"]), common, sizes, pads)
last = st.tuples(st.just("call"), rare, small, st.integers(0, 64))
post = st.tuples(st.just("post"), st.sampled_from([REPLY, REPLY, WITH_FDS]), small, st.integers(0, 64))
close = st.tuples(st.just("close"), st.sampled_from([CLOSED_OK, CLOSED_OK, CLOSED_OTHER_TYPE, REPLY]),
                  st.sampled_from([0, 0, 1, 7, 8]))
queued = st.lists(st.one_of(post, close), min_size=1, max_size=5)
step = st.one_of(call, queued.map(lambda ps: ps + [("drain",)]),
                 queued.flatmap(lambda ps: call.map(lambda c: ps + [c])))


@st.composite
def sequences(draw: Any) -> list[tuple[Any, ...]]:
    ops: list[tuple[Any, ...]] = []
    for item in draw(st.lists(step, min_size=1, max_size=6)):
        ops.extend(item if isinstance(item, list) else [item])
    if draw(st.booleans()):
        ops.append(draw(last))
        ops.append(("call", REPLY, 1, 0))  # after a loss: the closed wire's own error
    return ops


def _every_rare_action(test: Any) -> Any:
    """Explicit examples: each action that breaks the connection, on both transports,
    after a slot-filling reply and a post whose reply brings descriptors."""
    for action in RARE:
        for shm in (False, True):
            ops = [("call", FILL_SLOT, 0, 0), ("post", WITH_FDS, 1, 0), ("call", action, 3, 0), ("call", REPLY, 1, 0)]
            test = example(ops=ops, shm=shm, eventfd=shm, spin_us=50.0)(test)
    return test


@_every_rare_action
@settings(max_examples=examples(0.6))
@given(ops=sequences(), shm=st.booleans(), eventfd=st.booleans(), spin_us=st.sampled_from([0.0, 50.0, 200.0]))
def test_compiled_wire_matches_twin(ops: list[tuple[Any, ...]], shm: bool, eventfd: bool, spin_us: float) -> None:
    from poolsvc import _core

    compiled = run(_core, shm, eventfd, spin_us, ops)
    twin = run(_pure, shm, eventfd, spin_us, ops)
    assert compiled == twin


@pytest.mark.parametrize("backend_name", ["compiled", "twin"])
def test_every_action_is_met(backend_name: str) -> None:
    """One fixed sequence meets each peer action once on the slot, so the oracle's
    cases are known to be reachable (and each gives the outcome it should)."""
    from poolsvc import _core

    backend = _core if backend_name == "compiled" else _pure
    for action, outcome in [(BAD_HEADER, "malformed reply into the slot at byte 0"),
                            (BAD_SLOT_LEN, f"more than {S.SLOT_REP_CAP}"),
                            (HANG_UP, "the daemon closed the connection"),
                            (BIG_HEADER, "the daemon closed the connection"),
                            (SILENCE, f"no answer from the daemon within {TINY_WAIT} s")]:
        got = run(backend, True, True, 50.0, [("call", FILL_SLOT, 0, 0), ("call", action, 3, 0)])
        assert got["results"][0] == ("reply", OK, bytes([1]) * (S.SLOT_REP_CAP - 8))
        assert got["results"][1][0] == "sync"
        assert got["results"][2][0] == "error" and outcome in got["results"][2][2], (ACTIONS[action], got)
        assert got["results"][2][1] == ("TimedOut" if action == SILENCE else "Closed")
    got = run(backend, False, False, 0.0, [("call", BAD_HEADER, 0, 0)])
    assert got["results"][1:] == [("error", "Closed", "lost: daemon sent a malformed header (length 4, flags 0x1)")]
    for shm in (True, False):  # posted closes: an OK CLOSED dropping nothing is the wire's alone
        closes = [("close", CLOSED_OK, 0), ("close", CLOSED_OK, 3), ("close", CLOSED_OTHER_TYPE, 0),
                  ("close", REPLY, 5), ("close", CLOSED_OK, 0)]
        got = run(backend, shm, shm, 0.0, closes + [("call", REPLY, 1, 0)])
        assert got["callbacks"] == [("close", OK, P.CLOSED.pack(0, 3), CLOSED_OK | 3 << 8),
                                    ("close", PING, P.CLOSED.pack(0, 0), CLOSED_OTHER_TYPE),
                                    ("close", OK, bytes([4]) * 5, REPLY | 5 << 8)]
        assert got["cookies"] == [] and got["results"][4] == ("close posted", 5, 5, [
            CLOSED_OK, CLOSED_OK | 3 << 8, CLOSED_OTHER_TYPE, REPLY | 5 << 8, CLOSED_OK])
    got = run(backend, True, False, 0.0, [("post", WITH_FDS, 1, 0), ("call", DOORBELLS, 2, 0)])
    assert got["callbacks"] == [(OK, bytes([1]) * 1)] and got["results"][-2] == ("reply", OK, bytes([2]) * 2)
    assert got["received"] == [True, True]


# -- the probe policy of ClientSlot.wait ----------------------------------------------------------
#: Steps of a probe script: the next wait is a probe turn or not (``waits`` set so), the
#: reply is caught by polling (a thread answers once the request is published and the
#: polling window is long) or not (nobody answers until the client sleeps; the window is
#: a microsecond), and the daemon was awake or asleep at publishing; ``gap0`` makes
#: ``probe_gap`` 0 (never probe).
PROBE_STEPS = [(turn, outcome, awake) for turn in ("probe", "plain") for outcome in ("miss", "catch")
               for awake in (True, False)] + [("gap0", "miss", True)]


class Answerer(threading.Thread):
    """Publishes the reply to each request of the slot behind ``mm`` while ``armed``."""

    def __init__(self, mm: Any) -> None:
        super().__init__(daemon=True)
        self.words = S.words_of(mm)
        self.armed = False
        self.stop = False

    def run(self) -> None:
        words = self.words
        while not self.stop:
            if self.armed and words[S.W_REQ_SEQ] != words[S.W_REP_SEQ]:
                words[S.W_REP_LEN] = 0
                words[S.W_REP_SEQ] = words[S.W_REQ_SEQ]
            select.select([], [], [], 0.0002)


def run_probes(backend: Any, steps: list[tuple[str, str, bool]]) -> list[tuple[Any, ...]]:
    """Each step, whether its wait slept, the slot's counters and its expectation after it."""
    fd = os.memfd_create("clientwire-probe", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, S.SLOT_BYTES)
        os.pwrite(fd, array.array("Q", S.slot_header()).tobytes(), 0)
        slot = backend.ClientSlot(fd, S.SLOT_BYTES, 1e-6)
        mm = mmap.mmap(fd, S.SLOT_BYTES)
    finally:
        os.close(fd)
    answerer = Answerer(mm)
    answerer.start()
    out: list[tuple[Any, ...]] = []
    try:
        for turn, outcome, awake in steps:
            if turn == "gap0":
                slot.probe_gap = 0
            gap = max(slot.probe_gap, 1)
            slot.waits = (slot.waits // gap + 1) * gap - (turn != "plain")  # the next wait: a probe turn or not
            slot.max_spin = 5.0 if outcome == "catch" else 1e-6
            slot.expect = 100.0  # longer than any window: only probes poll
            slept: list[int] = []
            answerer.armed = outcome == "catch"

            def sleep(seq: int, slept: list[int] = slept, outcome: str = outcome) -> None:
                slept.append(seq)
                if outcome == "catch":
                    _until(lambda: slot.answered(seq), "the answerer")
                else:
                    _answer_now(mm, seq)

            seq = slot.publish(P.frame(P.MsgType.PING))
            slot.wait(seq, sleep, not awake)
            answerer.armed = False
            # the expectation after the wait: exact unless a probe caught its reply (then
            # its polling time, under the bound)
            caught = turn != "plain" and outcome == "catch" and awake and not slept
            expect = slot.expect < slot.max_spin if caught else slot.expect
            out.append((turn, outcome, awake, bool(slept), slot.probe_gap, slot.waits, slot.slept, expect))
    finally:
        answerer.stop = True
        answerer.join()
        answerer.words.release()
        slot.close()
        mm.close()
    return out


def _answer_now(mm: Any, seq: int) -> None:
    words = S.words_of(mm)
    words[S.W_REP_LEN] = 0
    words[S.W_REP_SEQ] = seq
    words.release()


@settings(max_examples=examples(0.3))
@given(steps=st.lists(st.sampled_from(PROBE_STEPS), max_size=12))
def test_compiled_probe_policy_matches_twin(steps: list[tuple[str, str, bool]]) -> None:
    from poolsvc import _core

    assert run_probes(_core, steps) == run_probes(_pure, steps)


@pytest.mark.parametrize("backend_name", ["compiled", "twin"])
def test_probes_back_off_while_they_miss_and_reset_when_one_catches(backend_name: str) -> None:
    from poolsvc import _core

    backend = _core if backend_name == "compiled" else _pure
    misses = 8
    steps = ([("probe", "miss", True)] * misses + [("plain", "miss", True), ("probe", "catch", False),
                                                   ("plain", "catch", True), ("probe", "catch", True),
                                                   ("gap0", "miss", True)])
    got = [(slept, gap) for *_, slept, gap, _waits, _slept, _expect in run_probes(backend, steps)]
    backed_off = [min(S.PROBE_EVERY << k, S.MAX_PROBE_GAP) for k in range(1, misses + 1)]
    assert backed_off[-1] == S.MAX_PROBE_GAP
    assert got[:misses] == [(True, gap) for gap in backed_off]
    assert got[misses:] == [(True, S.MAX_PROBE_GAP),   # not a probe turn: the gap stays
                            (True, S.MAX_PROBE_GAP),   # a probe turn while the daemon sleeps: no probe
                            (True, S.MAX_PROBE_GAP),
                            (False, S.PROBE_EVERY),    # a probe that caught its reply
                            (True, 0)]                 # probe_gap 0: never polls


# -- plain descriptors ------------------------------------------------------------------------------
descs = st.tuples(st.integers(0, 2**64 - 1), st.integers(-2**63, 2**63 - 1),
                  *[st.integers(0, 2**64 - 1)] * 5, *[st.integers(0, 2**32 - 1)] * 3,
                  st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0xFF))


@settings(max_examples=examples(1.0))
@given(desc=descs, cut=st.sampled_from([0, 0, 0, 1, -1, 8]))
def test_compiled_plain_desc_matches_twin(desc: tuple[int, ...], cut: int) -> None:
    """A DESC body (one byte short, one long, or with pages after it: not plain) decodes to
    its fields in both wires when no PAGES_FOLLOW or NEW_SEGMENT bit is set, else to None."""
    from poolsvc import _core

    body = P.DESC.pack(*desc)
    body = body[:cut] if cut < 0 else body + b"\1" * cut
    got = [backend.ClientWire(lambda why, kind: None, TimedOut, deque()).plain_desc(memoryview(body))
           for backend in (_core, _pure)]
    plain = not cut and not desc[12] & (P.DescBits.PAGES_FOLLOW | P.DescBits.NEW_SEGMENT)
    assert got[0] == got[1] == (P.DESC.unpack(body) if plain else None)
