"""The load run: service, client processes, kills, checks, progress and the report.

:class:`LoadRunner` owns every process of a run:

- the daemon, when it starts one (:mod:`.daemon`: ``poolsvc serve`` in a
  subprocess on a socket in a fresh temporary directory), or none, with
  ``socket=``: an existing daemon, which it never stops;
- one worker process per client slot (:mod:`.worker`), forked by the run's
  fork server (:mod:`.forkserver`, which imported poolsvc once), restarted
  with a new generation number after each SIGKILL it deals while time remains;
- a monitor connection (``poolsvc.connect``) for STATS, through which the
  invariants of :mod:`.invariants` are checked every ``check_interval``;
- the malformed-request thread (:mod:`.faults`).

The initial workers start :data:`START_WINDOW` at a time and wait, connected,
until all are (their start-up, a fork and a connection each, is not load); the run's
``duration`` counts from then, and the report gives the start-up's length.
The main loop is single-threaded: it reads the workers' report lines from
their stdout pipes (``selectors``), deals kills at Poisson-distributed
moments, checks a snapshot, prints one status line on stderr, and ends when
every slot is done or :meth:`LoadRunner.grace` seconds past the duration,
whichever comes first.  Whatever happens, the ``finally`` of :meth:`LoadRunner.run` kills
and reaps every worker and the daemon it started: no child outlives a run.

Size: over 600 lines because the run's lifecycle (start, kills, checks,
settling, teardown) shares one set of process tables; the daemon, the
workers, the faults, the sweep and the report live in their own modules.

Concurrency: one thread, plus the injector's thread (which only touches its
own counters and its own sockets).
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import selectors
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, TextIO

from ..errors import PoolsvcError
from . import invariants, trace
from .daemon import LoadDaemon, tail
from .faults import MalformedInjector
from .forkserver import ForkServer, Forked
from ..histogram import Histogram
from .mix import TIMED, LoadSpec
from .progress import Progress

#: Seconds the workers get past the duration to free what they hold and exit.
GRACE = 30.0
#: More seconds of grace per client: the daemon serves every client's frees and closes at the end.
GRACE_PER_CLIENT = 0.25
#: Seconds after the last worker exits for the daemon to release everything.
SETTLE = 15.0
#: Workers connecting at once while a run starts (each connection costs the daemon a context).
START_WINDOW = 2 * (os.cpu_count() or 1)
#: Seconds the initial workers get to connect: START_LIMIT + START_PER_CLIENT per client.
START_LIMIT = 30.0
START_PER_CLIENT = 1.0
#: The checks' share of the daemon's time at most: the next snapshot comes no sooner
#: than the last one took divided by this (a STATS document grows with the clients,
#: and the daemon answers nobody else while it builds one).
CHECK_SHARE = 0.01
#: A worker is not killed before it has run this long (it must get past start-up).
MIN_LIFE = 0.3
#: Errors a well-formed operation may get from a healthy daemon.
EXPECTED_ERRORS = frozenset({"OutOfMemory"})
#: Violations quoted in full in a report (the count is always exact).
MAX_QUOTED = 50


@dataclass
class Incarnation:
    """One worker process."""

    slot: int
    gen: int
    proc: Forked
    started: float
    budget: int
    trace_part: str = ""
    killed: bool = False
    ready: bool = False
    buf: bytes = b""
    done_ops: int = 0
    stderr_path: str = ""
    exit_seen: bool = False
    waiting: bool = False

    def close_pipes(self) -> None:
        """Close the runner's ends of the worker's pipes (stdin is open while it waits)."""
        self.proc.close()

    @property
    def stdout(self) -> IO[bytes]:
        """The worker's stdout pipe."""
        return self.proc.stdout


@dataclass
class Totals:
    """What the workers reported, merged."""

    counts: dict[str, int] = field(default_factory=dict)
    hists: dict[str, Histogram] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    timeline: dict[int, dict[str, Any]] = field(default_factory=dict)
    skipped: int = 0
    unverified: int = 0
    daemon_private: int = 0
    #: CPU seconds the workers spent running operations (their ``cpu`` fields), and
    #: the part of it in the kernel (``cpu_sys``).
    client_cpu: float = 0.0
    client_cpu_sys: float = 0.0


