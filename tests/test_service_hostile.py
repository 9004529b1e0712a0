"""The daemon among hostile clients: what a client may try, and that the daemon and the
other clients come out of it whole (docs/security.md).

Each test attacks the daemon as a client would, with the client library or
by hand over the socket (``RawClient``): resizing memory it was handed or
registered, floods of unknown frames, silent connections, descriptor
exhaustion, huge batches, reading the daemon's ``/proc`` files.  Daemons
that an attack could kill run as ``poolsvc serve`` subprocesses
(``DaemonProcess``), so that a regression fails the test instead of the run.
Everything waits on conditions (STATS, replies, process states), never on
fixed sleeps.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import mmap
import os
import random
import resource
import socket
import subprocess
import sys
import time

import posix_ipc
import pytest

from poolsvc.errors import TEE_ERROR_BUSY, NotSharedMemory, OutOfMemory, PoolsvcError, TeeError
from poolsvc.memory import ARENA_FIRST_PAGES
from poolsvc.service import protocol as P
from poolsvc.service import slot as S
from poolsvc.service.client import connect
from poolsvc.service.provider import is_sealed, seal, sealed_storage
from poolsvc.tee.driver import RegisteredMemref, Value
from poolsvc.tee.ta import FillApp, Sha256App, WaitApp

from svcutil import DaemonProcess, DaemonThread, RawClient, idle, read_frames, spawn_client, summary

MiB = 1 << 20


def _error(reply: tuple[int, bytes]) -> tuple[P.ErrorCode, str]:
    kind, body = reply
    assert kind == P.MsgType.ERROR, reply
    return P.ErrorCode(P.ERROR.unpack_from(body)[0]), body[P.ERROR.size:].decode()


def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


class Bystander:
    """A well-behaved client with a buffer holding a known pattern."""

    def __init__(self, path: str) -> None:
        self.client = connect(path, name="bystander")
        self.ctx = self.client.open_context("bystander")
        self.shm = self.ctx.alloc_user_buf(64 << 10)
        self.pattern = random.Random(1).randbytes(64 << 10)
        self.shm.view()[:64 << 10] = self.pattern

    def check(self) -> None:
        """Its data is intact and the daemon still serves it."""
        assert bytes(self.shm.view()[:64 << 10]) == self.pattern
        self.ctx.alloc_kernel_buf(4096).close()
        self.ctx.flush()


@pytest.fixture
def bystander_of():
    """``bystander_of(path)``: a :class:`Bystander` of that daemon (closed on teardown)."""
    made: list[Bystander] = []

    def make(path: str) -> Bystander:
        made.append(Bystander(path))
        return made[-1]

    yield make
    for bystander in made:
        with contextlib.suppress(PoolsvcError, OSError):
            bystander.client.close()


# -- daemon-owned memory cannot be resized ----------------------------------------------------------------
def _assert_cannot_resize(fd: int) -> None:
    """The object behind ``fd`` (a descriptor a client holds) can neither shrink nor grow."""
    size = os.fstat(fd).st_size
    assert is_sealed(fd)
    for new_size in (0, 4096, 2 * size):
        with pytest.raises(PermissionError):
            os.ftruncate(fd, new_size)
    assert os.fstat(fd).st_size == size


def test_sealed_storage_and_seal():
    storage = sealed_storage(8192, "psvctest")
    try:
        _assert_cannot_resize(storage.fd)
        storage.mm[8191] = 7  # still mapped whole
    finally:
        storage.close()
    fd = os.memfd_create("psvctest", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 4096)
        assert not is_sealed(fd) and seal(fd) and is_sealed(fd)
    finally:
        os.close(fd)
    obj = posix_ipc.SharedMemory(f"/psvctest-{os.getpid()}-seal", flags=posix_ipc.O_CREX, size=4096)
    try:
        obj.unlink()
        assert not seal(obj.fd)  # a POSIX shm object cannot be sealed
    finally:
        obj.close_fd()


@pytest.mark.parametrize("handed_out", ["slot", "arena segment"])
def test_memory_the_daemon_hands_out_cannot_be_resized_by_its_client(tmp_path, bystander_of, handed_out):
    d = DaemonProcess(tmp_path / "h.sock")
    try:
        bystander = bystander_of(d.path)
        if handed_out == "slot":
            raw = RawClient(d.path, features=P.Feature.SHM_SLOT)
            assert raw.welcome[0] == P.MsgType.WELCOME
            [fd] = raw.fds
            assert os.fstat(fd).st_size == S.SLOT_BYTES
        else:
            raw = RawClient(d.path)
            kind, body = raw.call(P.MsgType.ALLOC, P.ALLOC.pack(P.AllocKind.USER, 4096))
            assert kind == P.MsgType.OK and P.DESC.unpack_from(body)[-1] & P.DescBits.NEW_SEGMENT
            fd = raw.fds[-1]
            assert is_sealed(fd)
        _assert_cannot_resize(fd)
        # The daemon polls the slot, and zeroes the segment's pages at hang-up: it lives.
        assert raw.call(P.MsgType.PING, b"alive") == (P.MsgType.OK, b"alive")
        raw.close()
        assert d.alive()
        bystander.check()
    finally:
        d.stop()


# -- client-owned memory is never mapped by the daemon ------------------------------------------------------
REGISTER_CLIENT = """
import os, sys, mmap, posix_ipc
from poolsvc.service.client import connect
obj = posix_ipc.SharedMemory(sys.argv[2])
area = mmap.mmap(obj.fd, 1 << 16)
client = connect(sys.argv[1], name="victim")
ctx = client.open_context()
reg = ctx.register_user_buf(memoryview(area)[8192:8192 + 16384], fd=obj.fd)
ctx.flush()
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("shrink_to", [0, 4096])
@pytest.mark.parametrize("stage", ["app-reads", "close", "hang-up", "shutdown"])
def test_registered_object_shrunk_by_its_client(tmp_path, bystander_of, stage, shrink_to):
    d = DaemonProcess(tmp_path / "h.sock")
    name = f"/psvctest-{os.getpid()}-shrink"
    obj = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=1 << 16)
    try:
        area = mmap.mmap(obj.fd, 1 << 16)
        data = random.Random(2).randbytes(1 << 16)
        area[:] = data
        area.close()
        bystander = bystander_of(d.path)
        baseline = summary(d.wait_for(lambda s: s["clients"] and all(
            c["name"] != "victim" for c in s["clients"])))
        if stage == "hang-up":
            proc = spawn_client(REGISTER_CLIENT, d.path, name)
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            os.ftruncate(obj.fd, shrink_to)
            proc.kill()
            proc.communicate(timeout=30)
        else:
            client = connect(d.path, name="victim")
            ctx = client.open_context()
            area = mmap.mmap(obj.fd, 1 << 16)
            reg = ctx.register_user_buf(memoryview(area)[8192:8192 + 16384], fd=obj.fd)
            digest = ctx.alloc_kernel_buf(32)
            session = ctx.open_session(Sha256App.UUID)
            params = [RegisteredMemref(reg, 0, 16384, "in"), RegisteredMemref(digest, 0, 32, "out")]
            session.invoke(Sha256App.DIGEST, params)
            assert bytes(digest.view()[:32]) == hashlib.sha256(data[8192:8192 + 16384]).digest()
            os.ftruncate(obj.fd, shrink_to)  # the client's own view of it is now poison: not touched
            if stage == "app-reads":
                with pytest.raises(NotSharedMemory, match="shrunk"):
                    session.invoke(Sha256App.DIGEST, params)
                source = ctx.alloc_kernel_buf(64)  # the session and the context still serve
                source.view()[:64] = b"x" * 64
                session.invoke(Sha256App.DIGEST, [RegisteredMemref(source, 0, 64, "in"),
                                                  RegisteredMemref(digest, 0, 32, "out")])
                assert bytes(digest.view()[:32]) == hashlib.sha256(b"x" * 64).digest()
                source.close()
            if stage in ("app-reads", "close"):
                session.close()
                reg.close()
                digest.close()
                client.close()
            if stage == "shutdown":
                assert d.alive()
                bystander.check()
                err = d.stop()  # with the registration live: exits 0 (stop() asserts it)
                assert "Traceback" not in err
                with contextlib.suppress(PoolsvcError, OSError):
                    client.close()
                return
        d.wait_for(idle(baseline))
        assert d.alive()
        bystander.check()
    finally:
        obj.close_fd()
        posix_ipc.unlink_shared_memory(name)
        if d.alive():
            d.stop()


