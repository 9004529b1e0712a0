"""The static pool in the study, embedded and through a ``poolsvc serve`` subprocess.

Counts only: how many buffers one client and the whole pool hold before a
refusal, and which rule refused them (times are not asserted).
"""
from __future__ import annotations

import pytest

from poolsvc import studypool, studyreport
from poolsvc.study import Report

KiB, MiB = 1 << 10, 1 << 20
POOL = 1 * MiB


@pytest.fixture(scope="module", params=["shm", "socket"])
def figures(request):
    return studypool.measure_static_pool([4 * KiB, 256 * KiB, 2 * MiB], 3, POOL, request.param)


def by(figures, where, size):
    (hit,) = [f for f in figures if f.where == where and f.size == size]
    return hit


def test_embedded_one_client_fills_the_pool(figures):
    small = by(figures, "embedded", 4 * KiB)
    # the driver's message buffer takes one page of the carve-out
    assert (small.client_buffers, small.pool_buffers) == (255, 255)
    assert small.client_bytes == small.pool_bytes == 255 * 4 * KiB
    assert "OutOfMemory" in small.client_refusal and small.p50_us is not None
    assert by(figures, "embedded", 256 * KiB).pool_buffers == 3


def test_through_the_daemon_a_client_stops_at_its_bound_the_pool_where_embedded_does(figures):
    for size in (4 * KiB, 256 * KiB):
        daemon, embedded = by(figures, "daemon", size), by(figures, "embedded", size)
        assert daemon.client_bytes == POOL // 2 and "max_bytes_per_client" in daemon.client_refusal
        assert daemon.pool_buffers == embedded.pool_buffers
        assert "max_bytes_per_client" not in daemon.pool_refusal
        assert daemon.p50_us is not None and daemon.transport in ("shm", "socket")


def test_a_size_above_the_pool_is_always_refused(figures):
    for where in ("embedded", "daemon"):
        f = by(figures, where, 2 * MiB)
        assert (f.p50_us, f.client_buffers, f.pool_buffers) == (None, 0, 0)


def test_summary_and_table_say_where_the_pool_runs_out(figures):
    report = Report({}, {"static_size": POOL}, static_pool=figures)
    (line,) = studyreport.static_pool_lines(report)
    assert "One client process is refused at its per-client bound, 512 KiB of the 1 MiB pool" in line
    assert "the pool itself runs out at 255 of 4 KiB (1020 KiB), 3 of 256 KiB (768 KiB), 2 MiB: none" in line
    table = studyreport.format_static_pool(report)
    assert "per-client bound" in table and "pool full" in table and "255 = 1020 KiB" in table
