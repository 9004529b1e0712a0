"""The daemon's request metrics (poolsvc/service/metrics.py) and their rendering
(poolsvc/service/render.py).

Percentiles come from :class:`poolsvc.histogram.Histogram` over the latest
``window`` samples of each message type: equal to the histogram of exactly
those samples (the older ones fall out), exact to 3 significant digits
against numpy's order statistics; no state for type numbers outside MsgType;
a live daemon's STATS document renders as text and as Prometheus samples
with the same figures.
"""
from __future__ import annotations

import math

import numpy as np

from poolsvc.histogram import Histogram
from poolsvc.service import protocol as P
from poolsvc.service import render
from poolsvc.service.client import connect
from poolsvc.service.metrics import UNKNOWN, Metrics

from svcutil import DaemonThread

ALLOC = int(P.MsgType.ALLOC)
KEYS = ("mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us")


def test_percentiles_are_the_histogram_of_the_latest_window():
    rng = np.random.default_rng(7)
    old = rng.integers(1_000_000, 2_000_000, 300)   # pushed out of the window
    recent = rng.lognormal(9, 1.2, 256).astype(np.int64) + 1
    m = Metrics(window=256)
    for ns in np.concatenate([old, recent]).tolist():
        m.record(ALLOC, ns)
    lat = m.snapshot()["latency"]["ALLOC"]
    assert lat["count"] == 556 and m.ops[ALLOC] == 556
    want = Histogram.from_samples(recent).summary_us()
    assert {k: lat[k] for k in KEYS} == {k: want[k] for k in KEYS}
    ordered = np.sort(recent)
    for key, q in (("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)):
        exact = ordered[max(1, math.ceil(q * len(ordered))) - 1] / 1000.0
        assert abs(lat[key] - exact) <= max(exact / 1000, 0.01), (key, lat[key], exact)
    assert lat["max_us"] == round(recent.max() / 1000.0, 2) < 1000.0


def test_a_type_with_fewer_samples_than_the_window():
    m = Metrics(window=4096)
    for ns in (1000, 2000, 3000):
        m.record(ALLOC, ns)
    lat = m.snapshot()["latency"]["ALLOC"]
    assert (lat["count"], lat["p50_us"], lat["max_us"], lat["mean_us"]) == (3, 2.0, 3.0, 2.0)


def test_a_ring_sums_every_sample_since_start():
    m = Metrics(window=4)
    for ns in range(1000, 11000, 1000):  # ten samples, six of them overwritten
        m.record(int(P.MsgType.ALLOC), ns)
    lat = m.snapshot()["latency"]["ALLOC"]
    assert lat["count"] == 10 and lat["sum_us"] == 55.0
    assert lat["max_us"] == 10.0 and round(lat["mean_us"], 1) == 8.5  # the window: 7, 8, 9, 10


def test_unknown_types_keep_no_state():
    strangers = [n for n in range(0, 1 << 16, 97) if n not in {int(t) for t in P.MsgType}]
    m = Metrics(window=64)
    for number in strangers:
        m.record(number, 100)
    m.add_ops({strangers[0]: 5})
    assert m.rings == {} and m.ops == {UNKNOWN: len(strangers) + 5}
    assert m.snapshot()["latency"] == {} and m.snapshot()["ops"] == {"unknown": len(strangers) + 5}


def test_stats_of_a_live_daemon_render(tmp_path):
    daemon = DaemonThread(tmp_path / "d.sock", latency_window=64)
    try:
        with connect(daemon.path) as client:
            ctx = client.open_context()
            for _ in range(100):
                ctx.alloc_user_buf(4096).close()
            doc = client.service_stats()
    finally:
        daemon.stop()
    lat = doc["requests"]["latency"]["ALLOC"]
    assert lat["count"] == 100 and doc["requests"]["window"] == 64
    assert 0 < lat["p50_us"] <= lat["p90_us"] <= lat["p99_us"] <= lat["p999_us"] <= lat["max_us"]
    text = render.text(doc)
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("ALLOC "))
    assert row[1] == "100" and float(row[2]) == round(lat["p50_us"], 1)
    assert "p99.9 us" in text
    prom = render.prometheus(doc)
    for key, quantile in (("p50_us", "0.5"), ("p999_us", "0.999")):
        line = f'poolsvc_request_latency_seconds{{type="ALLOC",quantile="{quantile}"}} {lat[key] / 1e6}'
        assert line in prom.splitlines()
    # a summary's _sum and _count cover every request since start, not the window's 64
    assert 'poolsvc_request_latency_seconds_count{type="ALLOC"} 100' in prom
    assert f'poolsvc_request_latency_seconds_sum{{type="ALLOC"}} {lat["sum_us"] / 1e6}' in prom
    assert lat["sum_us"] > 0
