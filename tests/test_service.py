"""The pool service: daemon, protocol, client processes, crash reclaim, isolation, limits."""
from __future__ import annotations

import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import posix_ipc
import pytest

import poolsvc
from poolsvc import Config, errors
from poolsvc.errors import (
    BadParameters,
    Closed,
    ConfigError,
    ItemNotFound,
    NotSharedMemory,
    NotSupported,
    OutOfMemory,
    PoolsvcError,
)
from poolsvc.mapping import find_mapping
from poolsvc.service import protocol as P
from poolsvc.service.client import connect
from poolsvc.service.server import Server
from poolsvc.service.settings import ServiceSettings, load
from poolsvc.storage import LIVE

from waiting import wait_until
from svcutil import SMALL, DaemonThread, idle, kill_at_random_moments, read_frames, spawn_client, summary
from sysutil import shm_leftovers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, params=["shm", "socket"])
def transport(request, monkeypatch):
    """Every test here runs once per client transport (``connect()`` and client processes
    read ``$POOLSVC_TRANSPORT``)."""
    monkeypatch.setenv("POOLSVC_TRANSPORT", request.param)
    return request.param


@pytest.fixture
def daemon(tmp_path):
    before_storage = LIVE["storage"]
    before_shm = shm_leftovers()
    d = DaemonThread(tmp_path / "d.sock")
    d.baseline = summary(d.stats())
    yield d
    d.stop()
    assert not os.path.exists(d.path), "socket not removed at shutdown"
    assert LIVE["storage"] == before_storage, "daemon storage objects leaked"
    assert shm_leftovers() == before_shm


def hello(role: int = P.Role.CONTEXT, version: int = P.VERSION, magic: int = P.MAGIC) -> bytes:
    return P.frame(P.MsgType.HELLO, P.HELLO.pack(magic, version, role) + b"raw")


def raw_conn(d: DaemonThread, role: int = P.Role.CONTEXT) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(d.path)
    if role:
        sock.sendall(hello(role))
        [(kind, _)] = read_frames(sock, 1)
        assert kind == P.MsgType.WELCOME
    return sock


def error_of(reply: tuple[int, bytes]) -> P.ErrorCode:
    kind, body = reply
    assert kind == P.MsgType.ERROR, reply
    return P.ErrorCode(P.ERROR.unpack_from(body)[0])


# -- the protocol module ---------------------------------------------------------------------------
def test_every_error_class_crosses_the_wire():
    for name in dir(errors):
        cls = getattr(errors, name)
        if not (isinstance(cls, type) and issubclass(cls, PoolsvcError)):
            continue
        if cls is errors.ShortBuffer:
            exc = cls("short by 10", 42)
        elif cls is errors.TeeError:
            exc = cls("refused", 0xFFFF0006, 3)
        else:
            exc = cls(f"{name} with value 7")
        back = P.error_from_body(P.error_body(exc))
        expected = errors.InternalError if cls is errors.PoolsvcError else cls  # the bare base
        assert type(back) is expected, (cls, back)
        assert str(back) == str(exc)
    assert P.error_from_body(P.error_body(errors.ShortBuffer("x", 42))).needed == 42
    tee = P.error_from_body(P.error_body(errors.TeeError("x", 0xFFFF0006, 3)))
    assert (tee.code, tee.origin) == (0xFFFF0006, 3)
    assert isinstance(P.error_from_body(P.error_body(P.LimitExceeded("quota"))), OutOfMemory)
    assert isinstance(P.error_from_body(P.error_body(ValueError("boom"))), errors.InternalError)
    assert isinstance(P.error_from_body(b"\x01"), errors.ProtocolError)


def test_batch_parsing_is_bounded():
    body = P.frame(P.MsgType.PING, b"a") + P.frame(P.MsgType.PING, b"b")
    assert [(t, bytes(b)) for t, b in P.iter_frames(body, 2, 100)] == [(P.MsgType.PING, b"a"),
                                                                         (P.MsgType.PING, b"b")]
    with pytest.raises(errors.ProtocolError, match="more than 1"):
        list(P.iter_frames(body, 1, 100))
    with pytest.raises(errors.ProtocolError, match="truncated"):
        list(P.iter_frames(body[:12], 2, 100))
    with pytest.raises(errors.ProtocolError, match="remain"):
        list(P.iter_frames(body[:-1], 2, 100))
    with pytest.raises(errors.ProtocolError, match="limit"):
        list(P.iter_frames(P.HEADER.pack(10**6, 8, 0), 2, 100))


