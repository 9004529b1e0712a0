"""Slices of a large BATCH: bounded by count (``batch_slice``) and by time (``batch_slice_us``).

The daemon runs in a thread of the test (``svcutil.DaemonThread``); the clock
the slices read is replaced by one that the test drives, so the number of
slices and their sizes follow from the settings alone, never from how fast
the machine is.  How the bound shows in latencies is measured by
``bench/fairness.py`` (docs/security.md, "Fairness"), not here.
"""
from __future__ import annotations

import pytest

from poolsvc.errors import ConfigError
from poolsvc.service import handlers as H
from poolsvc.service import protocol as P
from poolsvc.service import slot as S
from poolsvc.service.client import connect
from poolsvc.service.settings import ServiceSettings

from svcutil import DaemonThread, RawClient
from waiting import wait_until

COUNT = 4096


def _ping_batch(count: int) -> bytes:
    return P.frame(P.MsgType.BATCH, b"".join(P.frame(P.MsgType.PING, i.to_bytes(8, "little"))
                                             for i in range(count)))


@pytest.fixture
def slices(monkeypatch):
    """The sizes of the slices the daemon runs (one entry per ``_run_batch_slice`` call)."""
    sizes: list[int] = []
    run_slice = H.Handlers._run_batch_slice

    def counted(self, conn):  # runs on the daemon's loop thread
        before, total = conn.batch.next, len(conn.batch.frames)
        run_slice(self, conn)
        sizes.append((conn.batch.next if conn.batch is not None else total) - before)

    monkeypatch.setattr(H.Handlers, "_run_batch_slice", counted)
    return sizes


def _serve_one_batch(tmp_path, monkeypatch, cost_ns=None, **settings):
    """Serve one BATCH of COUNT PINGs; with ``cost_ns``, the slices read a clock that
    advances by that much per request run (and by nothing else)."""
    d = DaemonThread(tmp_path / "b.sock", **settings)
    try:
        if cost_ns is not None:
            now = [0]
            ping = d.server._batch_handlers[P.MsgType.PING]

            def costly_ping(conn, body):  # runs on the daemon's loop thread
                now[0] += cost_ns
                return ping(conn, body)

            d.server._batch_handlers[P.MsgType.PING] = costly_ping
            monkeypatch.setattr(H, "_clock_ns", lambda: now[0])
        a = RawClient(d.path, name=b"batcher")
        a.send(_ping_batch(COUNT) + P.frame(P.MsgType.PING, b"after"))
        kind, body = a.recv()
        assert kind == P.MsgType.BATCH_REPLY
        replies = [(t, bytes(r)) for t, r in P.iter_frames(body, COUNT, 1 << 20)]
        assert replies == [(P.MsgType.OK, i.to_bytes(8, "little")) for i in range(COUNT)]
        assert a.recv() == (P.MsgType.OK, b"after")  # order kept behind the batch
        a.close()
    finally:
        d.stop()