def test_memory_the_client_sealed_is_registered_zero_copy(tmp_path):
    """A memfd sealed against shrinking cannot fault the daemon: it is registered as it
    is (no shadow), and a trusted app's writes land in the client's pages at once."""
    d = DaemonThread(tmp_path / "z.sock")
    memfd = os.memfd_create("psvctest-sealed", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, 3 * 4096)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        area = mmap.mmap(memfd, 3 * 4096)
        raw = RawClient(d.path)
        kind, body = raw.call(P.MsgType.REGISTER, P.REGISTER.pack(P.RegisterKind.USER, 100, 8000), [memfd])
        assert kind == P.MsgType.OK, _error((kind, body))
        cookie = P.DESC.unpack_from(body)[0]
        assert d.stats()["resources"]["registered_mappings"] == 0  # no shadow
        kind, body = raw.call(P.MsgType.OPEN_SESSION, FillApp.UUID.bytes + P.COOKIE.pack(0) + P.COOKIE.pack(0))
        assert kind == P.MsgType.OK
        session = P.COOKIE.unpack_from(body)[0]
        params = (P.PARAM.pack(P.ParamKind.MEMREF | 1 << 8, cookie, 0, 64)
                  + P.PARAM.pack(P.ParamKind.VALUE, 0x41, 1, 0))
        kind, body = raw.call(P.MsgType.INVOKE, P.SESSION.pack(session, FillApp.FILL, 0)
                              + P.COOKIE.pack(2) + params)
        assert kind == P.MsgType.OK and P.RESULT.unpack_from(body)[0] == 0
        assert area[100:164] == b"A" * 64 and area[164] == 0
        with pytest.raises(PermissionError):
            os.ftruncate(memfd, 0)
        assert raw.call(P.MsgType.SHM_CLOSE, P.COOKIE.pack(cookie))[0] == P.MsgType.OK
        raw.close()
        area.close()
        assert d.stats()["registered_cookies"] == 0
    finally:
        os.close(memfd)
        d.stop()


