"""Request counters and latency percentiles of the pool service.

The daemon records, per message type, how many requests it served and how
long each took from a complete frame to its queued reply (nanoseconds, the
daemon's own work; the socket round trip is the client's to measure).  The
latest ``window`` samples of each type are kept in a ring (one list store
per request on the hot path, which the transport inlines), so percentiles
cover recent traffic at a fixed memory cost.  Percentiles are read, on a
STATS request, from a :class:`~poolsvc.histogram.Histogram` of the samples
held: the histogram every latency figure of poolsvc comes from (exact to 3
significant digits).  Operations inside a BATCH are counted per type; the
batch's latency is recorded once, under BATCH.

Bounded whatever clients send: rings exist only for the request types of
:class:`~.protocol.MsgType` (created on first use), and every type number
that is not one is counted under one key, :data:`UNKNOWN` ("unknown"), with
no ring.  So the memory here is at most one ring per known type.

Invariant per ring: ``min(count, window) == number of samples held``;
``total_ns`` is the sum of all ``count`` samples, held or overwritten.

Concurrency: owned by the daemon's loop thread; :meth:`Metrics.snapshot`
is called from that thread too (STATS requests).
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ..histogram import Histogram
from .protocol import ErrorCode, MsgType, type_name

#: The key every message type number outside MsgType is counted under.
UNKNOWN = -1
#: Type numbers that get a ring and a counter of their own.
KNOWN_TYPES = frozenset(int(t) for t in MsgType)


class LatencyRing:
    """The last ``size`` latency samples (ns) of one message type, their count and
    the sum of every sample since start (``total_ns``)."""

    __slots__ = ("samples", "size", "count", "total_ns")

    def __init__(self, size: int) -> None:
        self.samples = [0] * size
        self.size = size
        self.count = 0
        self.total_ns = 0

    def add(self, ns: int) -> None:
        self.samples[self.count % self.size] = ns
        self.count += 1
        self.total_ns += ns

    def summary(self) -> dict[str, float]:
        """``count`` and ``sum_us`` (every request of the type so far) and, over the
        samples held, ``mean_us``, ``p50_us``, ``p90_us``, ``p99_us``, ``p999_us`` and
        ``max_us`` (:meth:`~poolsvc.histogram.Histogram.summary_us`)."""
        held = min(self.count, self.size)
        if not held:
            return {"count": self.count, "sum_us": self.total_ns / 1e3}
        out = Histogram.from_samples(self.samples[:held]).summary_us()
        out["count"] = self.count
        out["sum_us"] = self.total_ns / 1e3
        return out


class Metrics:
    """Counters of one daemon: requests, operations, errors, connections, latency."""

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self.started = time.time()
        self.rings: dict[int, LatencyRing] = {}
        self.ops: Counter[int] = Counter()
        self.errors: Counter[int] = Counter()
        self.connections = 0
        self.disconnects = 0
        self.crashes = 0          # connections that ended without GOODBYE
        self.refused = 0          # over max_clients, or failed handshakes
        self.protocol_errors = 0  # clients dropped for malformed traffic
        self.slot_turns = 0       # polled shm slots parked to give waiting ones their turn
        self.slot_extra_places = 0  # brief-lane slots polled in the extra place

    def ring(self, msg_type: int) -> LatencyRing | None:
        """The latency ring of a message type (created on first use); None for a
        type number outside MsgType."""
        ring = self.rings.get(msg_type)
        if ring is None and msg_type in KNOWN_TYPES:
            ring = self.rings[msg_type] = LatencyRing(self.window)
        return ring

    def record(self, msg_type: int, ns: int) -> None:
        """One request of ``msg_type`` served in ``ns`` nanoseconds (its ring and count)."""
        ring = self.rings.get(msg_type) or self.ring(msg_type)
        if ring is None:
            self.ops[UNKNOWN] += 1
            return
        ring.add(ns)
        if msg_type != _BATCH:
            self.ops[msg_type] += 1

    def add_ops(self, counts: dict[int, int]) -> None:
        """Count the operations of one BATCH (``counts``: type -> operations)."""
        ops = self.ops
        for msg_type, n in counts.items():
            ops[msg_type if msg_type in KNOWN_TYPES else UNKNOWN] += n

    def snapshot(self) -> dict[str, Any]:
        """All figures as plain data (names, not numbers, as keys)."""
        return {
            "uptime_s": time.time() - self.started,
            "window": self.window,
            "connections": self.connections,
            "disconnects": self.disconnects,
            "crashes": self.crashes,
            "refused": self.refused,
            "protocol_errors": self.protocol_errors,
            "slot_turns": self.slot_turns,
            "slot_extra_places": self.slot_extra_places,
            "ops": {_type_name(t): n for t, n in sorted(self.ops.items())},
            "errors": {_error_name(c): n for c, n in sorted(self.errors.items())},
            "latency": {type_name(t): ring.summary() for t, ring in sorted(self.rings.items())},
        }


_BATCH = int(MsgType.BATCH)


class RateLimit:
    """At most one event per ``interval`` seconds per key (for logs a client can provoke)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        #: key -> [time of the last event let through, events dropped since]; one
        #: entry per key the daemon's code names (a fixed set).
        self.keys: dict[str, list[float]] = {}

    def allow(self, key: str) -> int | None:
        """None to drop this event; else how many were dropped before it."""
        now = time.monotonic()
        entry = self.keys.get(key)
        if entry is None:
            self.keys[key] = [now, 0]
            return 0
        if now - entry[0] < self.interval:
            entry[1] += 1
            return None
        dropped = int(entry[1])
        entry[0], entry[1] = now, 0
        return dropped


def _type_name(msg_type: int) -> str:
    return "unknown" if msg_type == UNKNOWN else type_name(msg_type)


def _error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code-{code}"
