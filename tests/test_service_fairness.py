"""Slices of a large BATCH: bounded by count (``batch_slice``) and by time (``batch_slice_us``).

The daemon runs in a thread of the test (``svcutil.DaemonThread``); the clock
the slices read is replaced by one that the test drives, so the number of
slices and their sizes follow from the settings alone, never from how fast
the machine is.  How the bound shows in latencies is measured by
``bench/fairness.py`` (docs/security.md, "Fairness"), not here.
"""
from __future__ import annotations

import itertools

import pytest

from poolsvc.errors import ConfigError
from poolsvc.service import handlers as H
from poolsvc.service import protocol as P
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
        before = conn.batch.next
        run_slice(self, conn)
        sizes.append((conn.batch.next if conn.batch is not None else COUNT) - before)

    monkeypatch.setattr(H.Handlers, "_run_batch_slice", counted)
    return sizes


def _serve_one_batch(tmp_path, **settings):
    d = DaemonThread(tmp_path / "b.sock", **settings)
    try:
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
    """Every reading of the clock finds 1 ms gone: each slice runs one check's worth
    (H._SLICE_CHECK requests) and yields, well before its count bound."""
    ticks = itertools.count(step=1_000_000)
    monkeypatch.setattr(H, "_clock_ns", lambda: next(ticks))
    _serve_one_batch(tmp_path, batch_slice=64, batch_slice_us=500)
    assert sum(slices) == COUNT
    assert slices == [H._SLICE_CHECK] * (COUNT // H._SLICE_CHECK)


def test_a_slice_stops_at_its_count_when_time_allows(tmp_path, monkeypatch, slices):
    """A clock that stands still never ends a slice: the count does."""
    monkeypatch.setattr(H, "_clock_ns", lambda: 0)
    _serve_one_batch(tmp_path, batch_slice=64, batch_slice_us=500)
    assert slices == [64] * (COUNT // 64)


def test_no_time_bound_runs_whole_count_slices(tmp_path, monkeypatch, slices):
    ticks = itertools.count(step=1_000_000)
    monkeypatch.setattr(H, "_clock_ns", lambda: next(ticks))
    _serve_one_batch(tmp_path, batch_slice=100, batch_slice_us=0)
    assert slices == [100] * (COUNT // 100) + [COUNT % 100]


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