class LoadRunner:
    """One ``poolsvc load`` run; :meth:`run` returns the report (a JSON-ready dict).

    ``socket``: an existing daemon (else one is started with ``config_path``,
    or with ``dynamic_size`` / ``no_dynamic`` when no file is given).
    ``record``: write the run's trace there.  ``replay``: run this trace's
    operations instead of drawing them (the spec's mix, sizes, seed, kill
    rate are then the trace's, its duration is only a bound).
    ``progress``: a stream for the one-line status (None: silent).
    ``transport``: the workers' client transport (``"socket"`` or ``"shm"``;
    None: the client library's default).
    """

    def __init__(self, spec: LoadSpec, *, socket: str | None = None, config_path: str | None = None,
                 no_dynamic: bool = False, dynamic_size: str | None = None, record: str | None = None,
                 replay: str | None = None, progress: TextIO | None = None,
                 label: str = "", transport: str | None = None) -> None:
        self.spec = spec
        self.transport = transport
        self.socket = socket
        self.config_path = config_path
        self.no_dynamic = no_dynamic
        self.dynamic_size = dynamic_size or ("32MiB" if spec.exhaust else "256MiB")
        self.record = record
        self.replay_path = replay
        self.replay: trace.Trace | None = trace.read(replay) if replay else None
        self.progress = Progress(progress, spec.duration, label) if progress is not None else None
        self.label = label
        self.rng = random.Random(f"runner/{spec.seed}")
        self.workdir = ""
        self.daemon: LoadDaemon | None = None
        self.forks: ForkServer | None = None
        self.monitor: Any = None
        self.running: list[Incarnation] = []
        self.finished: list[Incarnation] = []
        self.next_gen: dict[int, int] = {}
        self.slot_done: dict[int, int] = {}
        self.pending: dict[int, list[trace.Incarnation]] = {}
        self.totals = Totals()
        self.violations: list[str] = []
        self.violation_count = 0
        self.kills = 0
        self.restarts = 0
        self.checks = 0
        self.sel = selectors.DefaultSelector()
        self.t0 = 0.0
        self.end = 0.0
        #: Seconds the latest STATS snapshot took (spaces the checks: CHECK_SHARE).
        self.check_s = 0.0
        self.start_s = 0.0
        self.injector: MalformedInjector | None = None
        self.service_info: dict[str, Any] = {}

    # -- violations ------------------------------------------------------------------------------
    def violate(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < MAX_QUOTED:
            self.violations.append(text)

    # -- workers ---------------------------------------------------------------------------------
    def _spawn(self, slot: int, budget: int, replay: trace.Incarnation | None = None,
               wait: bool = False) -> None:
        """Start a worker for ``slot``; ``wait``: it waits, once connected, for the
        start line (:meth:`_go`) that gives every initial worker the same deadline."""
        gen = self.next_gen.get(slot, 0)
        self.next_gen[slot] = gen + 1
        spec = self.spec
        doc: dict[str, Any] = {
            "socket": self.socket, "slot": slot, "gen": gen, "seed": spec.seed, "mix": spec.mix,
            "sizes": spec.sizes, "batch": spec.batch, "max_live": spec.max_live,
            "exhaust": spec.exhaust, "deadline": time.time() + max(0.0, self.end - time.monotonic()),
            "ops": budget, "tick": self._tick_s(), "start": "wait" if wait else "now",
            "transport": self.transport,
        }
        part = ""
        if replay is not None:
            path = os.path.join(self.workdir, f"replay-{slot}-{gen}.ops")
            with open(path, "w") as fh:
                fh.write("\n".join(replay.lines) + ("\n" if replay.lines else ""))
            doc["replay"] = path
            doc["replay_end"] = replay.end
            doc["ops"] = 0
        elif self.record:
            part = os.path.join(self.workdir, f"record-{slot}-{gen}.trace")
            doc["trace"] = part
        err_path = os.path.join(self.workdir, f"worker-{slot}-{gen}.err")
        assert self.forks is not None
        with open(err_path, "w") as err:
            proc = self.forks.spawn(json.dumps(doc), stdin_pipe=wait, stderr=err)
        os.set_blocking(proc.stdout.fileno(), False)
        inc = Incarnation(slot, gen, proc, time.monotonic(), budget, part, stderr_path=err_path,
                          waiting=wait)
        self.running.append(inc)
        self.sel.register(proc.stdout, selectors.EVENT_READ, inc)
        self.sel.register(proc.status_fd, selectors.EVENT_READ, inc)

    def _tick_s(self) -> float:
        """Seconds between two report lines of a worker: 0.25, longer past 64 clients
        (the runner reads every line)."""
        return max(0.25, self.spec.clients / 256)

    def _go(self, inc: Incarnation) -> None:
        """Send a waiting worker its start line: run until the run's end."""
        inc.waiting = False
        stdin = inc.proc.stdin
        if stdin is None:
            return
        deadline = time.time() + max(0.0, self.end - time.monotonic())
        try:
            stdin.write(f"go {deadline!r}\n".encode())
            stdin.close()
        except OSError:  # it died meanwhile: _reap says how
            pass

    def _start_clients(self, own: dict[str, int]) -> None:
        """Start the initial workers, at most :data:`START_WINDOW` connecting at once,
        and wait until every one is connected (or gone); the run's clock starts then."""
        spec = self.spec
        todo: list[tuple[int, int, trace.Incarnation | None]] = []
        if self.replay is not None:
            by_slot = self.replay.by_slot()
            for slot in sorted(by_slot):
                queue = list(by_slot[slot])
                self.pending[slot] = queue
                todo.append((slot, 0, queue.pop(0)))
        else:
            todo = [(slot, self._slot_budget(), None) for slot in range(spec.clients)]
        total = len(todo)
        self.t0 = time.monotonic()
        limit = self.t0 + START_LIMIT + START_PER_CLIENT * total
        next_check = self.t0 + spec.check_interval
        while todo or any(inc.waiting and not inc.ready for inc in self.running):
            while todo and sum(not inc.ready for inc in self.running) < START_WINDOW:
                self._spawn(*todo.pop(0), wait=True)
            self._pump()
            now = time.monotonic()
            if now >= next_check:
                self._check(own)
                next_check = self._next_check(now)
            self._status(now, phase=f"starting {sum(i.ready for i in self.running)}/{total}")
            if now > limit:
                self.violate(f"{len(todo) + sum(not i.ready for i in self.running)} of {total} "
                             f"clients were not connected within {limit - self.t0:.0f} s")
                break
        self.start_s = time.monotonic() - self.t0
        self.t0 = time.monotonic()
        self.end = self.t0 + spec.duration
        self.totals.timeline.clear()  # (nothing ran yet: every worker waited)
        for inc in self.running:
            if inc.ready:
                self._go(inc)

    def _pump(self) -> None:
        """Read what the workers wrote (up to 50 ms) and reap those that ended (their
        status pipes are watched with their stdout)."""
        for key, _ in self.sel.select(timeout=0.05):
            inc = key.data
            if key.fd != inc.proc.status_fd:
                if not inc.stdout.closed:  # (not reaped by an earlier event of this pass)
                    self._read(inc)
            elif inc.proc.poll() is not None:
                self._reap(inc)

    def grace(self) -> float:
        """Seconds the workers get past the duration to free what they hold and exit."""
        return GRACE + GRACE_PER_CLIENT * len(self.next_gen)

    def _slot_budget(self) -> int:
        if not self.spec.ops:
            return 0
        return math.ceil(self.spec.ops / self.spec.clients)

    def _read(self, inc: Incarnation) -> None:
        try:
            data = os.read(inc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            try:
                self.sel.unregister(inc.stdout)
            except (KeyError, ValueError):
                pass
            return
        inc.buf += data
        *lines, inc.buf = inc.buf.split(b"\n")
        for line in lines:
            self._absorb(inc, line)

    def _absorb(self, inc: Incarnation, line: bytes) -> None:
        try:
            doc = json.loads(line)
        except ValueError:
            self.violate(f"client {inc.slot}.{inc.gen} wrote a malformed report line: {line[:120]!r}")
            return
        kind = doc.get("k")
        if kind == "ready":
            inc.ready = True
            self.service_info.setdefault("pool", doc.get("pool"))
            if inc.waiting and self.end:  # ready after the start: it runs what is left
                self._go(inc)
            return
        tot = self.totals
        second = int(time.monotonic() - self.t0)
        bucket = tot.timeline.setdefault(second, {"ops": 0, "hists": {}})
        for op, n in doc["n"].items():
            tot.counts[op] = tot.counts.get(op, 0) + n
            bucket["ops"] += n
            inc.done_ops += n
            self.slot_done[inc.slot] = self.slot_done.get(inc.slot, 0) + n
        for op, wire in doc["h"].items():
            h = Histogram.from_wire(wire)
            tot.hists.setdefault(op, Histogram()).merge(h)
            bucket["hists"].setdefault(op, Histogram()).merge(h)
        for key, n in doc["e"].items():
            tot.errors[key] = tot.errors.get(key, 0) + n
            if key.split(":", 1)[1] not in EXPECTED_ERRORS:
                self.violate(f"client {inc.slot}.{inc.gen}: {n} unexpected {key} error(s)")
        for text in doc["v"]:
            self.violate(text)
        tot.skipped += doc.get("skipped", 0)
        tot.unverified += doc.get("unverified", 0)
        tot.daemon_private += doc.get("private", 0)
        tot.client_cpu += doc.get("cpu", 0.0)
        tot.client_cpu_sys += doc.get("cpu_sys", 0.0)
        if kind == "exit":
            inc.exit_seen = True

    def _reap(self, inc: Incarnation) -> None:
        """A worker ended: judge how, then restart its slot or retire it."""
        self._read(inc)
        inc.buf = b""  # a line cut short by SIGKILL carries nothing usable
        self._retire(inc)
        rc = inc.proc.returncode
        replay_kill = rc == -signal.SIGKILL and self.replay is not None
        if replay_kill:
            inc.killed = True
            self.kills += 1
        elif inc.killed:
            pass
        elif rc != 0 or not inc.exit_seen:
            self.violate(f"client {inc.slot}.{inc.gen} (pid {inc.proc.pid}) exited with status {rc} "
                         f"without finishing: {tail(inc.stderr_path)}")
        if self.replay is not None:
            queue = self.pending.get(inc.slot)
            if queue:
                self._spawn(inc.slot, 0, queue.pop(0))
                self.restarts += 1
            return
        if inc.killed:
            remaining = inc.budget - inc.done_ops if inc.budget else 0
            if time.monotonic() < self.end - 0.5 and (not inc.budget or remaining > 0):
                self._spawn(inc.slot, remaining if inc.budget else 0)
                self.restarts += 1

    def _maybe_kill(self, now: float) -> None:
        victims = [i for i in self.running if i.ready and not i.killed and now - i.started >= MIN_LIFE]
        if not victims:
            return
        inc = self.rng.choice(victims)
        inc.killed = True
        try:
            inc.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills += 1

    # -- checks and progress ----------------------------------------------------------------------
    def _next_check(self, now: float) -> float:
        """When to take the next snapshot: ``check_interval`` from ``now``, or later
        while the last one took more than CHECK_SHARE of that."""
        return now + max(self.spec.check_interval, self.check_s / CHECK_SHARE)

    def _check(self, own: dict[str, int]) -> dict[str, Any] | None:
        """Take a STATS snapshot and check it; ``check_s`` is how long it took."""
        started = time.monotonic()
        try:
            stats = self.monitor.service_stats()
            self.check_s = time.monotonic() - started
        except PoolsvcError as exc:
            self.violate(f"STATS failed: {type(exc).__name__}: {exc} (is the daemon still up?)")
            return None
        self.checks += 1
        for text in invariants.check_snapshot(stats, own):
            self.violate(f"at {time.monotonic() - self.t0:.1f} s: {text}")
        return stats

    def _status(self, now: float, final: bool = False, phase: str = "running") -> None:
        """Show the run's status (:class:`~poolsvc.load.progress.Progress`)."""
        if self.progress is None:
            return
        elapsed = now - self.t0 if self.end else 0.0
        ops = sum(self.totals.counts.get(op, 0) for op in TIMED)
        recent = [self.totals.timeline.get(s, {}).get("ops", 0) for s in
                  range(max(0, int(elapsed) - 3), max(1, int(elapsed)))]
        rate = sum(recent) / max(1, len(recent))
        figures = (f"clients {len(self.running)} ops {ops:,} ({rate:,.0f}/s) "
                   f"errors {sum(self.totals.errors.values())} kills {self.kills} "
                   f"malformed {self.injector.sent if self.injector else 0} "
                   f"violations {self.violation_count}")
        self.progress.update(phase, elapsed, figures, final)

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the load; the report (``report["ok"]`` is False on any violation or leak)."""
        import poolsvc

        spec = self.spec
        fds_before = len(os.listdir("/proc/self/fd"))
        shm_before = invariants.shm_objects()
        self.workdir = tempfile.mkdtemp(prefix="poolsvc-load-")
        report: dict[str, Any] = {}
        daemon_end: dict[str, Any] = {}
        leaks: dict[str, Any] = {}
        baseline: dict[str, Any] = {}
        final_stats: dict[str, Any] = {}
        try:
            self.forks = ForkServer()  # it imports while the daemon starts
            if self.socket is None:
                self.daemon = LoadDaemon(
                    self.workdir, config_path=self.config_path, dynamic_size=self.dynamic_size,
                    no_dynamic=self.no_dynamic,
                    clients=self.replay.clients if self.replay is not None else spec.clients)
                self.socket = self.daemon.start()
            self.monitor = poolsvc.connect(self.socket, name="load-monitor", spin_us=0, timeout=30)
            start_stats = self.monitor.service_stats()
            baseline = invariants.summary(start_stats)
            own = invariants.own_figures(start_stats)
            self.service_info.update(pool=start_stats["daemon"]["pool"],
                                     backend=start_stats["daemon"]["backend"],
                                     pid=start_stats["daemon"]["pid"],
                                     pools={k: v.get("size") for k, v in start_stats["pools"].items()},
                                     started_by_load=self.daemon is not None,
                                     transport=self.transport or "default",
                                     config=self.config_path or ("no-dynamic" if self.no_dynamic else
                                                                 f"dynamic_size={self.dynamic_size}"))
            self._start_clients(own)
            self.injector = MalformedInjector(self.socket, spec.malformed_rate, spec.seed)
            self.injector.start()
            kill_rate = spec.kill_rate if self.replay is None else 0.0
            next_kill = self.t0 + self.rng.expovariate(kill_rate) if kill_rate else math.inf
            next_check = self.t0 + spec.check_interval
            hard_end = self.end + self.grace()
            while self.running:
                self._pump()
                now = time.monotonic()
                if now >= next_kill:
                    if now < self.end - 0.5:
                        self._maybe_kill(now)
                    next_kill = now + self.rng.expovariate(kill_rate)
                if now >= next_check:
                    self._check(own)
                    next_check = self._next_check(now)
                self._status(now)
                if now > hard_end:
                    for inc in self.running:
                        self.violate(f"client {inc.slot}.{inc.gen} did not finish within {self.grace():g} s "
                                     "of the end; killed")
                        inc.killed = True
                        inc.proc.kill()
                    hard_end = math.inf
            elapsed = time.monotonic() - self.t0
            self.injector.stop()
            for text in self.injector.violations:
                self.violate(text)
            self._status(time.monotonic(), final=True, phase="done")
            # -- after every client exited: nothing may be left ------------------------------
            self._check(own)
            settle_end = time.monotonic() + SETTLE
            after = baseline
            while True:
                try:
                    final_stats = self.monitor.service_stats()
                except PoolsvcError as exc:
                    self.violate(f"the daemon does not answer STATS after the run: {exc}")
                    break
                after = invariants.summary(final_stats)
                if invariants.leaks(baseline, after) == {} or time.monotonic() > settle_end:
                    break
                time.sleep(0.05)
            leaks = invariants.leaks(baseline, after)
            for what, delta in leaks.items():
                self.violate(f"leak after the run: {what} is {after[what]}, was {baseline[what]} "
                             f"({delta:+d})")
            report = self._report(elapsed, final_stats)
        finally:
            if self.progress is not None:
                self.progress.close()
            self._cleanup()
            if self.forks is not None:
                self.forks.close()
            if self.monitor is not None:
                self.monitor.close()
            if self.injector is not None:
                self.injector.stop()
            if self.daemon is not None:
                daemon_end, problems = self.daemon.stop()
                for text in problems:
                    self.violate(text)
            self.sel.close()
        worker_pids = {inc.proc.pid for inc in self.finished}
        daemon_pid = self.daemon.pid if self.daemon is not None else 0
        shm_left = invariants.shm_leftovers(shm_before, worker_pids | ({daemon_pid} if daemon_pid else set()))
        if shm_left:
            leaks["dev_shm"] = len(shm_left)
            self.violate(f"/dev/shm objects left by the run: {', '.join(shm_left[:10])}")
        if self.record and report:
            header = {"spec": spec.to_json(), "service": self.service_info,
                      "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            parts = [(i.slot, i.gen, "kill" if i.killed else "exit", i.trace_part)
                     for i in sorted(self.finished, key=lambda i: i.started)]
            report["trace"] = {"path": self.record, "lines": trace.write(self.record, header, parts)}
        shutil.rmtree(self.workdir, ignore_errors=True)
        fds_after = len(os.listdir("/proc/self/fd"))
        if fds_after > fds_before:
            leaks["runner_fds"] = fds_after - fds_before
            self.violate(f"the load runner holds {fds_after - fds_before} more descriptors than before")
        if report:
            report["leaks"] = leaks
            report["daemon_exit"] = daemon_end
            report["violations"] = {"count": self.violation_count, "quoted": self.violations}
            report["ok"] = self.violation_count == 0 and not leaks
        return report

    def _cleanup(self) -> None:
        """Kill and reap every worker still running (normally none)."""
        for inc in list(self.running):
            if inc.proc.poll() is None:
                inc.killed = True
                inc.proc.kill()
            inc.proc.wait()
            self._retire(inc)

    def _retire(self, inc: Incarnation) -> None:
        """Move an ended worker from the running to the finished ones; close its pipes."""
        for pipe in (inc.stdout, inc.proc.status_fd):
            try:
                self.sel.unregister(pipe)
            except (KeyError, ValueError):
                pass
        inc.close_pipes()
        self.running.remove(inc)
        self.finished.append(inc)

    # -- the report ------------------------------------------------------------------------------
    def _report(self, elapsed: float, final_stats: dict[str, Any]) -> dict[str, Any]:
        tot = self.totals
        ops_total = sum(n for op, n in tot.counts.items() if op != "batch")
        per_op = {}
        every = Histogram()  # every operation's latency (a batch's round trip apart)
        for op, hist in tot.hists.items():
            if op != "batch":
                every.merge(hist)
        for op in TIMED:
            h = tot.hists.get(op)
            if h is None:
                continue
            n = tot.counts.get(op, 0) if op != "batch" else h.count
            entry = h.summary_us()
            entry["count"] = n
            entry["per_s"] = round(n / elapsed, 1) if elapsed else 0.0
            per_op[op] = entry
        timeline = []
        for second in sorted(tot.timeline):
            bucket = tot.timeline[second]
            merged = Histogram()
            row: dict[str, Any] = {"t": second, "ops": bucket["ops"], "latency_us": {}}
            for op, h in bucket["hists"].items():
                if op != "batch":
                    merged.merge(h)
                p50, p99 = h.percentiles((0.5, 0.99))
                row["latency_us"][op] = {"p50": round(p50 / 1000, 2), "p99": round(p99 / 1000, 2)}
            p50, p99 = merged.percentiles((0.5, 0.99))
            row["p50_us"], row["p99_us"] = round(p50 / 1000, 2), round(p99 / 1000, 2)
            timeline.append(row)
        expected = {k: v for k, v in tot.errors.items() if k.split(":", 1)[1] in EXPECTED_ERRORS}
        unexpected = {k: v for k, v in tot.errors.items() if k not in expected}
        by_type: dict[str, int] = {}
        for k, v in tot.errors.items():
            by_type[k.split(":", 1)[1]] = by_type.get(k.split(":", 1)[1], 0) + v
        spec = self.spec.to_json()
        if self.replay is not None:
            spec["replay"] = self.replay_path
            spec["clients"] = self.replay.clients
        return {
            "format": "poolsvc-load-report/1",
            "label": self.label,
            "spec": spec,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "processor": platform.processor()},
            "service": self.service_info,
            "elapsed_s": round(elapsed, 3),
            "start_s": round(self.start_s, 3),
            "latency_us": every.summary_us(),
            "ops_total": ops_total,
            "ops_per_s": round(ops_total / elapsed, 1) if elapsed else 0.0,
            "client_cpu_s": round(tot.client_cpu, 3),
            "client_cpu_sys_s": round(tot.client_cpu_sys, 3),
            "client_cpu_us_per_op": round(1e6 * tot.client_cpu / ops_total, 2) if ops_total else 0.0,
            "ops": per_op,
            "errors": {"by_type": by_type, "expected": expected, "unexpected": unexpected},
            "skipped_ops": tot.skipped,
            "unverified_checks": tot.unverified,
            "daemon_private_checks": tot.daemon_private,
            "faults": {"kills": self.kills, "restarts": self.restarts,
                       "malformed_sent": self.injector.sent if self.injector else 0,
                       "malformed_by_case": dict(self.injector.by_case) if self.injector else {}},
            "invariants": {"snapshots_checked": self.checks},
            "clients_run": len(self.finished),
            "timeline": timeline,
            "daemon_requests": final_stats.get("requests", {}),
        }