# -- bounded state -------------------------------------------------------------------------------------------
#: Requests sent with random bodies beside the unknown types: none hangs the connection up,
#: none needs a descriptor to be answered, each gets exactly one OK or ERROR.
_RANDOM_BODY_TYPES = (P.MsgType.ALLOC, P.MsgType.SHM_CLOSE, P.MsgType.SHM_FROM_ID, P.MsgType.REGISTER,
                      P.MsgType.OPEN_SESSION, P.MsgType.INVOKE, P.MsgType.CLOSE_SESSION, P.MsgType.PING)


def _random_frames(rng: random.Random, count: int, known: tuple[int, ...]) -> list[tuple[bytes, bool]]:
    """``count`` frames, each ``(frame, unknown)``: half of an unknown type, half of a
    type of ``known``, every body random bytes of a random length."""
    known_types = {int(t) for t in P.MsgType}
    frames = []
    for _ in range(count):
        unknown = rng.random() < 0.5
        if unknown:
            msg_type = rng.randrange(0x10000)
            while msg_type in known_types:
                msg_type = rng.randrange(0x10000)
        else:
            msg_type = int(rng.choice(known))
        frames.append((P.frame(msg_type, rng.randbytes(rng.randrange(65))), unknown))
    return frames


def _check_reply(reply: tuple[int, bytes], unknown: bool) -> None:
    if unknown:
        assert _error(reply)[0] == P.ErrorCode.UNKNOWN_TYPE
    else:
        assert reply[0] in (P.MsgType.OK, P.MsgType.ERROR), reply


def _flood_socket(raw: RawClient, frames: list[tuple[bytes, bool]]) -> None:
    for start in range(0, len(frames), 500):
        chunk = frames[start:start + 500]
        raw.send(b"".join(f for f, _ in chunk))
        for _, unknown in chunk:
            _check_reply(raw.recv(), unknown)