def test_serve_command_line_takes_any_case_and_python_m(capsys):
    """``--log-level WARNING`` is accepted as ``warning``; ``python -m poolsvc`` is the CLI."""
    from poolsvc.cli import build_parser

    args = build_parser().parse_args(["serve", "--log-level", "WARNING", "--socket", "/tmp/x.sock"])
    assert args.log_level == "warning"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "LOUD"])
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "poolsvc", "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--log-level" in out.stdout


# -- settings ----------------------------------------------------------------------------------------
def test_settings_validation_and_file(tmp_path):
    with pytest.raises(ConfigError, match="max_clients"):
        ServiceSettings(socket_path="/tmp/x.sock", max_clients=0)
    with pytest.raises(ConfigError, match="socket_mode"):
        ServiceSettings(socket_path="/tmp/x.sock", socket_mode=0o666)
    with pytest.raises(ConfigError, match="socket_path"):
        ServiceSettings(socket_path="/tmp/" + "x" * 120)
    with pytest.raises(ConfigError, match="log_level"):
        ServiceSettings(socket_path="/tmp/x.sock", log_level="LOUD")
    assert ServiceSettings(socket_path="/x").mode == 0o600
    assert ServiceSettings(socket_path="/x", socket_group=0).mode == 0o660
    cfg = tmp_path / "svc.toml"
    cfg.write_text('dynamic_size = "64MiB"\narena_step = "1MiB"\n[service]\n'
                   'socket_path = "/tmp/a.sock"\nmax_output = "1MiB"\nlog_level = "debug"\n')
    config, settings = load(cfg)
    assert config.dynamic_size == 64 << 20 and settings.max_output == 1 << 20
    assert settings.log_level == "DEBUG"
    cfg.write_text('[service]\nsurprise = 1\n')
    with pytest.raises(ConfigError, match="service.surprise"):
        load(cfg)


# -- the real daemon and two client processes (the "done when") -------------------------------
BODY_CLIENT = """
import sys
sys.path.insert(0, sys.argv[2])
import poolsvc
from test_service_api import exercise
with poolsvc.connect(sys.argv[1], name="body") as client:
    for round in range(2):
        exercise(client, tag=f"body{round}", exclusive=False)
print("ok", flush=True)
"""

