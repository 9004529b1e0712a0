"""The service client across processes, and when the daemon is slow, gone or not there.

- fork: objects inherited by a child raise UsedAfterFork there, the child's
  close() is local, and the parent's connections carry on untouched;
- spawn and forkserver: client objects refuse to be pickled (NotSupported),
  and a child that connects on its own works beside the parent;
- timeouts: a listener that never answers the handshake, and a daemon that
  stops answering mid-session, give DaemonTimeout (a Closed);
- paths: a regular file, a directory, a missing directory and a wrong type
  are named as such.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from poolsvc.errors import BadParameters, Closed, NotSupported
from poolsvc.service.client import DaemonTimeout, UsedAfterFork, connect

from svcutil import DaemonThread, idle, summary

TRANSPORTS = ["shm", "socket"]


@pytest.fixture
def daemon(tmp_path):
    d = DaemonThread(tmp_path / "d.sock")
    d.baseline = summary(d.stats())
    yield d
    d.stop()


def _outcome(call: Any) -> str:
    """The name of the exception ``call()`` raised, or "ok"."""
    try:
        call()
    except Exception as exc:  # the test compares the names
        return type(exc).__name__
    return "ok"


def _run_batch(ctx: Any) -> list[Any]:
    batch = ctx.batch()
    batch.alloc_priv_buf(4096)
    return batch.run()


def _use_inherited(client: Any, ctx: Any, shm: Any, out: Any) -> None:
    """In a forked child: every use of the parent's objects fails; closing is local."""
    got = {
        "alloc": _outcome(lambda: ctx.alloc_user_buf(4096)),
        "ping": _outcome(lambda: client.ping(b"child")),
        "stats": _outcome(client.stats),
        "shm_close": _outcome(shm.close),
        "batch": _outcome(lambda: _run_batch(ctx)),
        "view": bytes(shm.view()[:6]),
    }
    got["ctx_close"] = _outcome(ctx.close)
    got["client_close"] = _outcome(client.close)
    out.put(got)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fork_child_gets_a_typed_error_and_the_parent_carries_on(daemon, transport):
    mp = multiprocessing.get_context("fork")
    client = connect(daemon.path, transport=transport)
    ctx = client.open_context("parent")
    shm = ctx.alloc_user_buf(4096)
    shm.view()[:6] = b"parent"
    ctx.alloc_priv_buf(4096).close()  # a pipelined close queued at the fork
    out = mp.Queue()
    child = mp.Process(target=_use_inherited, args=(client, ctx, shm, out))
    child.start()
    got = out.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    refused = UsedAfterFork.__name__
    assert got == {"alloc": refused, "ping": refused, "stats": refused, "shm_close": refused,
                   "batch": refused, "view": b"parent", "ctx_close": "ok", "client_close": "ok"}
    # The parent's connections are as they were.
    assert not ctx.closed and not shm.closed and bytes(shm.view()[:6]) == b"parent"
    assert client.ping(b"parent") == b"parent"
    more = ctx.alloc_user_buf(8192)
    assert client.stats()["contexts"][ctx.name]["shms"] == 2
    more.close()
    shm.close()
    client.close()
    daemon.wait_for(idle(daemon.baseline))


def _connect_on_its_own(path: str, transport: str, out: Any) -> None:
    with connect(path, transport=transport) as client:
        ctx = client.open_context("child")
        shm = ctx.alloc_user_buf(4096)
        shm.view()[:5] = b"child"
        out.put((bytes(shm.view()[:5]), client.ping(b"x")))


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_children_that_connect_themselves_work_beside_the_parent(daemon, method):
    mp = multiprocessing.get_context(method)
    with connect(daemon.path) as client:
        ctx = client.open_context("parent")
        shm = ctx.alloc_user_buf(4096)
        out = mp.Queue()
        children = [mp.Process(target=_connect_on_its_own, args=(daemon.path, transport, out))
                    for transport in TRANSPORTS]
        for child in children:
            child.start()
        assert [out.get(timeout=120) for _ in children] == [(b"child", b"x")] * 2
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
        assert client.ping(b"p") == b"p" and ctx.alloc_priv_buf(4096).size == 4096
        shm.close()
    daemon.wait_for(idle(daemon.baseline))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_client_objects_are_not_sent_to_other_processes(daemon, method):
    mp = multiprocessing.get_context(method)
    with connect(daemon.path) as client:
        ctx = client.open_context()
        shm = ctx.alloc_user_buf(4096)
        objects = [client, ctx, shm, ctx.batch()]
        for obj in objects:
            with pytest.raises(NotSupported, match="cannot be sent to another process"):
                pickle.dumps(obj)
        with pytest.raises(NotSupported, match="call poolsvc.connect"):
            mp.Process(target=print, args=(ctx,)).start()
        assert client.ping(b"still") == b"still"
        shm.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_listener_that_never_answers_times_out(tmp_path, transport):
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(4)  # connections wait in the backlog; nobody reads their HELLO
    try:
        with pytest.raises(DaemonTimeout, match="no answer from the daemon within 0.2 s"):
            connect(path, transport=transport, connect_timeout=0.2)
    finally:
        mute.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_daemon_that_stops_answering_gives_a_typed_error(tmp_path, transport):
    sock = str(tmp_path / "s.sock")
    serve = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "serve", "--socket", sock,
                              "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert serve.poll() is None and time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        client = connect(sock, transport=transport, timeout=0.3)
        ctx = client.open_context()
        shm = ctx.alloc_user_buf(4096)
        os.kill(serve.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DaemonTimeout, match="no answer from the daemon within 0.3 s"):
                ctx.alloc_user_buf(4096)
            assert ctx.closed and shm.closed  # the stream position is lost: so is the context
            with pytest.raises(Closed):
                ctx.alloc_user_buf(4096)
        finally:
            os.kill(serve.pid, signal.SIGCONT)
        assert client.ping(b"awake") == b"awake"  # the monitor connection was idle meanwhile
        client.close()
    finally:
        serve.terminate()
        serve.communicate(timeout=60)


def test_socket_paths_that_are_not_sockets(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("not a socket")
    with pytest.raises(Closed, match="regular file, not a socket"):
        connect(str(regular))
    with pytest.raises(Closed, match="is a directory, not a socket"):
        connect(tmp_path)
    missing = tmp_path / "no" / "such" / "d.sock"
    with pytest.raises(Closed, match=f"directory {tmp_path / 'no' / 'such'} does not exist"):
        connect(missing)
    with pytest.raises(Closed, match="no socket there"):
        connect(tmp_path / "absent.sock")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"socket_path": 123}, "socket path must be a str or os.PathLike, got int 123"),
    ({"timeout": 0}, "timeout 0 is not a positive number"),
    ({"timeout": "1"}, "timeout '1' is not a positive number"),
    ({"connect_timeout": -1.0}, "connect_timeout -1.0 is not a positive number"),
    ({"transport": "pigeon"}, "transport 'pigeon' is not one of socket, shm"),
])
def test_wrong_arguments_to_connect_are_poolsvc_errors(daemon, kwargs, message):
    kwargs.setdefault("socket_path", daemon.path)
    with pytest.raises(BadParameters, match=message):
        connect(**kwargs)
