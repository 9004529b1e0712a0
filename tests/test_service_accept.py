"""Accepting connections: a burst of connections whose HELLOs are already
received is served, not evicted to make room under ``max_pending``.

The daemon is started but its loop is not yet run: the test calls
``_accept`` itself, so that every connection sits in the listen backlog with
its HELLO buffered when the daemon accepts them, the case a burst of clients
produces; then the loop runs and serves the last one's HELLO.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from poolsvc.config import Config
from poolsvc.service import protocol as P
from poolsvc.service.server import Server
from poolsvc.service.settings import ServiceSettings

from svcutil import SMALL, read_frames


def _connect(path: str, hello: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(path)
    if hello:
        sock.sendall(P.frame(P.MsgType.HELLO, P.HELLO.pack(P.MAGIC, P.VERSION, P.Role.MONITOR) + b"m"))
    return sock


def test_buffered_hellos_are_served_and_only_silent_connections_evicted(tmp_path):
    with _unstarted_loop(tmp_path, max_pending=2) as (server, socks):
        silent = [_connect(server.socket_path, hello=False) for _ in range(3)]
        talking = [_connect(server.socket_path, hello=True) for _ in range(6)]
        socks += silent + talking
        server._accept()  # all nine at once, oldest first
        # Each HELLO received made room; the two oldest silent connections were
        # dropped for the third silent one and the first talking one.
        counts = server.connection_counts()
        assert (counts["monitor"], counts["pending"], server.metrics.refused) == (5, 2, 2), counts
        _run(server)
        for sock in talking:
            ((msg_type, _),) = read_frames(sock, 1)
            assert msg_type == P.MsgType.WELCOME
        assert read_frames(silent[0]) == [] and read_frames(silent[1]) == []
        assert server.connection_counts()["monitor"] == 6


def test_a_full_pending_set_of_buffered_hellos_admits_every_connection(tmp_path):
    with _unstarted_loop(tmp_path, max_pending=1) as (server, socks):
        socks += [_connect(server.socket_path, hello=True) for _ in range(20)]
        server._accept()
        counts = server.connection_counts()
        assert (counts["monitor"], counts["pending"], server.metrics.refused) == (19, 1, 0), counts
        _run(server)
        for sock in socks:
            assert read_frames(sock, 1)[0][0] == P.MsgType.WELCOME


@contextlib.contextmanager
def _unstarted_loop(tmp_path: Path, max_pending: int) -> Iterator[tuple[Server, list[socket.socket]]]:
    """A daemon bound in ``tmp_path`` whose loop does not run until ``_run``, and a list
    for the test's sockets; afterwards the loop is stopped and the sockets closed."""
    server = Server(Config(**SMALL), ServiceSettings(socket_path=str(tmp_path / "a.sock"),
                                                     max_pending=max_pending, handshake_timeout=60,
                                                     log_level="WARNING"))
    server.start()
    socks: list[socket.socket] = []
    try:
        yield server, socks
    finally:
        _stop(server)
        for sock in socks:
            sock.close()


def _run(server: Server) -> None:
    thread = threading.Thread(target=server.serve_forever, name="poolsvc-daemon", daemon=True)
    thread.start()
    server.thread = thread  # type: ignore[attr-defined]


def _stop(server: Server) -> None:
    thread = getattr(server, "thread", None)
    if thread is None:
        server.close()
        return
    server.stop()
    thread.join(timeout=30)
    assert not thread.is_alive(), "daemon loop did not stop"