def _flood_slot(raw: RawClient, frames: list[tuple[bytes, bool]]) -> None:
    """Send ``frames`` through the connection's shm slot, a slot request at a time."""
    words_map = mmap.mmap(raw.fds[0], S.SLOT_BYTES)
    words = memoryview(words_map)[:S.SLOT_WORDS * 8].cast("Q")
    try:
        seq = words[S.W_REP_SEQ]  # the last request served on this slot
        pos = 0
        while pos < len(frames):
            request = bytearray()
            first = pos
            while pos < len(frames) and len(request) + len(frames[pos][0]) <= S.SLOT_REQ_CAP // 4:
                request += frames[pos][0]
                pos += 1
            words_map[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(request)] = request
            words[S.W_REQ_LEN] = len(request)
            seq += 1
            words[S.W_REQ_SEQ] = seq
            raw.send(P.DOORBELL_FRAME)  # wakes a sleeping daemon; ignored by a polling one
            _wait(lambda seq=seq: words[S.W_REP_SEQ] == seq, "slot reply")
            length = words[S.W_REP_LEN]
            assert length != S.REP_ON_SOCKET
            replies = read_frames_from(words_map[S.SLOT_REP_OFF:S.SLOT_REP_OFF + length])
            assert len(replies) == pos - first
            for reply, (_, unknown) in zip(replies, frames[first:pos]):
                _check_reply(reply, unknown)
    finally:
        words.release()
        words_map.close()


def read_frames_from(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length, msg_type, _ = P.HEADER.unpack_from(data, pos)
        out.append((msg_type, data[pos + P.HEADER_SIZE:pos + P.HEADER_SIZE + length]))
        pos += P.HEADER_SIZE + length
    return out


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_ten_thousand_random_frames_leave_rss_bounded(tmp_path, transport):
    """10,000 random frames (half of unknown types, half requests with random bodies)
    after 1,000 of warm-up: one reply each, the connection served throughout, no state
    per unknown type, daemon RSS bounded."""
    d = DaemonProcess(tmp_path / "h.sock")
    rng = random.Random(3)
    # no ALLOC through the slot: a successful one sends its descriptors on the socket
    known = tuple(t for t in _RANDOM_BODY_TYPES if transport == "socket" or t != P.MsgType.ALLOC)
    try:
        raw = RawClient(d.path, features=P.Feature.SHM_SLOT if transport == "shm" else 0)
        flood = _flood_slot if transport == "shm" else _flood_socket
        warm_up, frames = _random_frames(rng, 1000, known), _random_frames(rng, 10_000, known)
        flood(raw, warm_up)  # buffers, first ERROR paths
        before = d.rss_kib()
        flood(raw, frames)
        grown = d.rss_kib() - before
        assert grown < 8 * 1024, f"daemon RSS grew by {grown} KiB over 10,000 random frames"
        stats = d.stats()
        assert stats["requests"]["ops"]["unknown"] == sum(u for _, u in warm_up + frames)
        assert set(stats["requests"]["latency"]) <= {t.name for t in P.MsgType}
        raw.close()
        assert d.alive()
    finally:
        d.stop()


def test_rss_returns_to_its_baseline_after_a_greedy_client_leaves(tmp_path):
    d = DaemonProcess(tmp_path / "g.sock")
    name = f"/psvctest-{os.getpid()}-greedy"
    try:
        baseline = summary(d.stats())
        before = d.rss_kib()
        for _ in range(2):
            with connect(d.path) as client:
                ctx = client.open_context("greedy")
                held = []
                with pytest.raises(OutOfMemory, match="max_bytes_per_client"):
                    while True:  # up to its quota, every page touched
                        shm = ctx.alloc_user_buf(1 * MiB)
                        shm.view()[:1 * MiB] = b"x" * MiB
                        held.append(shm)
                for shm in held[:8]:
                    shm.close()
                obj = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=8 * MiB)
                obj.unlink()
                area = mmap.mmap(obj.fd, 8 * MiB)
                ctx.register_user_buf(memoryview(area), fd=obj.fd)
                ctx.flush()
                assert d.rss_kib() > before + 24 * 1024
            area.close()
            obj.close_fd()
            d.wait_for(idle(baseline))
            grown = d.rss_kib() - before
            assert grown < 8 * 1024, f"daemon RSS stayed {grown} KiB above its baseline"
    finally:
        d.stop()


