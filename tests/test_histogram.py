"""Tests of the latency histogram (poolsvc/histogram.py).

Every latency figure ``poolsvc load`` prints and the daemon's STATS reports
is read from these histograms, so they
must be exact to 3 significant digits whatever the scale: each percentile is
compared with the exact order statistic of the same samples (numpy's
sorted array), over latencies from nanoseconds to minutes.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from poolsvc.histogram import EXACT_BELOW, FEW_SAMPLES, Histogram, bucket_bounds, index_of, indices

QS = (0.0, 0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0)


def _exact(values: np.ndarray, q: float) -> float:
    """The ceil(q * n)-th smallest value (nearest rank, at least the first)."""
    ordered = np.sort(values)
    return float(ordered[max(1, math.ceil(q * len(values))) - 1])


def _close(got: float, want: float) -> bool:
    """Equal to 3 significant digits: within half a bucket (1/2048 of the value)."""
    return abs(got - want) <= max(want / 2048, 0.5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_are_exact_to_three_significant_digits(seed):
    rng = np.random.default_rng(seed)
    values = np.exp(rng.uniform(0, math.log(1e11), 20000)).astype(np.int64)  # 1 ns .. 100 s
    one_by_one = Histogram()
    for v in values.tolist():
        one_by_one.add(v)
    from_array = Histogram.from_samples(values)
    assert one_by_one.to_wire() == from_array.to_wire()
    for q, got in zip(QS, one_by_one.percentiles(QS)):
        assert _close(got, _exact(values, q)), (q, got, _exact(values, q))
    assert one_by_one.min_ns == values.min() and one_by_one.max_ns == values.max()
    assert one_by_one.sum_ns == values.sum() and one_by_one.count == len(values)


@pytest.mark.parametrize("n", [0, 1, FEW_SAMPLES - 1, FEW_SAMPLES, 3 * FEW_SAMPLES])
def test_a_short_list_and_an_array_give_the_same_histogram(n):
    """from_samples counts a short list one by one and anything else with numpy:
    both give the histogram of adding each latency (negative ones count as 0)."""
    rng = np.random.default_rng(n)
    values = np.exp(rng.uniform(0, math.log(1e11), n)).astype(np.int64) - 2
    one_by_one = Histogram()
    for v in values.tolist():
        one_by_one.add(v)
    want = one_by_one.to_wire()
    assert Histogram.from_samples(values.tolist()).to_wire() == want
    assert Histogram.from_samples(values).to_wire() == want


def test_close_latencies_keep_their_own_p50():
    """Four operations whose medians differ by 1.5% get four different p50s."""
    p50s = []
    for median_us in (190.0, 193.0, 196.0, 199.0):
        h = Histogram.from_samples(np.full(101, int(median_us * 1000)) + np.arange(-50, 51))
        p50s.append(h.summary_us()["p50_us"])
    assert [round(p) for p in p50s] == [190, 193, 196, 199]  # 3 significant digits


def test_bucket_layout():
    """Buckets tile the integers: each value lies in its bucket, widths stay within
    1/1024 of the bucket's lowest value, the scalar and array index agree."""
    probes = sorted({*range(0, 5000), *(1 << k for k in range(60)), *((1 << k) - 1 for k in range(1, 60)),
                     *np.random.default_rng(9).integers(1, 1 << 52, 5000).tolist()})
    probes = [v for v in probes if v < 1 << 53]
    arr = indices(np.array(probes, dtype=np.int64))
    for v, i in zip(probes, arr.tolist()):
        assert index_of(v) == i
        low, width = bucket_bounds(i)
        assert low <= v < low + width
        assert width == 1 if v < EXACT_BELOW else width * 1024 <= low
    lows, widths = bucket_bounds(np.arange(0, 40000))
    assert (lows[1:] == lows[:-1] + widths[:-1]).all()  # consecutive, no gap, no overlap
    assert index_of(-5) == 0


def test_merge_and_wire_round_trip():
    rng = np.random.default_rng(4)
    a_vals, b_vals = rng.integers(500, 10**7, 3000), rng.integers(10**5, 10**9, 2000)
    a, b = Histogram.from_samples(a_vals), Histogram.from_samples(b_vals)
    merged = Histogram.from_wire(json.loads(json.dumps(a.to_wire())))
    merged.merge(Histogram.from_wire(json.loads(json.dumps(b.to_wire()))))
    merged.merge(Histogram())  # an empty interval changes nothing
    assert merged.to_wire() == Histogram.from_samples(np.concatenate([a_vals, b_vals])).to_wire()
    empty = Histogram()
    empty.merge(b)
    assert empty.min_ns == b.min_ns and empty.to_wire() == b.to_wire()


def test_weighted_add_equals_repeated_adds():
    one, many = Histogram(), Histogram()
    one.add(12345, 40)
    for _ in range(40):
        many.add(12345)
    assert one.to_wire() == many.to_wire()


def test_empty_and_single_value():
    assert Histogram().percentiles((0.5, 0.99)) == [0.0, 0.0]
    assert Histogram().summary_us()["p50_us"] == 0.0
    h = Histogram()
    h.add(123456789)
    assert h.percentiles((0.0, 0.5, 1.0)) == [123456789.0] * 3  # clamped to min and max
