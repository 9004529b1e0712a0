"""A load-test client process: drives one context of the daemon and checks its own buffers.

Forked by the run's fork server (:mod:`.forkserver`), which calls
:func:`main` with the spec as JSON (``python -m poolsvc.load.worker
SPEC_JSON`` runs one by hand); it talks
to the daemon only through ``poolsvc.connect(path)`` (the public client
API), and to the runner only through its stdout, one JSON object per line:

- ``{"k": "ready", "pid": ..., "pool": ...}`` once connected; with
  ``start == "wait"`` it then waits for ``go DEADLINE`` (wall clock) on its
  stdin, so that every client of a run starts at once;
- ``{"k": "tick", ...}`` every ``tick`` seconds: operation counts, errors by
  type, latency histograms, violations and the CPU seconds spent (``cpu``,
  ``cpu_sys`` of them in the kernel) *since the previous line*;
- ``{"k": "exit", ...}`` the last delta, after every buffer was freed.

What it checks (each failure is a *violation* line, never an exception):

- every buffer it allocates or registers gets a pattern naming its owner
  (slot, generation, handle): the whole buffer for single operations, the
  first and last 16 bytes for batched ones; before each free the pattern is
  read back, and ``invoke`` has the secure world's SHA-256 app hash the
  buffer and compares the digest with the pattern's.  Bytes written by
  another client mean one physical frame had two owners;
- no page address of a new user or kernel buffer (which owns whole pages,
  in either pool) belongs to one of its own live buffers;
- ``lookup`` by id gives back the same buffer.

The worker is assembled from one module per concern: :mod:`.ledger` (what
it holds and the checks), :mod:`.generate` (drawing operations),
:mod:`.operations` (running and timing each kind); this module holds the
set-up, the loop and the report lines.

Generation: with ``replay`` empty, the worker draws operations from the mix
(seeded ``random.Random``) as tuples and, with ``trace`` set, writes each one
as a trace line (:mod:`poolsvc.load.trace`: ``format_op``; text is made only
then).  With ``replay`` set it parses that file's lines into the same tuples
(``parse_op``) and runs them instead, skipping those whose buffer does not exist here (an
allocation that failed under this configuration), and with
``replay_end == "kill"`` SIGKILLs itself after the last line, as the
recorded process was.

Concurrency: one thread.  Bounded: the loop ends at ``deadline`` (wall
clock) or after ``ops`` operations, whichever is first; a lost connection
ends it at once (exit status 3).
"""
from __future__ import annotations

import gc
import json
import mmap
import os
import random
import resource
import signal
import sys
import time
from collections import defaultdict
from typing import Any, Iterator

from ..constants import GenCaps
from ..errors import PoolsvcError
from .generate import Generator, Op
from ..histogram import Histogram
from .ledger import Held
from .mix import BATCHABLE, REGION_SIZE, OpMix, SizeDist
from .operations import METHODS, ConnectionLost, Operations
from .trace import format_op, parse_op

EXIT_LOST = 3