# -- isolation ---------------------------------------------------------------------------------------------
_PR_CAPBSET_DROP, _CAP_SYS_PTRACE = 24, 19
ATTACKER = """
import os, sys
pid = int(sys.argv[1])
for name in ("fd/0", "mem"):
    try:
        os.close(os.open(f"/proc/{pid}/{name}", os.O_RDONLY))
        print("opened", name)
    except OSError as exc:
        print("refused", name, exc.errno)
"""


def _same_uid_unprivileged() -> None:
    """In the child before exec: the process keeps its uid but loses CAP_SYS_PTRACE (as
    root it would otherwise bypass the check that makes a non-dumpable process private)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_CAPBSET_DROP, _CAP_SYS_PTRACE, 0, 0, 0) != 0:
            os._exit(99)


def _attack(pid: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", ATTACKER, str(pid)], capture_output=True, text=True,
                         preexec_fn=_same_uid_unprivileged, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[:-1]


def test_daemon_is_not_dumpable_so_same_uid_processes_cannot_open_its_proc_files(tmp_path):
    d = DaemonProcess(tmp_path / "h.sock", preexec_fn=_same_uid_unprivileged)
    control = subprocess.Popen([sys.executable, "-c", "import sys; print(1, flush=True); sys.stdin.read()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               preexec_fn=_same_uid_unprivileged)
    try:
        assert d.stats()["daemon"]["dumpable"] == 0
        attempts = _attack(d.pid)
        assert attempts and all(line.startswith("refused") for line in attempts), attempts
        control.stdout.readline()
        assert all(line.startswith("opened") for line in _attack(control.pid))  # the attacker can
    finally:
        control.kill()
        control.communicate()
        d.stop()


def test_peer_credentials_and_allow_list(tmp_path):
    me = (os.getpid(), os.getuid(), os.getgid())
    d = DaemonThread(tmp_path / "a.sock", allowed_uids=(os.getuid(),), allowed_gids=(os.getgid(),))
    try:
        with connect(d.path, name="creds") as client:
            client.open_context("creds")
            entries = [c for c in d.stats()["clients"] if c["name"] == "creds"]
            assert entries and all((c["pid"], c["uid"], c["gid"]) == me for c in entries)
    finally:
        d.stop()
    d = DaemonThread(tmp_path / "b.sock", allowed_uids=(os.getuid() + 1,))
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(d.path)
        [reply] = read_frames(sock)
        code, message = _error(reply)
        assert code == P.ErrorCode.SECURITY and "allowed_uids" in message
        sock.close()
    finally:
        d.stop()


def _client(d, name: str) -> dict:
    [entry] = [c for c in d.stats()["clients"] if c["name"] == name and c["role"] == "CONTEXT"]
    return entry


# -- quotas ------------------------------------------------------------------------------------------------
OTHER_PROCESS = """
import sys
from poolsvc.service.client import connect
with connect(sys.argv[1]) as client:
    ctx = client.open_context("other")
    held = [ctx.alloc_user_buf(4 << 20) for _ in range(4)]
    print(sum(s.size for s in held) >> 20, "MiB")