def test_a_slice_stops_at_its_time_bound(tmp_path, monkeypatch, slices):
    """Requests of 100 us against a bound of 500 us: the batch's first request runs
    alone (its cost is unknown), then each slice runs the five that fit."""
    _serve_one_batch(tmp_path, monkeypatch, 100_000, batch_slice=64, batch_slice_us=500)
    assert slices == [5] * (COUNT // 5) + [COUNT % 5]


def test_requests_costlier_than_the_bound_run_one_per_slice(tmp_path, monkeypatch, slices):
    _serve_one_batch(tmp_path, monkeypatch, 2_000_000, batch_slice=64, batch_slice_us=500)
    assert slices == [1] * COUNT


def test_cheap_requests_fill_the_count(tmp_path, monkeypatch, slices):
    """Requests of 1 us: the count ends every slice (the first one too, after its
    single first request and chunks of H._SLICE_CHECK)."""
    _serve_one_batch(tmp_path, monkeypatch, 1_000, batch_slice=64, batch_slice_us=500)
    assert slices == [64] * (COUNT // 64)


def test_no_time_bound_runs_whole_count_slices(tmp_path, monkeypatch, slices):
    _serve_one_batch(tmp_path, monkeypatch, 2_000_000, batch_slice=100, batch_slice_us=0)
    assert slices == [100] * (COUNT // 100) + [COUNT % 100]


def test_a_still_clock_leaves_the_count_alone_in_charge(tmp_path, monkeypatch, slices):
    _serve_one_batch(tmp_path, monkeypatch, 0, batch_slice=64, batch_slice_us=500)
    assert slices == [64] * (COUNT // 64)


def test_a_finished_batch_goes_to_its_receiver(tmp_path):
    """``_start_batch(..., on_done)``: the BATCH_REPLY frame goes to ``on_done``, not the
    socket (the way for the shm slot's server to serve a large BATCH in slices)."""
    d = DaemonThread(tmp_path / "d.sock", batch_slice=16)
    got: list[bytes] = []
    started: list[bool] = []
    body = _ping_batch(100)[P.HEADER_SIZE:]
    ping = d.server._context_handlers[P.MsgType.PING]

    def ping_that_starts_a_batch(conn, payload):  # on the loop thread
        if bytes(payload) == b"start":
            started.append(d.server._start_batch(conn, body, lambda c, reply: got.append(reply)))
        return ping(conn, payload)

    d.server._context_handlers[P.MsgType.PING] = ping_that_starts_a_batch
    try:
        a = RawClient(d.path, name=b"batcher")
        assert a.call(P.MsgType.PING, b"start") == (P.MsgType.OK, b"start")
        wait_until(lambda: got, what="the batch's reply")
        assert a.call(P.MsgType.PING, b"after") == (P.MsgType.OK, b"after")  # nothing on the socket
        assert started == [True] and len(got) == 1
        length, kind, _ = P.HEADER.unpack_from(got[0])
        assert kind == P.MsgType.BATCH_REPLY and length == len(got[0]) - P.HEADER_SIZE
        replies = [(t, bytes(r)) for t, r in P.iter_frames(got[0][P.HEADER_SIZE:], 100, 1 << 20)]
        assert replies == [(P.MsgType.OK, i.to_bytes(8, "little")) for i in range(100)]
        a.close()
    finally:
        d.stop()


@pytest.mark.parametrize("value", [-1, 1_000_001, 1.5, True])
def test_batch_slice_us_is_validated(value):
    with pytest.raises(ConfigError, match="batch_slice_us"):
        ServiceSettings(batch_slice_us=value)


def test_a_large_batch_in_a_shm_slot_is_served_in_slices(tmp_path, slices):
    """A BATCH published in a slot, behind a pipelined close and before nothing else,
    runs in slices; its replies (with the descriptors of new arena segments) reach
    the client in order, and the slot serves the next request after it."""
    d = DaemonThread(tmp_path / "s.sock", batch_slice=64)
    try:
        with connect(d.path, transport="shm") as client:
            ctx = client.open_context("slotted")
            first = ctx.alloc_user_buf(4096)
            first.close()  # pipelined: rides in the slot ahead of the BATCH
            count = (S.SLOT_REQ_CAP - 64) // (P.HEADER_SIZE + P.ALLOC.size)
            batch = ctx.batch()
            for _ in range(count):
                batch.alloc_user_buf(4096)
            shms = batch.run()
            assert len(shms) == count and all(s.size == 4096 for s in shms)
            for i, shm in enumerate(shms):
                shm.buf[:8] = i.to_bytes(8, "little")
            assert all(bytes(s.buf[:8]) == i.to_bytes(8, "little") for i, s in enumerate(shms))
            # (the last slice is counted once run_slice returns, after the reply went out)
            wait_until(lambda: sum(slices) == count, what="the last slice counted")
            assert len(slices) >= count // 64
            [entry] = [c for c in d.stats()["clients"] if c["name"] == "slotted"]
            assert entry["transport"] == "shm" and entry["shms"] == count
            assert client.ping(b"after") == b"after"
    finally:
        d.stop()
