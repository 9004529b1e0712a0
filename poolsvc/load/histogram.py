"""Latency histograms that workers fill and the runner merges.

A :class:`Histogram` counts latencies in logarithmic buckets: bucket ``b``
holds latencies in ``[2**(b/8), 2**((b+1)/8))`` nanoseconds, so a percentile
read from it is within 9% of the true value whatever the scale (a few
hundred nanoseconds to seconds), and merging two histograms is adding
counts.  Workers send the counts of each interval (deltas) to the runner as
``[[bucket, count], ...]``; nothing is sampled away.

Invariant: ``count == sum(buckets.values())``; ``max_ns`` is exact.

Concurrency: a Histogram belongs to one thread.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

#: Buckets per power of two.
STEPS = 8
_LOG2 = math.log2


def bucket_of(ns: int) -> int:
    """The bucket of a latency in nanoseconds (latencies below 1 ns go to bucket 0)."""
    return int(_LOG2(ns) * STEPS) if ns > 1 else 0


def bucket_mid_ns(bucket: int) -> float:
    """A representative latency of a bucket: the geometric middle of its bounds."""
    return 2.0 ** ((bucket + 0.5) / STEPS)


class Histogram:
    """Counts of latencies by logarithmic bucket, plus the exact sum and maximum."""

    __slots__ = ("buckets", "count", "sum_ns", "max_ns")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum_ns = 0
        self.max_ns = 0

    def add(self, ns: int, n: int = 1) -> None:
        """Count ``n`` latencies of ``ns`` nanoseconds each (a batch adds its per-operation
        latency once, with its operation count: the same as ``n`` calls with ``n=1``)."""
        b = int(_LOG2(ns) * STEPS) if ns > 1 else 0
        self.buckets[b] = self.buckets.get(b, 0) + n
        self.count += n
        self.sum_ns += ns * n
        if ns > self.max_ns:
            self.max_ns = ns

    def merge(self, other: "Histogram") -> None:
        for b, n in other.buckets.items():
            self.buckets[b] = self.buckets.get(b, 0) + n
        self.count += other.count
        self.sum_ns += other.sum_ns
        self.max_ns = max(self.max_ns, other.max_ns)

    def percentile(self, q: float) -> float:
        """The latency (ns) below which a fraction ``q`` of the samples fall (0 if empty)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= rank:
                return min(bucket_mid_ns(b), float(self.max_ns))
        return float(self.max_ns)

    def summary_us(self) -> dict[str, float]:
        """count, mean, p50, p90, p99, p99.9 and max in microseconds."""
        def us(ns: float) -> float:
            return round(ns / 1000.0, 2)

        return {"count": self.count, "mean_us": us(self.sum_ns / self.count) if self.count else 0.0,
                "p50_us": us(self.percentile(0.50)), "p90_us": us(self.percentile(0.90)),
                "p99_us": us(self.percentile(0.99)), "p999_us": us(self.percentile(0.999)),
                "max_us": us(self.max_ns)}

    def to_wire(self) -> list[Any]:
        """``[count, sum_ns, max_ns, [[bucket, n], ...]]`` (JSON-ready)."""
        return [self.count, self.sum_ns, self.max_ns, sorted(self.buckets.items())]

    @classmethod
    def from_wire(cls, doc: Iterable[Any]) -> "Histogram":
        count, sum_ns, max_ns, pairs = doc
        h = cls()
        h.count, h.sum_ns, h.max_ns = int(count), int(sum_ns), int(max_ns)
        h.buckets = {int(b): int(n) for b, n in pairs}
        return h

    def reset(self) -> None:
        self.buckets = {}
        self.count = self.sum_ns = self.max_ns = 0
