"""The daemon's ALLOC + SHM_CLOSE handlers: the compiled kernel (ext/fastpath.pyx)
against its plain-Python twin (poolsvc/_pure/fastpath.py), in one run.

An in-process daemon (a Server, its System compiled) serves an ALLOC and
the SHM_CLOSE of what it allocated through the handlers the loop calls
(``Handlers._op_alloc`` / ``_op_shm_close``: the connection's
``ShmRequests``), either the compiled one or the twin swapped in.  The
figure is per pair (``extra_info["us_per_pair"]``), for the dynamic pool
(REGISTER_SHM / UNREGISTER_SHM included) and the static pool;
``test_fastpath_ratio`` interleaves both backends round by round and
records the median of the per-round ratios (``extra_info["ratio"]``).

Concurrency: single-threaded.  Figures from a shared 2-core machine deserve
scepticism: read the ratio, taken within one run.
"""
from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any, Callable, Iterator

import pytest

from poolsvc import Config
from poolsvc._backend import BACKEND
from poolsvc._pure import fastpath as pure
from poolsvc.service import protocol as P
from poolsvc.service.server import Server
from poolsvc.service.settings import ServiceSettings

pytestmark = pytest.mark.skipif(BACKEND != "compiled", reason="compares the compiled kernel with its twin")

#: Allocations held at once per round (then closed): a client's batch.
PAIRS = 256


class InProcess:
    """A Server in this process and one CONTEXT connection accepted from its socket."""

    def __init__(self, path: str, pool: str) -> None:
        config = Config(dynamic_size=256 << 20, arena_step=4 << 20, dynamic_shm=(pool == "dynamic"),
                        static_size=32 << 20)
        self.server = Server(config, ServiceSettings(socket_path=path, log_level="WARNING"))
        self.server.start()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        srv = self.server
        srv._accept()
        self.conn = next(c for c in srv.connections.values() if c.serial == srv._serials)
        self.sock.sendall(P.frame(int(P.MsgType.HELLO), P.HELLO.pack(P.MAGIC, P.VERSION, P.Role.CONTEXT)))
        srv._on_readable(self.conn)
        _, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 16)
        for fd in fds:
            os.close(fd)
        self.compiled_requests = self.conn.shm_requests
        self.pure_requests = pure.ShmRequests(srv, self.conn)

    def pairs(self, backend: str) -> Callable[[], None]:
        """A round: PAIRS ALLOCs of one page (USER), then their SHM_CLOSEs, by ``backend``'s handlers."""
        srv, conn = self.server, self.conn
        requests = self.compiled_requests if backend == "compiled" else self.pure_requests
        alloc_body = P.ALLOC.pack(P.AllocKind.USER, 4096)
        unpack_cookie, pack_cookie = P.COOKIE.unpack_from, P.COOKIE.pack
        # the handlers as the loop calls them: bound to the server
        op_alloc, op_close = (srv._op_alloc, srv._op_shm_close) if backend == "compiled" else \
            (pure.serve_alloc.__get__(srv), pure.serve_shm_close.__get__(srv))
        reply_fds = srv._reply_fds

        def run() -> None:
            conn.shm_requests = requests
            cookies = [unpack_cookie(op_alloc(conn, alloc_body))[0] for _ in range(PAIRS)]
            for cookie in cookies:
                op_close(conn, pack_cookie(cookie))
            for fd in reply_fds:  # a new arena segment's descriptor, sent once
                os.close(fd)
            reply_fds.clear()

        return run

    def close(self) -> None:
        self.conn.shm_requests = self.compiled_requests
        self.sock.close()
        self.server._on_readable(self.conn)
        self.server.stop()
        self.server.close()


@pytest.fixture(scope="module", params=["dynamic", "static"])
def daemon(request: Any, tmp_path_factory: Any) -> Iterator[InProcess]:
    d = InProcess(str(tmp_path_factory.mktemp("fastpath") / "d.sock"), request.param)
    yield d
    d.close()


@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_alloc_close_pair(benchmark: Any, daemon: InProcess, backend: str) -> None:
    """ALLOC + SHM_CLOSE of one page through the daemon's handlers, per pair."""
    run = daemon.pairs(backend)
    benchmark(run)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["us_per_pair"] = round(stats.stats.median / PAIRS * 1e6, 3)
    assert not daemon.conn.context.shms and daemon.conn.pool_bytes == 0


def test_fastpath_ratio(benchmark: Any, daemon: InProcess, smoke: bool) -> None:
    """Pure twin / compiled kernel, per pair, median of interleaved rounds."""
    compiled_run, pure_run = daemon.pairs("compiled"), daemon.pairs("pure")
    rounds = 1 if smoke else 15
    ratios, compiled_us, pure_us = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        compiled_run()
        t1 = time.perf_counter()
        pure_run()
        t2 = time.perf_counter()
        compiled_us.append((t1 - t0) / PAIRS * 1e6)
        pure_us.append((t2 - t1) / PAIRS * 1e6)
        ratios.append((t2 - t1) / (t1 - t0))
    benchmark.extra_info.update(ratio=round(statistics.median(ratios), 2),
                                compiled_us_per_pair=round(statistics.median(compiled_us), 3),
                                pure_us_per_pair=round(statistics.median(pure_us), 3))
    benchmark.pedantic(compiled_run, rounds=1, iterations=1)
    assert not daemon.conn.context.shms and daemon.conn.pool_bytes == 0
