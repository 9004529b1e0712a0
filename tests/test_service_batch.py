"""Batch.close in the pool-service client: idempotent like ``Shm.close()``.

A close queued in a :class:`~poolsvc.service.batch.Batch` takes effect when
the batch runs; when the Shm is released by then (closed before it was
queued, closed between queueing and running, or by an earlier close in the
same batch) the close gives None and sends nothing, so the daemon sees no
SHM_CLOSE for a cookie the client no longer holds.  The daemon's accounting
returns to its idle figures after each test (``checked_daemon``).
"""
from __future__ import annotations

import pytest

from poolsvc.errors import BadParameters
from poolsvc.service.client import connect

from svcutil import checked_daemon, idle


@pytest.fixture(params=["socket", "shm"])
def client(request, tmp_path):
    with checked_daemon(tmp_path / "d.sock") as daemon:
        with connect(daemon.path, transport=request.param) as c:
            yield c
        daemon.wait_for(idle(daemon.baseline))


def _closes_served(client) -> int:
    return client.service_stats()["requests"]["ops"].get("SHM_CLOSE", 0)


def test_close_of_a_released_shm_gives_none_and_sends_nothing(client):
    ctx = client.open_context()
    shm = ctx.alloc_user_buf(4096)
    shm.close()
    served = _closes_served(client)
    b = ctx.batch()
    b.close(shm)
    b.alloc_user_buf(100)
    results = b.run()
    assert results[0] is None and results[1].size == 4096
    assert _closes_served(client) == served
    assert ctx.deferred_errors == []
    results[1].close()


def test_more_closes_than_references_in_one_batch(client):
    ctx = client.open_context()
    shm = ctx.alloc_user_buf(4096)
    assert ctx.shm_from_id(shm.id) is shm  # two references
    served = _closes_served(client)
    b = ctx.batch()
    for _ in range(3):
        b.close(shm)
    assert b.run() == [None, None, None]
    assert shm.closed and ctx.usage()["shms"] == 0
    assert _closes_served(client) == served + 2
    assert client.stats()["contexts"][ctx.name]["shms"] == 0
    assert ctx.deferred_errors == []


def test_shm_closed_between_queueing_and_running(client):
    ctx = client.open_context()
    shm = ctx.alloc_kernel_buf(5000)
    b = ctx.batch()
    b.close(shm)
    shm.close()
    assert b.run() == [None]
    shm.close()  # still nothing to do
    ctx.flush()
    assert ctx.deferred_errors == []
    assert client.stats()["contexts"][ctx.name]["shms"] == 0


def test_close_of_another_contexts_shm_is_refused(client):
    a, b_ctx = client.open_context(), client.open_context()
    shm = a.alloc_user_buf(10)
    with pytest.raises(BadParameters):
        b_ctx.batch().close(shm)
    shm.close()
