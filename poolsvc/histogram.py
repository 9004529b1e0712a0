"""Latency histograms exact to 3 significant digits: the one place poolsvc's latency
percentiles are computed (the load harness's workers and runner, the daemon's
request metrics in :mod:`poolsvc.service.metrics`).

A :class:`Histogram` counts latencies (integer nanoseconds) in log-linear
buckets, the layout of HdrHistogram with 3 significant digits: values below
2,048 ns have one bucket each (exact); above, every power of two
``[2**k, 2**(k+1))`` is cut into 1,024 equal buckets of width ``2**(k-10)``.
A bucket's width is therefore at most 1/1,024 of its lower bound, and a
percentile read as the bucket's middle is within 0.05% of a recorded value
(3 significant digits), from nanoseconds to days.  Merging two histograms
is adding counts.

Bucket index of a latency ``v``: with ``s = max(0, v.bit_length() - 11)``,
``index = (s << 10) + (v >> s)`` (:func:`index_of`; :func:`indices` is the
same over a numpy array).  Buckets are kept sparse (``{index: count}``):
adding a latency is one dict update in plain Python; percentiles are read
with numpy over the occupied buckets.

Histograms travel (the load workers send the counts of each interval to
the runner) as ``[count, sum_ns, min_ns, max_ns, [[index, n], ...]]``
(:meth:`Histogram.to_wire`); nothing is sampled away.  Memory: one dict
entry per occupied bucket, so never more entries than latencies counted.

Invariant: ``count == sum(buckets.values())``; ``sum_ns``, ``min_ns`` and
``max_ns`` are exact.  Latencies must be below ``2**53`` ns (104 days).

Concurrency: a Histogram belongs to one thread.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

#: Significant decimal digits every bucket keeps.
SIGNIFICANT_DIGITS = 3
#: log2 of the buckets per power of two above the exact range: 2**10 >= 10**3.
SUB_BITS = 10
#: Values below this have a bucket each.
EXACT_BELOW = 1 << (SUB_BITS + 1)
#: Below this many samples (in a list), :meth:`Histogram.from_samples` counts them
#: one by one: a load worker reporting four times a second among hundreds of
#: others holds a few dozen.
FEW_SAMPLES = 96


def index_of(ns: int) -> int:
    """The bucket of a latency in nanoseconds (negative latencies count as 0)."""
    shift = ns.bit_length() - (SUB_BITS + 1)
    if shift > 0:
        return (shift << SUB_BITS) + (ns >> shift)
    return ns if ns > 0 else 0


def indices(values: Any) -> np.ndarray:
    """:func:`index_of` over an array of latencies in nanoseconds."""
    v = np.maximum(np.asarray(values, dtype=np.int64), 0)
    bit_length = np.frexp(v.astype(np.float64))[1].astype(np.int64)  # exact below 2**53
    shift = np.maximum(bit_length - (SUB_BITS + 1), 0)
    return (shift << SUB_BITS) + (v >> shift)


def bucket_bounds(index: Any) -> tuple[Any, Any]:
    """The lowest latency of bucket(s) ``index`` and the bucket width (ns); works on
    ints and on numpy arrays."""
    idx = np.asarray(index, dtype=np.int64)
    shift = np.maximum((idx >> SUB_BITS) - 1, 0)
    low = (idx - (shift << SUB_BITS)) << shift
    if np.ndim(index) == 0:
        return int(low), 1 << int(shift)
    return low, np.left_shift(1, shift)


class Histogram:
    """Counts of latencies by log-linear bucket, plus the exact count, sum, minimum and maximum."""

    __slots__ = ("buckets", "count", "sum_ns", "min_ns", "max_ns")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum_ns = 0
        self.min_ns = 0
        self.max_ns = 0

    def add(self, ns: int, n: int = 1) -> None:
        """Count ``n`` latencies of ``ns`` nanoseconds each (a batch adds its per-operation
        latency once, with its operation count: the same as ``n`` calls with ``n=1``)."""
        b = index_of(ns)
        buckets = self.buckets
        buckets[b] = buckets.get(b, 0) + n
        if not self.count or ns < self.min_ns:
            self.min_ns = ns
        if ns > self.max_ns:
            self.max_ns = ns
        self.count += n
        self.sum_ns += ns * n

    @classmethod
    def from_samples(cls, values: Any) -> "Histogram":
        """A histogram of latencies in nanoseconds: a list of fewer than
        :data:`FEW_SAMPLES` is counted one by one, anything else with numpy
        (whose dozen array calls cost more than a short loop)."""
        h = cls()
        if type(values) is list and len(values) < FEW_SAMPLES:
            for ns in values:
                h.add(ns)
            return h
        v = np.asarray(values, dtype=np.int64)
        if v.size:
            idx, counts = np.unique(indices(v), return_counts=True)
            h.buckets = dict(zip(idx.tolist(), counts.tolist()))
            h.count, h.sum_ns = int(v.size), int(v.sum())
            h.min_ns, h.max_ns = int(v.min()), int(v.max())
        return h

    def merge(self, other: "Histogram") -> None:
        """Add ``other``'s counts to this one."""
        if not other.count:
            return
        buckets = self.buckets
        for b, n in other.buckets.items():
            buckets[b] = buckets.get(b, 0) + n
        self.min_ns = other.min_ns if not self.count else min(self.min_ns, other.min_ns)
        self.max_ns = max(self.max_ns, other.max_ns)
        self.count += other.count
        self.sum_ns += other.sum_ns

    def percentiles(self, qs: Sequence[float]) -> list[float]:
        """The latency (ns) at each fraction ``q`` of ``qs``: the middle of the bucket
        holding the ``ceil(q * count)``-th smallest latency, clamped to [min, max]
        (all 0 if empty)."""
        if not self.count:
            return [0.0 for _ in qs]
        idx = np.fromiter(self.buckets, dtype=np.int64, count=len(self.buckets))
        order = np.argsort(idx)
        idx = idx[order]
        cum = np.cumsum(np.fromiter(self.buckets.values(), dtype=np.int64,
                                    count=len(self.buckets))[order])
        ranks = np.maximum(np.ceil(np.asarray(qs, dtype=np.float64) * self.count), 1)
        at = np.minimum(np.searchsorted(cum, ranks, side="left"), len(idx) - 1)
        low, width = bucket_bounds(idx[at])
        middle = low + (width - 1) / 2.0
        return np.clip(middle, self.min_ns, self.max_ns).astype(float).tolist()

    def percentile(self, q: float) -> float:
        """The latency (ns) below which a fraction ``q`` of the samples fall (0 if empty)."""
        return self.percentiles((q,))[0]

    def summary_us(self) -> dict[str, float]:
        """count, mean, p50, p90, p99, p99.9 and max in microseconds."""
        def us(ns: float) -> float:
            return round(ns / 1000.0, 2)

        p50, p90, p99, p999 = self.percentiles((0.50, 0.90, 0.99, 0.999))
        return {"count": self.count, "mean_us": us(self.sum_ns / self.count) if self.count else 0.0,
                "p50_us": us(p50), "p90_us": us(p90), "p99_us": us(p99), "p999_us": us(p999),
                "max_us": us(self.max_ns)}

    def to_wire(self) -> list[Any]:
        """``[count, sum_ns, min_ns, max_ns, [[index, n], ...]]`` (JSON-ready)."""
        return [self.count, self.sum_ns, self.min_ns, self.max_ns, sorted(self.buckets.items())]

    @classmethod
    def from_wire(cls, doc: Iterable[Any]) -> "Histogram":
        count, sum_ns, min_ns, max_ns, pairs = doc
        h = cls()
        h.count, h.sum_ns, h.min_ns, h.max_ns = int(count), int(sum_ns), int(min_ns), int(max_ns)
        h.buckets = {int(b): int(n) for b, n in pairs}
        return h


def percentiles_us(seconds: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The latencies (µs) at each fraction of ``qs``, of durations given in seconds,
    through the one histogram (3 significant digits)."""
    ns = np.round(np.asarray(seconds, dtype=np.float64) * 1e9)
    return [v / 1000.0 for v in Histogram.from_samples(ns).percentiles(qs)]
