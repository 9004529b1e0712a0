"""The daemon's ALLOC + SHM_CLOSE handlers: the compiled kernel (ext/fastpath.pyx)
against its plain-Python twin (poolsvc/_pure/fastpath.py), in one run.

An in-process daemon (bench/profile_request.py's: a Server, its System
compiled, real connections accepted from its socket) serves an ALLOC and
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

import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from poolsvc._backend import BACKEND
from poolsvc._pure import fastpath as pure
from poolsvc.service import protocol as P

pytestmark = pytest.mark.skipif(BACKEND != "compiled", reason="compares the compiled kernel with its twin")

#: Allocations held at once per round (then closed): a client's batch.
PAIRS = 256


_SPEC = importlib.util.spec_from_file_location("profile_request", Path(__file__).with_name("profile_request.py"))
assert _SPEC is not None and _SPEC.loader is not None
profile = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(profile)


class InProcess:
    """The request profile's in-process daemon (bench/profile_request.py), its socket
    connection served by the compiled ``ShmRequests`` or by the twin."""

    def __init__(self, folder: str, pool: str) -> None:
        self.daemon = profile.InProcessDaemon(pool, folder)
        self.server = self.daemon.server
        self.conn = self.daemon.conns["socket"]
        self.compiled_requests = self.conn.shm_requests
        self.pure_requests = pure.ShmRequests(self.server, self.conn)

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
        self.daemon.close()


@pytest.fixture(scope="module", params=["dynamic", "static"])
def daemon(request: Any, tmp_path_factory: Any) -> Iterator[InProcess]:
    d = InProcess(str(tmp_path_factory.mktemp("fastpath")), request.param)
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
    benchmark.extra_info["ops_per_call"] = PAIRS  # bench/results.py: the median per pair
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
                                pure_us_per_pair=round(statistics.median(pure_us), 3),
                                figures=True)  # bench/results.py lists them, not the timed call
    benchmark.pedantic(compiled_run, rounds=1, iterations=1)
    assert not daemon.conn.context.shms and daemon.conn.pool_bytes == 0
