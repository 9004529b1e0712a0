"""``poolsvc tee`` and the embedding example: real daemon processes, real sockets."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from poolsvc import Config, System
from poolsvc.constants import MsgCmd, Origin
from poolsvc.errors import TEE_ERROR_CANCEL, ProtocolError, TeeError
from poolsvc.tee.daemon import TeeClient, TeeDaemon, memref_in, memref_out, value
from poolsvc.tee.msg import MsgArg, MsgParam, unpack
from poolsvc.tee.ta import CopyApp, Sha256App, StorageApp, WaitApp

from sysutil import shm_leftovers
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def start(cmd, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        pytest.fail(f"daemon did not start: {proc.stderr.read().decode()}")
    return proc, line


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(20) == 0, proc.stderr.read().decode()
    finally:
        proc.stdout.close()
        proc.stderr.close()


def test_poolsvc_tee_daemon(tmp_path):
    sock = str(tmp_path / "tee.sock")
    before = shm_leftovers()
    proc, line = start([sys.executable, "-m", "poolsvc.cli", "tee", "--socket", sock, "--json"], tmp_path)
    try:
        info = json.loads(line)
        assert str(Sha256App.UUID) in info["apps"]
        with TeeClient(sock) as c:
            assert c.hello()["version"] == 1
            s = c.open_session(Sha256App.UUID)
            data = os.urandom(100_000)
            out = c.invoke(s, 0, [memref_in(data), memref_out(32)])
            assert base64.b64decode(out["data"][1]) == hashlib.sha256(data).digest()
            assert out["sizes"] == [None, 32]
            cp = c.open_session(CopyApp.UUID)
            with pytest.raises(TeeError) as info_exc:
                c.invoke(cp, 0, [memref_in(b"abcdef"), memref_out(2)])
            assert info_exc.value.code == 0xFFFF0010 and info_exc.value.answer["sizes"][1] == 6
            st = c.open_session(StorageApp.UUID, [value(4096)])
            c.invoke(st, 0, [value(5), memref_in(b"kept")])
            got = c.invoke(st, 1, [value(5), memref_out(4)])
            assert base64.b64decode(got["data"][1]) == b"kept"
            # the raw path: a message with the META bit on an invoke param
            bad = MsgArg(cmd=MsgCmd.INVOKE_COMMAND, session=s, params=[MsgParam(0x101)])
            assert unpack(c.call(bad.pack())).ret == 0xFFFF0006
            unknown = MsgArg(cmd=99, ret=0x42).pack()  # refused at the SMC level, message as sent
            assert c.call_smc(unknown) == (5, unknown)
            with pytest.raises(ProtocolError):
                c.request("nonsense")
            stats = c.request("stats")["stats"]
            assert stats["tee"]["sessions"] == 3 and stats["tee"]["rpc_shms"] == 1
        # the connection's context is gone with its sessions and RPC memory
        with TeeClient(sock) as c:
            tee = c.request("stats")["stats"]["tee"]
            assert tee["sessions"] == 0 and tee["rpc_shms"] == 0
    finally:
        stop(proc)
    assert not os.path.exists(sock)
    assert shm_leftovers() == before


def test_example_daemon_with_its_own_app(tmp_path):
    sock = str(tmp_path / "vault.sock")
    proc, line = start([sys.executable, str(ROOT / "examples" / "my_tee_daemon.py"), "--socket", sock],
                       tmp_path)
    try:
        assert line.startswith(b"ready")
        with TeeClient(sock) as c:
            s = c.open_session("0d9b2c1e-4a55-4c1a-9a3e-5f0c1b7e9a01", [value(0x5A)])
            data = os.urandom(50_000)
            out = c.invoke(s, 1, [{"data": base64.b64encode(data).decode(), "dir": "inout"}])
            assert base64.b64decode(out["data"][0]) == bytes(b ^ 0x5A for b in data)
            assert c.invoke(s, 2, [value(direction="out")])["values"][0] == [50_000, 0]
            c.close_session(s)
    finally:
        stop(proc)


def test_stale_socket_is_replaced(tmp_path):
    sock = tmp_path / "stale.sock"
    sock.write_text("")  # a crashed predecessor's leftover
    with System(Config(dynamic_size=16 << 20, arena_step=1 << 20)) as system:
        daemon = TeeDaemon(system, str(sock))
        daemon.serve_forever(ready=daemon.stop, poll=0.01)
    assert not sock.exists()


def test_handle_never_raises(tmp_path):
    with System(Config(dynamic_size=16 << 20, arena_step=1 << 20)) as system:
        daemon = TeeDaemon(system, str(tmp_path / "x.sock"))
        ctx = system.open_context()
        for line in [b"", b"[]", b"{}", b'{"op": 1}', b'{"op": "invoke"}', b'{"op": "invoke", "session": 9}',
                     b'{"op": "open_session", "uuid": "nope"}', b'{"op": "call", "arg": "zz"}',
                     b'{"op": "call", "arg": "00"}', b'{"op": "open_session", "uuid": "%s", "params": [5]}'
                     % str(Sha256App.UUID).encode()]:
            answer = daemon.handle(ctx, line)
            assert answer["ok"] is False and answer["error"]
        ctx.close()


class _StartedWait(WaitApp):
    """WaitApp that says when its wait begins (the condition the test cancels on)."""

    UUID = uuid.uuid5(uuid.NAMESPACE_URL, "https://poolsvc/test/daemon-started-wait")
    started = threading.Event()

    def invoke(self, func, params):
        type(self).started.set()
        return super().invoke(func, params)


def _in_thread(fn, *args):
    """Run ``fn(*args)`` in a thread; returns (thread, outcomes): the result or the exception."""
    outcomes = []

    def run():
        try:
            outcomes.append(fn(*args))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcomes.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcomes


def test_cancel_reaches_a_running_invoke(tmp_path):
    """An invoke runs in the daemon's worker thread; a cancel sent on the same connection
    from another thread reaches it, and other clients' requests wait their turn."""
    path = str(tmp_path / "c.sock")
    with System(Config(dynamic_size=16 << 20, arena_step=1 << 20)) as system:
        system.tee.install(_StartedWait)
        daemon = TeeDaemon(system, path)
        ready = threading.Event()
        loop = threading.Thread(target=daemon.serve_forever, kwargs={"ready": ready.set, "poll": 0.05})
        loop.start()
        try:
            assert ready.wait(30)
            with TeeClient(path) as c, TeeClient(path) as other:
                s = c.open_session(_StartedWait.UUID)
                _StartedWait.started.clear()
                invoke, outcome = _in_thread(c.invoke, s, WaitApp.WAIT, [value(0xFFFFFFFF)])
                assert _StartedWait.started.wait(30)
                waiting, other_outcome = _in_thread(other.request, "stats")  # waits for the worker
                c.cancel(s)                     # answered after the invoke it cancels
                invoke.join(30)
                waiting.join(30)
                assert not invoke.is_alive() and not waiting.is_alive()
                (exc,) = outcome
                assert isinstance(exc, TeeError)
                assert (exc.code, exc.origin) == (TEE_ERROR_CANCEL, Origin.TRUSTED_APP)
                assert other_outcome[0]["stats"]["tee"]["sessions"] == 1
                # the flag stays set; a masked wait ignores it; the connection still serves
                with pytest.raises(TeeError):
                    c.invoke(s, WaitApp.WAIT, [value(0xFFFFFFFF)])
                assert c.invoke(s, WaitApp.WAIT, [value(1, 1)])["values"] == [None]
                with pytest.raises(ProtocolError, match="BadParameters"):
                    c.cancel(s + 100)
                # a daemon stopped during an endless invoke cancels it and ends
                s2 = c.open_session(WaitApp.UUID)
                _in_thread(c.invoke, s2, WaitApp.WAIT, [value(0xFFFFFFFF)])
                wait_until(lambda: any(x.running for x in system.tee.sessions.values()),
                           what="the second wait to start")
                daemon.stop()
                loop.join(30)
                assert not loop.is_alive()
        finally:
            daemon.stop()
            loop.join(30)
        assert not system.tee.sessions     # the connections' contexts closed
