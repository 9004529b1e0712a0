"""``poolsvc load``: multi-process load tests of the pool service, with invariant checks.

Modules, one concern each:

- :mod:`.mix` - the run's spec: operation mix, size distribution, bounds, fault rates;
- :mod:`.worker` - the client process: set-up, loop, report lines; with
  :mod:`.ledger` (what it holds, patterns, its own checks), :mod:`.generate`
  (drawing operations) and :mod:`.operations` (running each kind);
- :mod:`.faults` - malformed requests on raw sockets, with the replies they must get;
- :mod:`.invariants` - the daemon-wide checks (accounting equations, leaks);
- :mod:`.trace` - recording and replaying a run's operation stream;
- :mod:`.runner` - the orchestration: service, workers, kills, progress, the report;
- :mod:`.report` - the report as text, the comparison of two, plots.

Latencies are counted in :class:`poolsvc.histogram.Histogram`, the one histogram
every latency figure of poolsvc is read from.
"""
from .mix import LoadSpec, OpMix, SizeDist

__all__ = ["LoadSpec", "OpMix", "SizeDist"]