"""


def test_quota_is_on_by_default_and_counts_allocations_registrations_and_sessions(tmp_path):
    d = DaemonThread(tmp_path / "q.sock", max_sessions_per_client=2)  # pool of 64 MiB
    name = f"/psvctest-{os.getpid()}-sparse"
    try:
        quota = d.stats()["daemon"]["limits"]["max_bytes_per_client"]
        assert quota == 32 * MiB  # half of the pool
        with connect(d.path) as greedy:
            ctx = greedy.open_context("greedy")
            held = []
            with pytest.raises(OutOfMemory, match="max_bytes_per_client") as info:
                for _ in range(64):
                    held.append(ctx.alloc_user_buf(1 * MiB))
            assert len(held) == 32 and f"{32 * MiB} allocated, 0 registered" in str(info.value)
            entry = _client(d, "greedy")
            assert entry["quota"]["pinned_bytes"] == 32 * MiB and entry["quota"]["max_bytes"] == quota
            # A second context of the same process shares that process's quota ...
            with pytest.raises(OutOfMemory, match=f"pid {os.getpid()}, over its 2 context"):
                greedy.open_context("second").alloc_user_buf(4096)
            # ... and another process has its own: the rest of the pool is still there.
            other = spawn_client(OTHER_PROCESS, d.path)
            out, err = other.communicate(timeout=120)
            assert other.returncode == 0 and out.strip() == "16 MiB", err
            for shm in held[16:]:
                shm.close()
            # Registered pages count too: a sparse object bigger than what is left.
            obj = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=768 * MiB)
            area = mmap.mmap(obj.fd, 768 * MiB)
            try:
                with pytest.raises(OutOfMemory, match="registering .* max_bytes_per_client"):
                    ctx.register_user_buf(memoryview(area)[:20 * MiB], fd=obj.fd)
                reg = ctx.register_user_buf(memoryview(area)[:8 * MiB], fd=obj.fd)
                entry = _client(d, "greedy")
                assert entry["quota"]["registered_bytes"] == 8 * MiB
                assert entry["quota"]["pinned_bytes"] == 24 * MiB
                reg.close()
            finally:
                area.close()
                obj.close_fd()
            sessions = [ctx.open_session(Sha256App.UUID) for _ in range(2)]
            with pytest.raises(OutOfMemory, match="max_sessions_per_client"):
                ctx.open_session(Sha256App.UUID)
            for session in sessions:
                session.close()
    finally:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass
        d.stop()


# -- connection hygiene --------------------------------------------------------------------------------------
def test_silent_connections_and_monitor_floods_do_not_lock_clients_out(tmp_path):
    d = DaemonThread(tmp_path / "c.sock", max_pending=4, max_monitors=4, handshake_timeout=60)
    silent = []
    try:
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            sock.connect(d.path)
            silent.append(sock)
        # All but the youngest few were dropped to make room; each sees the end of stream.
        for sock in silent[:16]:
            assert read_frames(sock) == []
        monitors = [RawClient(d.path, P.Role.MONITOR) for _ in range(4)]
        assert all(m.welcome[0] == P.MsgType.WELCOME for m in monitors)
        over = RawClient(d.path, P.Role.MONITOR)
        code, message = _error(over.welcome)
        assert code == P.ErrorCode.LIMIT and "max_monitors" in message
        over.close()
        ctx_raw = RawClient(d.path, P.Role.CONTEXT)  # contexts are counted apart from monitors
        assert ctx_raw.welcome[0] == P.MsgType.WELCOME
        assert ctx_raw.call(P.MsgType.PING, b"ok") == (P.MsgType.OK, b"ok")
        counts = ctx_raw.call(P.MsgType.STATS)
        assert counts[0] == P.MsgType.OK
        for m in monitors + [ctx_raw]:
            m.close()
    finally:
        for sock in silent:
            sock.close()
        d.stop()


def test_connections_per_uid(tmp_path):
    d = DaemonThread(tmp_path / "u.sock", max_connections_per_uid=3)
    try:
        held = [RawClient(d.path, P.Role.MONITOR) for _ in range(3)]
        assert all(raw.welcome[0] == P.MsgType.WELCOME for raw in held)
        over = RawClient(d.path, P.Role.MONITOR)
        code, message = _error(over.welcome)
        assert code == P.ErrorCode.LIMIT and f"uid {os.getuid()}" in message
        assert "max_connections_per_uid" in message
        over.close()
        held.pop().close()
        deadline = time.monotonic() + 30
        while True:  # the place is given back once the daemon has seen the hang-up
            again = RawClient(d.path, P.Role.MONITOR)
            if again.welcome[0] == P.MsgType.WELCOME:
                break
            again.close()
            assert time.monotonic() < deadline, "the place never came back"
            time.sleep(0.01)
        for raw in held + [again]:
            raw.close()
    finally:
        d.stop()


def test_accept_under_descriptor_exhaustion_refuses_without_spinning(tmp_path):
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    d = DaemonProcess(tmp_path / "e.sock", preexec_fn=low_fd_limit, service="max_monitors = 1000\n")
    held: list[RawClient] = []
    try:
        refused = 0
        while refused < 5:
            assert len(held) < 200, "the daemon never ran out of descriptors"
            try:
                held.append(RawClient(d.path, P.Role.MONITOR))
            except (EOFError, ConnectionResetError, BrokenPipeError):
                refused += 1  # accepted and closed at once: the client is not left hanging
        assert d.alive()
        for raw in held[:10]:
            raw.close()
        del held[:10]
        deadline = time.monotonic() + 30
        while True:  # descriptors are free again: connections are served again
            try:
                fresh = RawClient(d.path, P.Role.MONITOR)
                break
            except (EOFError, ConnectionResetError, BrokenPipeError):
                assert time.monotonic() < deadline, "the daemon never accepted again"
        assert fresh.call(P.MsgType.PING, b"x") == (P.MsgType.OK, b"x")
        fresh.close()
    finally:
        for raw in held:
            raw.close()
        err = d.stop()
    assert 1 <= err.count("accept failed") <= 2, err  # rate-limited


# -- fairness ---------------------------------------------------------------------------------------------
def test_a_large_batch_is_served_in_slices_between_other_clients_requests(tmp_path):
    """B's request arrives while A's batch runs (sent from inside A's 100th operation, so
    the order does not depend on timing); B must be answered before A's batch ends."""
    d = DaemonThread(tmp_path / "f.sock", batch_slice=64)
    try:
        a = RawClient(d.path, name=b"batcher")
        b = RawClient(d.path, P.Role.MONITOR, name=b"pinger")
        count = 4096
        ping = d.server._batch_handlers[P.MsgType.PING]

        def ping_that_lets_b_in(conn, body):  # runs on the daemon's loop thread
            if bytes(body) == (100).to_bytes(8, "little"):
                b.send(P.frame(P.MsgType.STATS))
            return ping(conn, body)

        d.server._batch_handlers[P.MsgType.PING] = ping_that_lets_b_in
        a.send(P.frame(P.MsgType.BATCH, b"".join(P.frame(P.MsgType.PING, i.to_bytes(8, "little"))
                                                 for i in range(count)))
               + P.frame(P.MsgType.PING, b"after"))
        kind, body = b.recv()
        assert kind == P.MsgType.OK
        [batcher] = [c for c in json.loads(body)["clients"] if c["name"] == "batcher"]
        assert 0 < batcher.get("batch_ops_left", 0) < count - 100, batcher  # B served mid-batch
        kind, body = a.recv()
        assert kind == P.MsgType.BATCH_REPLY
        replies = [(t, bytes(r)) for t, r in P.iter_frames(body, count, 1 << 20)]
        assert replies == [(P.MsgType.OK, i.to_bytes(8, "little")) for i in range(count)]
        assert a.recv() == (P.MsgType.OK, b"after")  # order kept behind the batch
        assert d.stats()["requests"]["ops"]["PING"] == count + 1
        a.close()
        b.close()
    finally:
        d.stop()


