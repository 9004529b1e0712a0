"""Cancellation of a running trusted-app call through the pool service daemon.

A client's ``Session.cancel`` sends CANCEL on its context's MONITOR
connection while another thread waits in ``invoke``; the daemon reads the
waiting client's monitors from the secure world's wait hook, so the app's
TEE_Wait returns TEE_ERROR_CANCEL.  A CANCEL names a session of the
sender's own process only.  Each test runs on both transports of the
invoking context (socket and shm slot).
"""
from __future__ import annotations

import contextlib
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from svcutil import RawClient, checked_daemon, idle, spawn_client

from poolsvc.constants import Origin
from poolsvc.errors import TEE_ERROR_CANCEL, Closed, TeeError
from poolsvc.service import protocol as P
from poolsvc.service.client import connect
from poolsvc.tee.driver import Value
from poolsvc.tee.ta import WaitApp

#: Long enough that only a CANCEL ends the wait within the test's time; the
#: daemons below allow it (max_ta_wait_ms).
LONG_WAIT_MS = 20_000
TRANSPORTS = ["socket", "shm"]


class StartedWait(WaitApp):
    """WaitApp that says when a call begins (the condition the tests cancel on)."""

    UUID = uuid.UUID("5a0e3c1d-7b2f-4e8a-9c6d-1f2e3d4c5b6a")
    started = threading.Event()

    def invoke(self, func: int, params: Any) -> Any:
        type(self).started.set()
        return super().invoke(func, params)


def _invoke_in_thread(session: Any, ms: int) -> tuple[threading.Thread, list[Any]]:
    """Start ``WAIT ms`` in a thread; returns it and the list its outcome goes to."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(session.invoke(WaitApp.WAIT, [Value(ms, 0)]))
        except TeeError as exc:
            outcome.append(exc)

    StartedWait.started.clear()
    thread = threading.Thread(target=run)
    thread.start()
    assert StartedWait.started.wait(60), "the app never started"
    return thread, outcome


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_reaches_a_waiting_app(tmp_path, transport):
    with checked_daemon(tmp_path / "c.sock", max_ta_wait_ms=30_000) as d:
        d.server.system.tee.install(StartedWait)
        with connect(d.path, transport=transport) as client, connect(d.path) as bystander:
            ctx = client.open_context("waiter")
            session = ctx.open_session(StartedWait.UUID)
            thread, outcome = _invoke_in_thread(session, LONG_WAIT_MS)
            session.cancel()  # from this thread, while the invoke runs in the other
            thread.join(60)
            assert not thread.is_alive()
            [exc] = outcome
            assert isinstance(exc, TeeError), exc
            assert (exc.code, exc.origin) == (TEE_ERROR_CANCEL, Origin.TRUSTED_APP)
            # the flag stays set (OP-TEE's sess->cancel): the next wait ends at once
            with pytest.raises(TeeError) as again:
                session.invoke(WaitApp.WAIT, [Value(LONG_WAIT_MS, 0)])
            assert again.value.code == TEE_ERROR_CANCEL
            assert bystander.ping(b"after") == b"after"  # the daemon serves other clients again
            session.close()
            with pytest.raises(Closed):
                session.cancel()
            ctx.close()
        d.wait_for(idle(d.baseline))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_waiting_clients_monitor_is_served_during_the_wait(tmp_path, transport):
    """PING and STATS on a monitor of the waiting process are answered while the app
    waits (the STATS shows the call's context); its CANCEL then ends the wait."""
    with checked_daemon(tmp_path / "m.sock", max_ta_wait_ms=30_000) as d:
        d.server.system.tee.install(StartedWait)
        with connect(d.path, transport=transport) as client:
            ctx = client.open_context("waiter")
            session = ctx.open_session(StartedWait.UUID)
            monitor = RawClient(d.path, P.Role.MONITOR)
            try:
                thread, outcome = _invoke_in_thread(session, LONG_WAIT_MS)
                assert monitor.call(P.MsgType.PING, b"x") == (P.MsgType.OK, b"x")
                reply_type, body = monitor.call(P.MsgType.STATS)
                assert reply_type == P.MsgType.OK and b'"waiter"' in body
                assert monitor.call(P.MsgType.CANCEL, P.SESSION.pack(session.id, 7, 0)) == (P.MsgType.OK, b"")
                thread.join(60)
                assert not thread.is_alive()
                assert isinstance(outcome[0], TeeError) and outcome[0].code == TEE_ERROR_CANCEL
            finally:
                monitor.close()
            ctx.close()
        d.wait_for(idle(d.baseline))


@contextlib.contextmanager
def _refused_cancels(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """``(daemon, session)`` of a context of this process; afterwards, the session
    was not cancelled (a wait of 0 ms ends normally) and the daemon is idle again."""
    with checked_daemon(tmp_path / "r.sock", max_ta_wait_ms=30_000) as d:
        with connect(d.path) as client:
            ctx = client.open_context("owner")
            session = ctx.open_session(WaitApp.UUID)
            yield d, session
            assert session.invoke(WaitApp.WAIT, [Value(0, 0)]).ret == 0
            ctx.close()
        d.wait_for(idle(d.baseline))


def test_cancel_of_an_unknown_session_or_with_a_bad_body_is_refused(tmp_path):
    with _refused_cancels(tmp_path) as (d, session):
        monitor = RawClient(d.path, P.Role.MONITOR)
        try:
            for body, code in ((P.SESSION.pack(session.id + 1000, 0, 0), P.ErrorCode.ITEM_NOT_FOUND),
                               (P.SESSION.pack(session.id, 0, 1), P.ErrorCode.BAD_PARAMETERS),
                               (P.COOKIE.pack(session.id), P.ErrorCode.PROTOCOL)):
                reply_type, reply = monitor.call(P.MsgType.CANCEL, body)
                assert reply_type == P.MsgType.ERROR
                assert P.ERROR.unpack_from(reply)[0] == code, reply
            assert monitor.call(P.MsgType.PING, b"ok") == (P.MsgType.OK, b"ok")  # still usable
        finally:
            monitor.close()


def test_cancel_from_another_process_is_refused(tmp_path):
    with _refused_cancels(tmp_path) as (d, session):
        proc = spawn_client("""
            import sys
            sys.path.insert(0, sys.argv[3])
            from svcutil import RawClient
            from poolsvc.service import protocol as P
            monitor = RawClient(sys.argv[1], P.Role.MONITOR)
            reply_type, reply = monitor.call(P.MsgType.CANCEL, P.SESSION.pack(int(sys.argv[2]), 0, 0))
            print(P.MsgType(reply_type).name, P.ErrorCode(P.ERROR.unpack_from(reply)[0]).name
                  if reply_type == P.MsgType.ERROR else "")
        """, d.path, str(session.id), str(Path(__file__).parent))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.split() == ["ERROR", "ITEM_NOT_FOUND"]