HOLDER = """
import sys, time
from multiprocessing import shared_memory
import poolsvc
client = poolsvc.connect(sys.argv[1], name="holder")
ctx = client.open_context("holder")
held = [ctx.alloc_user_buf(3 * 4096 + 1) for _ in range(20)] + [ctx.alloc_priv_buf(100)]
seg = shared_memory.SharedMemory(create=True, size=1 << 20)
seg.unlink()  # the mapping and the daemon's keep it alive; no name left behind
held.append(ctx.register_user_buf(seg.buf[5:300000]))
held[0].view()[:4] = b"mine"
print("ready", flush=True)
time.sleep(120)
"""


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poolsvc.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_with_two_client_processes_and_sigkill(tmp_path):
    sock = str(tmp_path / "serve.sock")
    conf = tmp_path / "serve.toml"
    conf.write_text('dynamic_size = "64MiB"\narena_step = "1MiB"\n')
    before = shm_leftovers()
    serve = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "serve", "--config", str(conf),
                              "--socket", sock, "--log-level", "info"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert serve.poll() is None, serve.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert os.stat(sock).st_mode & 0o777 == 0o600
        idle_doc = json.loads(run_cli("stat", "--socket", sock, "--json").stdout)
        bodies = [spawn_client(BODY_CLIENT, sock, str(ROOT / "tests")) for _ in range(2)]
        holder = spawn_client(HOLDER, sock)
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        for proc in bodies:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and out.strip() == "ok", err
        busy = json.loads(run_cli("stat", "--socket", sock, "--json").stdout)
        holders = [c for c in busy["clients"] if c["name"] == "holder" and c["role"] == "CONTEXT"]
        assert len(holders) == 1 and holders[0]["shms"] == 22 and holders[0]["frames"] > 80
        quota = holders[0]["quota"]
        assert quota["max_bytes"] == 32 << 20 and quota["shms"] == 22
        assert quota["pinned_bytes"] == quota["allocated_bytes"] + quota["registered_bytes"] > 0
        assert (holders[0]["uid"], holders[0]["gid"]) == (os.getuid(), os.getgid())
        assert busy["daemon"]["dumpable"] == 0
        text = run_cli("stat", "--socket", sock).stdout
        assert "pinned / quota" in text and "/ 32.0 MiB, sessions 0 / 64" in text and "not dumpable" in text
        prom = run_cli("stat", "--socket", sock, "--prometheus").stdout
        assert f'poolsvc_client_quota_bytes{{client="{holders[0]["context"]}"' in prom
        assert busy["pools"]["dynamic"]["used_frames"] > idle_doc["pools"]["dynamic"]["used_frames"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        for _ in range(200):
            after = json.loads(run_cli("stat", "--socket", sock, "--json").stdout)
            if not any(c["role"] == "CONTEXT" for c in after["clients"]):
                break
            time.sleep(0.05)
        assert summary(after) == summary(idle_doc)
        assert after["requests"]["crashes"] == 1
        assert after["resources"]["open_fds"] == idle_doc["resources"]["open_fds"]
        text = run_cli("stat", "--socket", sock).stdout
        assert "pools:" in text and "dynamic" in text and "ALLOC" in text
        prom = run_cli("stat", "--socket", sock, "--prometheus").stdout
        assert 'poolsvc_pool_free_bytes{pool="dynamic"}' in prom
        assert 'poolsvc_request_latency_seconds{type="ALLOC",quantile="0.5"}' in prom
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    assert "shutting down" in err
    assert not os.path.exists(sock) and not os.path.exists(sock + ".lock")
    assert shm_leftovers() == before


# -- SIGKILL at random points ---------------------------------------------------------------------
CHURN = """
import os, random, sys, time
import posix_ipc, mmap
import poolsvc
from poolsvc.tee.driver import RegisteredMemref, Value
from poolsvc.tee.ta import FillApp, Sha256App
rng = random.Random(int(sys.argv[2]))
client = poolsvc.connect(sys.argv[1], name="churn")
ctx = client.open_context()
name = f"/psvctest-{os.getpid()}-{rng.getrandbits(64):016x}"
obj = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=1 << 20)
obj.unlink()
area = mmap.mmap(obj.fd, 1 << 20)
held = []
session = ctx.open_session(FillApp.UUID)
print("ready", flush=True)
while True:
    op = rng.random()
    if op < 0.35 or not held:
        held.append(rng.choice([ctx.alloc_user_buf, ctx.alloc_kernel_buf, ctx.alloc_priv_buf])(
            rng.randint(1, 40000)))
    elif op < 0.45:
        start = rng.randrange(0, 1 << 19)
        held.append(ctx.register_user_buf(memoryview(area)[start:start + rng.randint(1, 200000)],
                                          fd=obj.fd))
    elif op < 0.55:
        b = ctx.batch()
        for _ in range(rng.randint(1, 64)):
            b.alloc_user_buf(rng.randint(1, 9000))
        held += [r for r in b.run() if not isinstance(r, Exception)]
    elif op < 0.6:
        b = ctx.batch()
        k = rng.randint(0, len(held))
        for shm in held[:k]:
            b.close(shm)
        b.run()
        held = held[k:]  # one entry per reference
    elif op < 0.65:
        target = held[rng.randrange(len(held))]
        if target.id > 0:
            held.append(ctx.shm_from_id(target.id))
    elif op < 0.7:
        target = held[rng.randrange(len(held))]
        if target.size >= 4 and target.flags & 1:
            session.invoke(FillApp.FILL, [RegisteredMemref(target, 0, 4, "out"), Value(7, 1)])
    else:
        held.pop(rng.randrange(len(held))).close()
"""


def test_sigkill_at_random_points_then_exact_accounting(daemon):
    rng = random.Random(1234)
    baseline = daemon.baseline
    for _round in range(3):
        procs = [spawn_client(CHURN, daemon.path, str(rng.getrandbits(32))) for _ in range(4)]
        for proc in procs:
            line = proc.stdout.readline().strip()
            assert line == "ready", proc.stderr.read()
        kill_at_random_moments(procs, rng)
        stats = daemon.wait_for(idle(baseline))
        assert not [c for c in stats["clients"] if c["role"] == "CONTEXT"]
    assert stats["requests"]["crashes"] == 12
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("psvctest")]