def test_descriptors_of_a_batch_in_slices_go_with_its_reply_only(tmp_path):
    """Replies queued for another client between the slices of A's batch carry none
    of the segment descriptors A's allocations produce; A gets every one."""
    d = DaemonThread(tmp_path / "s.sock", batch_slice=64)
    try:
        a = RawClient(d.path, name=b"allocator")
        b = RawClient(d.path, P.Role.MONITOR, name=b"pinger")
        alloc = d.server._batch_handlers[P.MsgType.ALLOC]
        calls = [0]

        def alloc_that_lets_b_in(conn, body):  # runs on the daemon's loop thread
            calls[0] += 1
            if calls[0] in (300, 700):
                b.send(P.frame(P.MsgType.PING, b"between"))
            return alloc(conn, body)

        d.server._batch_handlers[P.MsgType.ALLOC] = alloc_that_lets_b_in
        count = 2048  # 8 MiB of 4 KiB buffers: several new segments (the arena grows geometrically)
        a.send(P.frame(P.MsgType.BATCH, b"".join(P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096))
                                                 for _ in range(count))))
        assert b.recv() == (P.MsgType.OK, b"between")
        assert b.recv() == (P.MsgType.OK, b"between")
        kind, body = a.recv()
        assert kind == P.MsgType.BATCH_REPLY
        replies = list(P.iter_frames(body, count, 1 << 26))
        assert len(replies) == count and all(t == P.MsgType.OK for t, _ in replies)
        new_segments = sum(1 for _, r in replies if P.DESC.unpack_from(r)[-1] & P.DescBits.NEW_SEGMENT)
        assert new_segments >= 8
        assert len(a.fds) == new_segments and b.fds == []
        sizes = sorted(os.fstat(fd).st_size for fd in a.fds)
        assert sizes[0] == ARENA_FIRST_PAGES * 4096 and sizes[-1] == MiB  # from the first segment to a step
        a.close()
        b.close()
    finally:
        d.stop()


