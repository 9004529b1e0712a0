"""Property test of the daemon's ownership checks: no client reaches another client's shm.

Random sequences over two client connections to one in-process daemon: the owner
allocates buffers of every kind (stamped over all of their bytes), reads them and
closes some; the intruder, a second client speaking the wire protocol by hand, names
the owner's cookies (live and closed) in SHM_CLOSE and the owner's ids in
SHM_FROM_ID, and invents cookies and ids of its own.  Every such request must be
refused with ITEM_NOT_FOUND, and the owner's buffers must keep their bytes and stay
the owner's to close.  At the end of each sequence the daemon is idle again.

Concurrency: the daemon runs in a thread of the test process (tests/svcutil.py);
the test talks to it only through sockets.
"""
from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolsvc.service import protocol as P
from poolsvc.service.client import connect

from profiles import examples
from bytecheck import assert_bytes
from svcutil import DaemonThread, idle, read_frames, summary

PAGE = 4096
KINDS = ["alloc_user_buf", "alloc_kernel_buf", "alloc_priv_buf"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonThread(tmp_path_factory.mktemp("ownership") / "d.sock")
    d.baseline = summary(d.stats())
    yield d
    d.stop()


class Intruder:
    """A second client that sends requests by hand (so it can name anything)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.sock.sendall(P.frame(P.MsgType.HELLO, P.HELLO.pack(P.MAGIC, P.VERSION, P.Role.CONTEXT)
                                  + b"intruder"))
        [(kind, _)] = read_frames(self.sock, 1)
        assert kind == P.MsgType.WELCOME

    def error_of(self, msg_type: int, body: bytes) -> P.ErrorCode:
        """Send one request; its reply must be an ERROR, whose code is returned."""
        self.sock.sendall(P.frame(msg_type, body))
        [(kind, reply)] = read_frames(self.sock, 1)
        assert kind == P.MsgType.ERROR, f"request {msg_type!r} on a foreign object was served: {reply!r}"
        return P.ErrorCode(P.ERROR.unpack_from(reply)[0])

    def close(self) -> None:
        self.sock.close()


@settings(max_examples=examples(0.3))
@given(data=st.data())
def test_a_client_never_reaches_another_clients_shm(daemon, data):
    draw = data.draw
    with connect(daemon.path) as client:
        owner = client.open_context("owner")
        intruder = Intruder(daemon.path)
        live: list[tuple[object, int]] = []        # (shm, stamp byte over all of it)
        closed: list[tuple[int, int]] = []         # (cookie, id) of shms the owner closed
        try:
            for step in range(draw(st.integers(1, 15), label="steps")):
                op = draw(st.sampled_from(["alloc", "alloc", "close_own", "foreign_close", "foreign_close",
                                           "foreign_from_id"]), label="op")
                if op == "alloc":
                    kind = draw(st.sampled_from(KINDS), label="kind")
                    shm = getattr(owner, kind)(draw(st.integers(1, 3 * PAGE), label="size"))
                    stamp = 1 + step % 255
                    shm.view()[:] = bytes([stamp]) * shm.size
                    live.append((shm, stamp))
                elif op == "close_own" and live:
                    shm, _ = live.pop(draw(st.integers(0, len(live) - 1), label="which"))
                    closed.append((shm.cookie, shm.id))
                    shm.close()
                elif op == "foreign_close":
                    cookies = [s.cookie for s, _ in live] + [c for c, _ in closed]
                    cookie = draw(st.sampled_from(cookies) if cookies else st.integers(0, 1 << 20), label="cookie")
                    code = intruder.error_of(P.MsgType.SHM_CLOSE, P.COOKIE.pack(cookie))
                    assert code == P.ErrorCode.ITEM_NOT_FOUND, code
                elif op == "foreign_from_id":
                    ids = [s.id for s, _ in live if s.id > 0] + [i for _, i in closed if i > 0]
                    shm_id = draw(st.sampled_from(ids) if ids else st.integers(1, 10), label="id")
                    code = intruder.error_of(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(shm_id))
                    assert code == P.ErrorCode.ITEM_NOT_FOUND, code
                for shm, stamp in live:                    # the owner's buffers are untouched
                    view = shm.view()
                    assert_bytes(view, bytes([stamp]) * shm.size, "a buffer of the owner")
                    view.release()
            for shm, _ in live:                            # still the owner's to close
                shm.close()
        finally:
            intruder.close()
        owner.close()
    daemon.wait_for(idle(daemon.baseline))