KILL_MID_REQUEST = """
import os, signal, socket, sys
from poolsvc.service import protocol as P
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(P.frame(P.MsgType.HELLO, P.HELLO.pack(P.MAGIC, P.VERSION, P.Role.CONTEXT)))
sock.recv(4096)
allocs = b"".join(P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096)) for _ in range(2000))
batch = P.frame(P.MsgType.BATCH, allocs)
if sys.argv[2] == "partial":
    sock.sendall(batch[: len(batch) // 2])   # half a request, then die
else:
    sock.sendall(batch + batch)              # die while the daemon works on it
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("mode", ["partial", "whole"])
def test_sigkill_mid_request(daemon, mode):
    proc = spawn_client(KILL_MID_REQUEST, daemon.path, mode)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    daemon.wait_for(idle(daemon.baseline))


# -- isolation ------------------------------------------------------------------------------------
def _segment_inodes(ctx) -> set[int]:
    inodes = set()
    for mm in ctx._channel.segments.values():
        addr = np.frombuffer(mm, np.uint8).__array_interface__["data"][0]
        inodes.add(find_mapping(addr, 1).inode)
    return inodes


def test_isolation_between_clients(daemon):
    with connect(daemon.path) as a, connect(daemon.path) as b:
        ca, cb = a.open_context("a"), b.open_context("b")
        sa = [ca.alloc_user_buf(4096) for _ in range(3)]
        sb = cb.alloc_user_buf(4096)
        sa[0].view()[:6] = b"secret"
        for shm in sa:
            with pytest.raises(ItemNotFound):
                cb.shm_from_id(shm.id)
        assert bytes(sb.view()[:6]) == bytes(6)
        assert _segment_inodes(ca) and _segment_inodes(cb)
        assert not _segment_inodes(ca) & _segment_inodes(cb)  # no storage of A was sent to B
        # B names A's cookie directly: refused, A's buffer untouched
        raw = cb._channel
        kind, body = raw.call(P.MsgType.SHM_CLOSE, P.COOKIE.pack(sa[0].cookie))
        assert error_of((kind, bytes(body))) == P.ErrorCode.ITEM_NOT_FOUND
        from poolsvc.tee.driver import RegisteredMemref
        from poolsvc.tee.ta import Sha256App
        session = cb.open_session(Sha256App.UUID)
        out = cb.alloc_kernel_buf(32)
        forged = P.SESSION.pack(session.id, 0, 0) + P.COOKIE.pack(2) + \
            P.PARAM.pack(P.ParamKind.MEMREF, sa[0].cookie, 0, 6) + \
            P.PARAM.pack(P.ParamKind.MEMREF | 1 << 8, out.cookie, 0, 32)
        kind, body = raw.call(P.MsgType.INVOKE, forged)
        assert error_of((kind, bytes(body))) == P.ErrorCode.ITEM_NOT_FOUND
        with pytest.raises(BadParameters):
            session.invoke(0, [RegisteredMemref(sa[0], 0, 6, "in"), RegisteredMemref(out, 0, 32, "out")])
        assert bytes(sa[0].view()[:6]) == b"secret"
        assert not a.stats()["service"]["requests"]["crashes"]


# -- malformed messages (deterministic cases; hypothesis fuzzing in test_service_fuzz.py) -------------
def test_malformed_framing_disconnects_that_client_only(daemon):
    with connect(daemon.path) as bystander:
        ctx = bystander.open_context("bystander")
        keep = ctx.alloc_user_buf(4096)
        cases = [
            (hello(version=P.LATEST_VERSION + 1), P.ErrorCode.VERSION),
            (hello(magic=0xDEADBEEF), P.ErrorCode.VERSION),
            (hello(role=9), P.ErrorCode.PROTOCOL),
            (P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096)), P.ErrorCode.PROTOCOL),  # no HELLO
            (hello() + P.HEADER.pack(daemon.settings.max_frame + 1, P.MsgType.PING, 0), P.ErrorCode.PROTOCOL),
            (hello() + P.HEADER.pack(0, P.MsgType.PING, 1), P.ErrorCode.PROTOCOL),  # flags
            (P.frame(P.MsgType.HELLO, b"\x01\x02"), P.ErrorCode.PROTOCOL),  # truncated HELLO
        ]
        for data, code in cases:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(daemon.path)
            sock.sendall(data)
            frames = read_frames(sock)  # until the daemon hangs up
            sock.close()
            assert frames and error_of(frames[-1]) == code, (data, frames)
            assert bytes(keep.view()[:1]) == b"\0"
            assert ctx.alloc_kernel_buf(10).size == 4096
        stats = bystander.stats()["service"]
        assert stats["requests"]["protocol_errors"] == 2 and stats["requests"]["refused"] == 5
    daemon.wait_for(idle(daemon.baseline))


def test_bad_requests_get_errors_and_the_connection_stays(daemon):
    sock = raw_conn(daemon)
    requests = [
        (P.frame(999), P.ErrorCode.UNKNOWN_TYPE),
        (P.frame(P.MsgType.HELLO, P.HELLO.pack(P.MAGIC, 1, 1)), P.ErrorCode.UNKNOWN_TYPE),
        (P.frame(P.MsgType.ALLOC, b"\x00\x01\x02"), P.ErrorCode.PROTOCOL),
        (P.frame(P.MsgType.ALLOC, P.ALLOC.pack(7, 4096)), P.ErrorCode.BAD_PARAMETERS),
        (P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, -5)), P.ErrorCode.BAD_PARAMETERS),
        (P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 1 << 40)), P.ErrorCode.LIMIT),  # over the default quota
        (P.frame(P.MsgType.REGISTER, P.REGISTER.pack(0, 0, 4096)), P.ErrorCode.BAD_PARAMETERS),
        (P.frame(P.MsgType.SHM_CLOSE, P.COOKIE.pack(12345)), P.ErrorCode.ITEM_NOT_FOUND),
        (P.frame(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(0)), P.ErrorCode.ITEM_NOT_FOUND),
        (P.frame(P.MsgType.INVOKE, P.SESSION.pack(77, 0, 0) + P.COOKIE.pack(0)), P.ErrorCode.ITEM_NOT_FOUND),
        (P.frame(P.MsgType.OPEN_SESSION, bytes(16) + P.COOKIE.pack(0) + P.COOKIE.pack(9)),
         P.ErrorCode.BAD_PARAMETERS),
        (P.frame(P.MsgType.BATCH, b"\x05\x00"), P.ErrorCode.PROTOCOL),  # truncated inside a batch
    ]
    for data, code in requests:
        sock.sendall(data)
        [reply] = read_frames(sock, 1)
        assert error_of(reply) == code, (data, reply)
    # a batch: nothing malformed runs; misplaced types fail one by one
    body = P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096)) + P.frame(P.MsgType.BATCH) + \
        P.frame(P.MsgType.STATS) + P.frame(P.MsgType.PING, b"x")
    sock.sendall(P.frame(P.MsgType.BATCH, body))
    [(kind, reply)] = read_frames(sock, 1)
    assert kind == P.MsgType.BATCH_REPLY
    subs = [(t, bytes(b)) for t, b in P.iter_frames(reply, 10, 1 << 20)]
    assert [t for t, _ in subs] == [P.MsgType.OK, P.MsgType.ERROR, P.MsgType.ERROR, P.MsgType.OK]
    assert subs[3][1] == b"x"
    sock.sendall(P.frame(P.MsgType.PING, b"still here"))
    assert read_frames(sock, 1) == [(P.MsgType.OK, b"still here")]
    sock.close()
    daemon.wait_for(idle(daemon.baseline))


def test_descriptor_flood_is_refused(daemon):
    sock = raw_conn(daemon)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(P.MAX_PENDING_FDS + 1)]
    try:
        sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())])
    finally:
        for fd in fds:
            os.close(fd)
    frames = read_frames(sock)
    assert error_of(frames[-1]) == P.ErrorCode.PROTOCOL
    sock.close()
    stats = daemon.wait_for(idle(daemon.baseline))
    assert stats["requests"]["protocol_errors"] == 1


def test_monitor_may_not_allocate(daemon):
    sock = raw_conn(daemon, P.Role.MONITOR)
    sock.sendall(P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096)))
    assert error_of(read_frames(sock, 1)[0]) == P.ErrorCode.UNKNOWN_TYPE
    sock.close()


def test_pipelined_requests_beyond_the_output_bound(tmp_path):
    d = DaemonThread(tmp_path / "o.sock", max_output=64 << 10)
    try:
        sock = raw_conn(d)
        n = 3000
        payload = b"p" * 300
        data = b"".join(P.frame(P.MsgType.PING, payload + i.to_bytes(4, "little")) for i in range(n))
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        # the daemon stops reading us after ~64 KiB of unread replies, so our send blocks
        # (its memory for us stays bounded): the sender cannot finish before we read
        sender.join(timeout=0.3)
        assert sender.is_alive()
        with connect(d.path) as other:
            assert other.ping(b"meanwhile") == b"meanwhile"
        replies = read_frames(sock, n)
        sender.join()
        assert [int.from_bytes(b[-4:], "little") for _, b in replies] == list(range(n))
        sock.close()
    finally:
        d.stop()


def test_batch_reply_over_max_output_refuses_the_rest(tmp_path):
    """Once a BATCH's replies pass max_output, its remaining operations are not run:
    each gets a LIMIT error (the compiled loop's refusal path), and the daemon goes on."""
    d = DaemonThread(tmp_path / "b.sock", max_output=64 << 10)
    try:
        sock = raw_conn(d)
        payload = b"q" * 30000
        body = b"".join(P.frame(P.MsgType.PING, payload + bytes([i])) for i in range(4))
        sock.sendall(P.frame(P.MsgType.BATCH, body))
        [(kind, reply)] = read_frames(sock, 1)
        assert kind == P.MsgType.BATCH_REPLY
        subs = [(t, bytes(b)) for t, b in P.iter_frames(reply, 10, 1 << 20)]
        # 2 x 30 KiB fit under 64 KiB; after the third the reply is over it
        assert [t for t, _ in subs] == [P.MsgType.OK] * 3 + [P.MsgType.ERROR]
        assert [b[-1] for _, b in subs[:3]] == [0, 1, 2]
        assert error_of(subs[3]) == P.ErrorCode.LIMIT
        assert b"max_output" in subs[3][1]
        sock.sendall(P.frame(P.MsgType.PING, b"still here"))
        assert read_frames(sock, 1) == [(P.MsgType.OK, b"still here")]
        sock.close()
    finally:
        d.stop()


# -- registration across the process boundary --------------------------------------------------------
def test_register_by_descriptor_unlinked_and_memfd(daemon):
    with connect(daemon.path) as client:
        ctx = client.open_context()
        obj = posix_ipc.SharedMemory(f"/psvctest-{os.getpid()}-reg", flags=posix_ipc.O_CREX, size=1 << 16)
        obj.unlink()
        area = mmap.mmap(obj.fd, 1 << 16)
        try:
            view = memoryview(area)
            by_fd = ctx.register_user_buf(view[100:9000], fd=obj.fd)
            by_maps = ctx.register_kernel_buf(view[4096:8192])  # reopened via /proc/self/map_files
            assert by_fd.offset == 100 and by_maps.offset == 0
            assert list(by_fd.pages[1:3]) == list(by_maps.pages[0:1]) + [by_fd.pages[2]]
            area[100:103] = b"abc"
            assert bytes(by_fd.view()[:3]) == b"abc"
            stats = client.stats()["service"]
            assert stats["resources"]["registered_mappings"] == 1
            by_fd.close()
            by_maps.close()
            del view
            memfd = os.memfd_create("psvctest")
            os.ftruncate(memfd, 8192)
            mm = mmap.mmap(memfd, 8192)
            with pytest.raises(NotSharedMemory):
                ctx.register_user_buf(memoryview(mm), fd=memfd)  # not under /dev/shm: refused locally
            kind, body = ctx._channel.call(P.MsgType.REGISTER, P.REGISTER.pack(0, 0, 4096), [memfd])
            assert error_of((kind, bytes(body))) == P.ErrorCode.NOT_SHARED_MEMORY  # and by the daemon
            kind, body = ctx._channel.call(P.MsgType.REGISTER, P.REGISTER.pack(0, (1 << 16) - 100, 4096),
                                           [obj.fd])
            assert error_of((kind, bytes(body))) == P.ErrorCode.BAD_PARAMETERS  # past the object's end
            mm.close()
            os.close(memfd)
        finally:
            area.close()
            obj.close_fd()
        assert client.stats()["service"]["resources"]["registered_mappings"] == 0
    daemon.wait_for(idle(daemon.baseline))


# -- limits -----------------------------------------------------------------------------------------------
def test_per_client_limits(tmp_path):
    d = DaemonThread(tmp_path / "l.sock", max_shms_per_client=5, max_bytes_per_client=5 * 4096,
                     max_clients=1, max_monitors=1, max_pending=1, handshake_timeout=0.3)
    try:
        with connect(d.path) as client:
            ctx = client.open_context()  # the client's monitor connection closes: one connection
            wait_until(lambda: d.server._census[P.Role.MONITOR] == 0, what="the client's monitor gone")
            held = [ctx.alloc_user_buf(4096) for _ in range(5)]
            with pytest.raises(OutOfMemory, match="max_shms_per_client"):
                ctx.alloc_user_buf(4096)
            held.pop().close()
            with pytest.raises(OutOfMemory, match="max_bytes_per_client"):
                ctx.alloc_user_buf(8192)
            ctx.alloc_user_buf(4096)
            with connect(d.path) as second:  # a monitor: allowed
                with pytest.raises(OutOfMemory, match="max_clients"):
                    second.open_context()  # a second context: over max_clients
                with pytest.raises(OutOfMemory, match="max_monitors"):
                    connect(d.path)  # a second monitor
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.settimeout(10)
            silent.connect(d.path)  # waits without a HELLO
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.settimeout(10)
            extra.connect(d.path)  # over max_pending: the silent one makes room
            assert read_frames(silent) == []
            silent.close()
            assert read_frames(extra) == []  # dropped after handshake_timeout
            extra.close()
            assert client.stats()["service"]["requests"]["refused"] == 4
    finally:
        d.stop()


# -- lifecycle: restart, stale sockets, a crashed daemon ------------------------------------------------
def test_restart_and_stale_socket(tmp_path):
    path = tmp_path / "r.sock"
    d = DaemonThread(path)
    client = connect(str(path))
    ctx = client.open_context()
    shm = ctx.alloc_user_buf(4096)
    with pytest.raises(PoolsvcError, match="another poolsvc daemon"):
        Server(Config(**SMALL), ServiceSettings(socket_path=str(path))).start()
    d.stop()
    assert not path.exists()
    with pytest.raises(Closed):
        ctx.alloc_user_buf(4096)
    ctx.close()
    assert shm.closed
    client.close()
    # a socket file left by a crash: removed on start
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    d = DaemonThread(path)
    try:
        with connect(str(path)) as again:
            assert again.open_context().alloc_user_buf(4096).id == 1
    finally:
        d.stop()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket [(]a regular file[)]"):
        Server(Config(**SMALL), ServiceSettings(socket_path=str(path))).start()
    assert path.read_text() == "not a socket"
    assert not os.path.exists(str(path) + ".lock")


def test_serve_socket_paths_that_cannot_be_served(tmp_path):
    """``serve --socket``: a missing directory is not created; a path that is a regular
    file or a directory is "not a socket"; each exits 2 with one line saying so."""
    missing = tmp_path / "nonexistent" / "dir"
    directory = tmp_path / "a-directory"
    directory.mkdir()
    regular = tmp_path / "a-file"
    regular.write_text("keep")
    for path, expected in ((missing / "x.sock", f"directory {missing} does not exist"),
                           (directory, "is not a socket (a directory)"),
                           (regular, "is not a socket (a regular file)")):
        out = subprocess.run([sys.executable, "-m", "poolsvc", "serve", "--socket", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and expected in out.stderr, (path, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "nonexistent").exists()
    assert directory.is_dir() and regular.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory", "a-file"]  # no lock files left


def test_crashed_daemon_leaves_no_shm_and_a_new_one_starts(tmp_path):
    sock = str(tmp_path / "c.sock")
    before = shm_leftovers()
    serve = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "serve", "--socket", sock,
                              "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and serve.poll() is None
            time.sleep(0.05)
        client = connect(sock)
        ctx = client.open_context()
        shms = [ctx.alloc_user_buf(100000) for _ in range(10)]
        shms[0].view()[:2] = b"ok"
    finally:
        serve.kill()
        serve.communicate(timeout=30)
    with pytest.raises(Closed):
        ctx.alloc_user_buf(10)
    assert all(shm.closed for shm in shms) and ctx.closed  # what the daemon held is gone
    client.close()
    assert shm_leftovers() == before
    assert os.path.exists(sock)  # left behind by the crash
    serve = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "serve", "--socket", sock,
                              "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with connect(sock) as client:
                    assert client.open_context().alloc_user_buf(10).id == 1
                break
            except Closed:
                assert time.monotonic() < deadline and serve.poll() is None
                time.sleep(0.05)
    finally:
        serve.send_signal(signal.SIGINT)
        _, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    assert "removing" in err and not os.path.exists(sock)


# -- pool without dynamic shm ----------------------------------------------------------------------------
def test_static_pool_through_the_daemon(tmp_path):
    d = DaemonThread(tmp_path / "s.sock", config=Config(**SMALL, dynamic_shm=False))
    try:
        with connect(d.path) as client:
            assert client.pool == "static"
            ctx = client.open_context()
            shm = ctx.alloc_priv_buf(40)
            assert shm.size == 512 and shm.flags == poolsvc.ShmFlags.PRIV | poolsvc.ShmFlags.POOL
            with pytest.raises(NotSupported, match="carve-out"):
                shm.view()
            seg = shared_memory.SharedMemory(create=True, size=4096)
            try:  # sent as the kernel sends it; the secure world refuses: -EINVAL
                with pytest.raises(BadParameters, match="EINVAL"):
                    ctx.register_user_buf(seg.buf)
            finally:
                seg.close()
                seg.unlink()
            assert client.stats()["static"]["used"] >= 512
    finally:
        d.stop()


# -- sessions holding RPC memory are reclaimed with their client -------------------------------------------
STORAGE_CLIENT = """
import sys, time
import poolsvc
from poolsvc.tee.driver import Value
from poolsvc.tee.ta import StorageApp
client = poolsvc.connect(sys.argv[1])
ctx = client.open_context()
sessions = [ctx.open_session(StorageApp.UUID, [Value(1 << 20)]) for _ in range(3)]
print("ready", flush=True)
time.sleep(120)
"""


def test_sigkill_closes_sessions_and_frees_rpc_memory(daemon):
    # Warm up once so the secure world's RPC context exists in the baseline.
    warm = spawn_client(STORAGE_CLIENT, daemon.path)
    assert warm.stdout.readline().strip() == "ready", warm.stderr.read()
    warm.kill()
    warm.communicate(timeout=30)
    baseline = summary(daemon.wait_for(lambda s: not any(c["role"] == "CONTEXT" for c in s["clients"])))
    proc = spawn_client(STORAGE_CLIENT, daemon.path)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    busy = daemon.stats()
    assert busy["pools"]["dynamic"]["used_frames"] >= baseline["dynamic_used_frames"] + 3 * 256
    assert [c["sessions"] for c in busy["clients"] if c["role"] == "CONTEXT"] == [3]
    proc.kill()
    proc.communicate(timeout=30)
    daemon.wait_for(idle(baseline))


def test_only_the_default_runtime_directory_is_created(tmp_path, monkeypatch):
    from poolsvc.service import listener

    runtime = tmp_path / "runtime"
    monkeypatch.setattr(listener, "default_runtime_dir", lambda: str(runtime))
    d = DaemonThread(runtime / "poolsvc.sock")
    try:
        assert runtime.stat().st_mode & 0o777 == 0o700
    finally:
        d.stop()
    runtime.chmod(0o755)  # opened to others (or someone else's): refused, left as it is
    with pytest.raises(ConfigError, match="mode 0700"):
        Server(Config(**SMALL), ServiceSettings(socket_path=str(runtime / "poolsvc.sock"))).start()
    assert runtime.stat().st_mode & 0o777 == 0o755