def test_a_trusted_app_waiting_forever_cannot_stall_the_daemon(tmp_path, caplog):
    """WaitApp asked to wait until cancelled: the daemon refuses the wait (the app runs
    on its loop's thread; the app sees TEE_ERROR_BUSY, the log names the limit) and
    goes on serving; a wait within max_ta_wait_ms is served."""
    d = DaemonThread(tmp_path / "w.sock")
    try:
        with connect(d.path) as waiter, connect(d.path) as bystander:
            ctx = waiter.open_context("waiter")
            with ctx.open_session(WaitApp.UUID) as session:
                for ms in (0xFFFFFFFF, 10_000):
                    with pytest.raises(TeeError) as refused:
                        session.invoke(WaitApp.WAIT, [Value(ms, 0)])
                    assert refused.value.code == TEE_ERROR_BUSY
                assert "max_ta_wait_ms 0" in caplog.text
                assert session.invoke(WaitApp.WAIT, [Value(0, 0)]).ret == 0
            bystander.ping()
    finally:
        d.stop()
    d = DaemonThread(tmp_path / "w2.sock", max_ta_wait_ms=20)
    try:
        with connect(d.path) as waiter:
            with waiter.open_context("waiter").open_session(WaitApp.UUID) as session:
                assert session.invoke(WaitApp.WAIT, [Value(5, 0)]).ret == 0
                with pytest.raises(TeeError):
                    session.invoke(WaitApp.WAIT, [Value(21, 0)])
                assert "TEE_Wait of 21 ms refused" in caplog.text and "max_ta_wait_ms 20" in caplog.text
    finally:
        d.stop()


def test_a_failing_request_keeps_the_descriptors_of_earlier_ones_in_its_slot_request(tmp_path):
    """One slot publication of [ALLOC that succeeds, ALLOC that fails]: the failure
    closes only its own descriptors; the first reply's arrive on the socket."""
    d = DaemonThread(tmp_path / "f.sock")
    try:
        raw = RawClient(d.path, features=P.Feature.SHM_SLOT)
        words_map = mmap.mmap(raw.fds[0], S.SLOT_BYTES)
        words = memoryview(words_map)[:S.SLOT_WORDS * 8].cast("Q")
        try:
            request = (P.frame(P.MsgType.ALLOC, P.ALLOC.pack(P.AllocKind.USER, 4096))
                       + P.frame(P.MsgType.ALLOC, P.ALLOC.pack(P.AllocKind.USER, 1 << 40)))
            words_map[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(request)] = request
            words[S.W_REQ_LEN] = len(request)
            seq = words[S.W_REP_SEQ] + 1
            words[S.W_REQ_SEQ] = seq
            raw.send(P.DOORBELL_FRAME)
            _wait(lambda: words[S.W_REP_SEQ] == seq, "slot reply")
            replies = read_frames_from(words_map[S.SLOT_REP_OFF:S.SLOT_REP_OFF + words[S.W_REP_LEN]])
            assert [t for t, _ in replies] == [P.MsgType.OK, P.MsgType.ERROR]
            before = len(raw.fds)
            assert raw.recv()[0] == P.MsgType.DOORBELL  # the descriptors travel with it
            sent = raw.fds[before:]
            assert sent and all(os.fstat(fd).st_size > 0 for fd in sent)
        finally:
            words.release()
            words_map.close()
        raw.close()
        d.wait_for(lambda s: not any(c["role"] == "CONTEXT" for c in s["clients"]))
    finally:
        d.stop()