class Worker(Generator, Operations):
    """One client of the daemon: set-up, the loop, the report lines (the rest is inherited)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import poolsvc

        self.spec = spec
        self.slot = int(spec["slot"])
        self.gen = int(spec["gen"])
        self.rng = random.Random(f"{spec['seed']}/{self.slot}/{self.gen}")
        self.mix = OpMix.parse(spec["mix"])
        self.size = SizeDist.parse(spec["sizes"]).sampler(self.rng)
        self.batch_size = int(spec["batch"])
        self.max_live = int(spec["max_live"])
        self.exhaust = bool(spec["exhaust"])
        self.deadline = float(spec["deadline"])
        self.budget = int(spec["ops"]) or (1 << 62)
        self.tick_s = float(spec.get("tick", 0.25))
        self.out = sys.stdout
        # figures since the previous report line
        self.samples: defaultdict[str, list[int]] = defaultdict(list)
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.hists: dict[str, Histogram] = {}
        #: CPU seconds of this process (user, system) when the previous report line was written.
        self.cpu_mark = _cpu()
        self.violations: list[str] = []
        self.done = 0
        self.skipped = 0
        self.unverified = 0
        self.daemon_private = 0
        # what this worker holds: live[h] is live_list[live[h].index], and
        # pages[pa] == h for each page pa of each live buffer h (dynamic pool, u/k)
        self.live: dict[int, Held] = {}
        self.live_list: list[Held] = []
        self.pages: dict[int, int] = {}
        self.next_handle = 1
        self.pending_release: list[Held] = []
        self.draining = False
        self.trace = None
        if spec.get("trace"):
            from .trace import TraceWriter
            self.trace = TraceWriter(spec["trace"])
        # the daemon
        self.client = poolsvc.connect(spec["socket"], name=f"load-{self.slot}.{self.gen}",
                                      timeout=float(spec.get("timeout", 30)),
                                      transport=spec.get("transport"))
        self.ctx = self.client.open_context(f"load-{self.slot}.{self.gen}")
        self.alloc_fns = {kind: getattr(self.ctx, METHODS[kind]) for kind in "ukp"}
        self.dynamic = self.client.pool == "dynamic"
        self.can_register = bool(self.client.gen_caps & GenCaps.REG_MEM)
        self.session: Any = None
        self.digest: Any = None
        self.digest_view = None
        self._open_sha256()
        self._open_area()

    # -- set-up ----------------------------------------------------------------------------------
    def _open_sha256(self) -> None:
        from ..tee.ta import Sha256App

        self.session = self.ctx.open_session(Sha256App.UUID)
        self.digest = self.ctx.alloc_kernel_buf(32)
        self.digest_view = self.digest.view()

    def _open_area(self) -> None:
        """This worker's own POSIX shm object for registrations, unlinked at once."""
        self.regions = max(4, min(64, self.max_live if not self.exhaust else 64))
        self.free_regions = list(range(self.regions - 1, -1, -1))
        self.area = None
        self.area_fd = -1
        if not self.can_register:
            return
        import posix_ipc

        name = f"/poolsvc-{os.getpid()}-load{self.rng.getrandbits(48):012x}"
        obj = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600,
                                     size=self.regions * REGION_SIZE)
        try:
            obj.unlink()  # docs/design.md section 8: unlink early, so that a SIGKILL leaves nothing in /dev/shm
            self.area = mmap.mmap(obj.fd, self.regions * REGION_SIZE)
            self.area_fd = os.dup(obj.fd)
        finally:
            obj.close_fd()
        self.area_view = memoryview(self.area)

    # -- reporting ----------------------------------------------------------------------------------
    def report(self, kind: str) -> None:
        """Write one report line: the figures since the previous one (then reset), and
        ``cpu``, the CPU seconds this process spent meanwhile (``cpu_sys`` of them in
        the kernel: system calls, and the wake-ups of its waits for the daemon)."""
        counts, hists = self.counts, self.hists
        for op, samples in self.samples.items():
            if samples:
                counts[op] = counts.get(op, 0) + len(samples)
                h = hists.get(op)
                if h is None:
                    hists[op] = Histogram.from_samples(samples)
                else:
                    h.merge(Histogram.from_samples(samples))
        cpu = _cpu()
        doc = {"k": kind, "t": time.time(), "n": counts, "e": self.errors,
               "h": {op: h.to_wire() for op, h in hists.items()}, "v": self.violations,
               "live": len(self.live), "skipped": self.skipped, "unverified": self.unverified,
               "private": self.daemon_private,
               "cpu": round(cpu[0] + cpu[1] - self.cpu_mark[0] - self.cpu_mark[1], 6),
               "cpu_sys": round(cpu[1] - self.cpu_mark[1], 6)}
        self.cpu_mark = cpu
        if self.trace is not None:
            self.trace.flush()
        self.out.write(json.dumps(doc, separators=(",", ":")) + "\n")
        self.out.flush()
        self.samples, self.counts, self.errors, self.hists, self.violations = \
            defaultdict(list), {}, {}, {}, []
        self.skipped = self.unverified = self.daemon_private = 0

    def run_line(self, line: str) -> int:
        """Run one trace line; returns the operations it stands for."""
        return self.run_op(parse_op(line))

    def run(self) -> int:
        """Announce readiness, run operations until a bound, free everything and report;
        the exit status (:data:`EXIT_LOST` when the connection to the daemon was lost)."""
        self.out.write(json.dumps({"k": "ready", "pid": os.getpid(), "pool": self.client.pool}) + "\n")
        self.out.flush()
        if self.spec.get("start") == "wait" and not self._wait_for_start():
            self.finish()
            return 0
        self.cpu_mark = _cpu()  # the CPU of the set-up is not the load's
        quiet_gc()
        try:
            self._loop()
            if self.spec.get("replay") and self.spec.get("replay_end") == "kill":
                self.report("tick")
                os.kill(os.getpid(), signal.SIGKILL)
            self.finish()
        except ConnectionLost:
            self.report("tick")
            return EXIT_LOST
        return 0

    def _wait_for_start(self) -> bool:
        """Wait for the runner's start line ``go DEADLINE`` on stdin; False if stdin
        closed without one (the runner is gone: nothing to run)."""
        line = sys.stdin.readline().split()
        if len(line) != 2 or line[0] != "go":
            return False
        self.deadline = float(line[1])
        return True

    def _loop(self) -> None:
        """Run operations until the budget, the deadline (drawn operations) or the
        source ends; a report line every tick.  One clock read per operation."""
        clock = time.time
        tick_s = self.tick_s
        next_tick = clock() + tick_s
        run_op = self.run_op
        budget = self.budget
        replay = bool(self.spec.get("replay"))
        deadline = float("inf") if replay else self.deadline
        trace = None if replay else self.trace
        for ops in self._operations():
            for op in ops:
                if self.done >= budget:
                    return
                now = clock()
                if now >= deadline:
                    return
                if trace is not None:
                    trace.add(format_op(op))
                self.done += run_op(op)
                if now >= next_tick:
                    next_tick = now + tick_s
                    self.report("tick")

    def _operations(self) -> Iterator[list[Op]]:
        """The operations to run, a list at a time: the replay file's, or drawn from
        the mix without end (the caller stops at the deadline)."""
        replay = self.spec.get("replay")
        if replay:
            with open(replay, encoding="ascii") as fh:
                yield [parse_op(line) for line in fh if line.strip()]
            return
        choose = self.mix.chooser(self.rng, None if not self.exhaust else
                                  frozenset(o for o, _ in self.mix.weights if o != "free"))
        if not choose:
            choose = self.mix.chooser(self.rng)
        choose_batch = self.mix.chooser(self.rng, BATCHABLE if not self.exhaust else
                                        BATCHABLE - {"free"})
        generate = self.generate
        while True:
            yield generate(choose, choose_batch)

    def finish(self) -> None:
        """Free everything (verifying each buffer), close the session, hang up, report."""
        for held in self.pending_release:
            if held.extra_refs > 0 and held.handle in self.live:
                held.extra_refs -= 1
                held.shm.close()
        self.pending_release = []
        for handle in list(self.live):
            self.op_free(handle)
        try:
            if self.session is not None:
                self.session.close()
            if self.digest is not None:
                if self.digest_view is not None:
                    self.digest_view.release()
                self.digest.close()
            self.ctx.close()
            self.client.close()
        except PoolsvcError as exc:
            self._error("close", exc)
        if self.area is not None:
            self.area_view.release()
            self.area.close()
            os.close(self.area_fd)
        self.report("exit")
        if self.trace is not None:
            self.trace.close()


#: Container objects allocated between two collections of the youngest generation
#: while the loop runs (Python's default is 700).
GC_YOUNG = 100_000


def quiet_gc() -> None:
    """Fewer cyclic collections while the loop runs: what set-up made (imports, the
    connection) is frozen out of every collection, and the youngest generation is
    collected every :data:`GC_YOUNG` allocations.  A batch makes about a thousand
    container objects (Shm, Held, tuples) that reference counting frees, in no
    cycle, so a collection every 700 only walked them; cycles are still collected."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, oldest)


def _cpu() -> tuple[float, float]:
    """CPU seconds this process spent so far: (user, system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        worker = Worker(spec)
    except PoolsvcError as exc:
        sys.stdout.write(json.dumps({"k": "tick", "t": time.time(), "n": {}, "e": {}, "h": {},
                                     "v": [f"client {spec.get('slot')}.{spec.get('gen')} could not "
                                           f"start: {type(exc).__name__}: {exc}"],
                                     "live": 0, "skipped": 0, "unverified": 0, "private": 0}) + "\n")
        sys.stdout.flush()
        return EXIT_LOST
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
