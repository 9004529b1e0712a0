"""Fairness of the pool service: one client's ping latency while another streams batches.

Usage (from the repository root)::

    python bench/fairness.py                     # 3 rounds of 4 s per cell, both transports
    python bench/fairness.py --rounds 5 --seconds 6 --out bench/results/fairness.md
    python bench/fairness.py --daemon-root /tmp/other-checkout   # A/B two daemons, alternated
    python bench/fairness.py --set batch_slice=16                # a daemon setting ([service])

Owns: starting ``poolsvc serve`` daemons (one per daemon variant, each from its
own source tree), the *streamer* (a separate client process that sends
maximum-size batches, ``max_batch`` ALLOCs then as many SHM_CLOSEs, for as
long as it runs), the *pinger* (this process: a context that sends one PING
every ``--interval`` ms and times each round trip) and the results table.

For each transport (``socket``; ``shm``, where a batch that does not fit the
slot's request area goes on the socket, so the shm cell also runs a streamer
whose batches just fit the slot, ``shm-slot``) and each daemon variant, every
round measures the pinger alone (the baseline) and then with the streamer
running, so both figures come from the same sitting; cells are interleaved
round by round.  The table gives the ping p50 / p99 / p99.9 / max over every
sample of the cell, the median of the per-round p99s, the share of pings over
10 ms, the streamer's operations per second (each alloc and each close counts
one) and the CPU share the daemon and the streamer used.

The machine's load shows in every figure: the header records the load
average before and after the run.  Single figures on a shared machine deserve
scepticism; read the baseline and the loaded figures of one run side by side.

Concurrency: one daemon process per variant, one streamer process at a time;
every process is ended (SIGTERM, then SIGKILL) before the script returns.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

#: Pings slower than this count as "late" (docs/security.md, "Fairness": the goal's bound).
LATE_MS = 10.0
#: Upper edges, in milliseconds, of the buckets of the latency distribution table.
BUCKETS_MS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)


@dataclass
class Cell:
    """The samples of one (daemon variant, transport, with or without streamer) combination."""

    pings_ns: list[int] = field(default_factory=list)
    round_p99_ms: list[float] = field(default_factory=list)
    ops_per_s: list[float] = field(default_factory=list)
    daemon_cpu: list[float] = field(default_factory=list)
    streamer_cpu: list[float] = field(default_factory=list)


def percentile(sorted_ns: list[int], q: float) -> float:
    """The ``q`` quantile (0..1, nearest rank) of sorted nanoseconds, in milliseconds."""
    if not sorted_ns:
        return float("nan")
    rank = min(len(sorted_ns) - 1, max(0, int(q * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[rank] / 1e6


# -- the streamer (a child process: ``fairness.py --stream``) -------------------------------------

def stream(path: str, transport: str, ops: int, kind: str, size: int) -> None:
    """Send batches of ``ops`` allocations then ``ops`` closes until stdin closes; print the figures."""
    import poolsvc

    client = poolsvc.connect(path, name="streamer", transport=transport)
    ctx = client.open_context()
    alloc_name = f"alloc_{kind}_buf"
    done = 0
    first = True
    t0 = time.perf_counter()
    cpu0 = os.times()
    while True:
        batch = ctx.batch()
        alloc = getattr(batch, alloc_name)
        for _ in range(ops):
            alloc(size)
        shms = batch.run()
        failed = [s for s in shms if isinstance(s, Exception)]
        if failed:
            raise SystemExit(f"streamer: {len(failed)} allocations failed: {failed[0]}")
        batch = ctx.batch()
        for shm in shms:
            batch.close(shm)
        batch.run()
        done += 2 * ops
        if first:  # the loaded phase starts once the stream is flowing
            first = False
            print("ready", flush=True)
            t0 = time.perf_counter()
            cpu0 = os.times()
            done = 0
        if select.select([sys.stdin], [], [], 0)[0]:
            break
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    client.close()
    print(json.dumps({"ops": done, "seconds": elapsed, "cpu": used / elapsed if elapsed else 0.0}),
          flush=True)


# -- the daemons ----------------------------------------------------------------------------------

class Daemon:
    """A ``poolsvc serve`` process run from source tree ``root``."""

    def __init__(self, root: Path, workdir: Path, label: str, service: dict[str, str], nice: int = 0) -> None:
        self.root = root
        self.label = label
        self.path = str(workdir / f"{label}.sock")
        conf = workdir / f"{label}.toml"
        lines = ['dynamic_size = "256MiB"', 'arena_step = "4MiB"', "[service]", 'log_level = "WARNING"']
        lines += [f"{key} = {value}" for key, value in service.items()]
        conf.write_text("\n".join(lines) + "\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc", "serve", "--config", str(conf),
                                      "--socket", self.path], cwd=str(root), env=env,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon {label} exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"daemon {label} did not create {self.path} within 60 s")
            time.sleep(0.05)
        if nice:  # the deployer's knob (negative values need CAP_SYS_NICE)
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, nice)

    def cpu_seconds(self) -> float:
        """The daemon's user + system CPU seconds so far."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


def start_streamer(daemon: Daemon, transport: str, ops: int, kind: str, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--stream", daemon.path,
                             "--transport", transport, "--ops", str(ops), "--kind", kind,
                             "--size", str(size)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))


def stop_streamer(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    out = proc.stdout.read()  # the streamer prints its figures and exits when stdin closes
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise SystemExit("streamer did not stop within 60 s") from None
    if proc.returncode:
        raise SystemExit(f"streamer exited with {proc.returncode}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def ping_for(ctx_client: Any, seconds: float, interval: float) -> list[int]:
    """Ping every ``interval`` seconds for ``seconds``; the round trips in nanoseconds."""
    clock = time.perf_counter_ns
    ping = ctx_client.ping
    payload = b"fairness"
    out: list[int] = []
    end = time.perf_counter() + seconds
    next_at = time.perf_counter()
    while True:
        now = time.perf_counter()
        if now >= end:
            return out
        if now < next_at:
            time.sleep(next_at - now)
        t0 = clock()
        ping(payload)
        out.append(clock() - t0)
        next_at += interval
        if next_at < time.perf_counter():  # a late ping: pace from now, do not burst
            next_at = time.perf_counter() + interval


# -- the run --------------------------------------------------------------------------------------

def slot_batch_ops() -> int:
    """ALLOC requests of the largest BATCH that fits a shm slot's request area."""
    from poolsvc.service import protocol as P
    from poolsvc.service import slot as S

    alloc_frame = P.HEADER_SIZE + P.ALLOC.size
    return (S.SLOT_REQ_CAP - P.HEADER_SIZE) // alloc_frame


def run(args: argparse.Namespace) -> tuple[dict[tuple[str, str, str], Cell], dict[str, Any]]:
    import poolsvc
    from poolsvc.service.settings import ServiceSettings

    max_batch = ServiceSettings().max_batch if args.ops is None else args.ops
    service = dict(item.split("=", 1) for item in args.set)
    if "max_batch" in service:
        max_batch = int(service["max_batch"]) if args.ops is None else max_batch
    roots = [("this", ROOT, args.nice)]
    for i, spec in enumerate(args.daemon_root):
        where, _, nice = spec.partition(":nice=")
        roots.append((f"root{i + 1}", Path(where).resolve(), int(nice or 0)))
    transports = [(t, max_batch) for t in args.transport]
    if "shm" in args.transport and slot_batch_ops() < max_batch:
        transports.append(("shm-slot", slot_batch_ops()))
    cells: dict[tuple[str, str, str], Cell] = {}
    workdir = Path(tempfile.mkdtemp(prefix="poolsvc-fair-"))
    daemons: list[Daemon] = []
    variants = {label: f"{root}" + (f" (nice {nice})" if nice else "") for label, root, nice in roots}
    info = {"ops": {name: ops for name, ops in transports}, "variants": variants}
    try:
        for label, root, nice in roots:
            daemons.append(Daemon(root, workdir, label, service, nice))
        for rnd in range(args.rounds):
            for daemon in daemons:
                for name, ops in transports:
                    transport = "shm" if name.startswith("shm") else name
                    client = poolsvc.connect(daemon.path, name="pinger", transport=transport)
                    try:
                        client.open_context()
                        for _ in range(200):  # warm up
                            client.ping(b"warm")
                        for loaded in (False, True):
                            cell = cells.setdefault((daemon.label, name, "streamer" if loaded else "alone"),
                                                    Cell())
                            proc = None
                            if loaded:
                                proc = start_streamer(daemon, transport, ops, args.kind, args.size)
                                assert proc.stdout is not None
                                if proc.stdout.readline().strip() != "ready":
                                    proc.kill()
                                    proc.communicate()
                                    raise SystemExit("streamer did not start")
                            cpu0, t0 = daemon.cpu_seconds(), time.perf_counter()
                            try:
                                samples = ping_for(client, args.seconds, args.interval / 1e3)
                            finally:
                                cpu1, t1 = daemon.cpu_seconds(), time.perf_counter()
                                figures = stop_streamer(proc) if proc is not None else None
                            cell.pings_ns += samples
                            cell.round_p99_ms.append(percentile(sorted(samples), 0.99))
                            cell.daemon_cpu.append((cpu1 - cpu0) / (t1 - t0))
                            if figures is not None:
                                cell.ops_per_s.append(figures["ops"] / figures["seconds"])
                                cell.streamer_cpu.append(figures["cpu"])
                            print(f"round {rnd + 1} {daemon.label} {name} "
                                  f"{'streamer' if loaded else 'alone'}: p50 "
                                  f"{percentile(sorted(samples), 0.5):.3f} ms, p99 "
                                  f"{cell.round_p99_ms[-1]:.3f} ms, max {max(samples) / 1e6:.1f} ms"
                                  + (f", {cell.ops_per_s[-1]:,.0f} ops/s" if figures else "")
                                  + f" (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
                    finally:
                        client.close()
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return cells, info


def table(cells: dict[tuple[str, str, str], Cell], info: dict[str, Any]) -> list[str]:
    out = ["| daemon | transport | batch ops | streamer | pings | p50 ms | p99 ms | p99.9 ms | max ms | "
           f"median of round p99s ms | > {LATE_MS:g} ms | streamer ops/s | daemon CPU | streamer CPU |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (label, name, mode), cell in cells.items():
        ns = sorted(cell.pings_ns)
        late = sum(1 for x in ns if x > LATE_MS * 1e6)
        ops = f"{statistics.median(cell.ops_per_s):,.0f}" if cell.ops_per_s else ""
        scpu = f"{statistics.median(cell.streamer_cpu):.0%}" if cell.streamer_cpu else ""
        out.append(f"| {label} | {name} | {info['ops'][name] if mode == 'streamer' else ''} | {mode} | "
                   f"{len(ns)} | {percentile(ns, 0.5):.3f} | {percentile(ns, 0.99):.3f} | "
                   f"{percentile(ns, 0.999):.2f} | {ns[-1] / 1e6:.2f} | "
                   f"{statistics.median(cell.round_p99_ms):.3f} | {late / len(ns):.2%} | {ops} | "
                   f"{statistics.median(cell.daemon_cpu):.0%} | {scpu} |")
    return out


def distribution(cells: dict[tuple[str, str, str], Cell]) -> list[str]:
    """The share of each cell's pings in each latency bucket."""
    edges = [f"<= {b:g}" for b in BUCKETS_MS] + [f"> {BUCKETS_MS[-1]:g}"]
    out = ["| daemon | transport | streamer | " + " | ".join(f"{e} ms" for e in edges) + " |",
           "|---|---|---|" + "---:|" * len(edges)]
    for (label, name, mode), cell in cells.items():
        counts = [0] * len(edges)
        for ns in cell.pings_ns:
            ms = ns / 1e6
            counts[next((i for i, b in enumerate(BUCKETS_MS) if ms <= b), len(BUCKETS_MS))] += 1
        total = len(cell.pings_ns)
        out.append(f"| {label} | {name} | {mode} | " + " | ".join(f"{c / total:.2%}" for c in counts) + " |")
    return out


def render(cells: dict[tuple[str, str, str], Cell], info: dict[str, Any], args: argparse.Namespace,
           started: datetime.datetime, seconds: float, load_before: str) -> str:
    from results import Family, header, machine  # bench/results.py

    from poolsvc._backend import BACKEND

    command = "python bench/fairness.py " + " ".join(sys.argv[1:])
    about = (f"A pinger (one PING every {args.interval:g} ms, timed round trip) alone and while another "
             f"client process streams batches of `max_batch` ALLOCs ({args.kind}, {args.size} bytes) "
             "then as many SHM_CLOSEs. `shm-slot`: the largest batch that fits a shm slot's request "
             "area (a larger one goes on the socket). Percentiles are over every ping of the cell "
             f"({args.rounds} rounds of {args.seconds:g} s, cells interleaved round by round); CPU "
             "shares are of one core. How to read it: docs/security.md, \"Fairness\".")
    family = Family("fairness", "Fairness (ping latency beside a batch streamer)", about=about)
    mach = machine(BACKEND)
    mach["load average before the run"] = load_before
    mach["load average after the run"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = header(family, mach, command, started, seconds)
    lines[2] = "Generated by `bench/fairness.py`; do not edit by hand. Regenerate with:"
    if len(info["variants"]) > 1 or args.nice:
        lines += ["Daemon variants: " + ", ".join(f"`{k}` = `{v}`" for k, v in info["variants"].items()), ""]
    if args.set:
        lines += ["Daemon settings: " + ", ".join(f"`{s}`" for s in args.set), ""]
    lines += table(cells, info)
    lines += ["", "Distribution of the ping round trips (share of each cell's pings):", ""]
    lines += distribution(cells)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cell (default 3)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of pings per cell per round")
    parser.add_argument("--interval", type=float, default=1.0, help="milliseconds between pings (default 1)")
    parser.add_argument("--transport", action="append", choices=("socket", "shm"),
                        help="transport (repeat; default both)")
    parser.add_argument("--kind", choices=("user", "kernel", "priv"), default="user",
                        help="allocation kind of the streamer (default user)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per allocation (default 4096)")
    parser.add_argument("--ops", type=int, help="operations per batch (default: max_batch)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [service] setting of every daemon, as TOML (repeat)")
    parser.add_argument("--daemon-root", action="append", default=[], metavar="DIR[:nice=N]",
                        help="also run a daemon from this source tree (at niceness N), alternated "
                             "with this one (repeat)")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of this tree's daemon (negative: needs CAP_SYS_NICE)")
    parser.add_argument("--out", help="write the Markdown table here (e.g. bench/results/fairness.md)")
    parser.add_argument("--stream", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream:
        stream(args.stream, (args.transport or ["socket"])[0], args.ops, args.kind, args.size)
        return 0
    args.transport = args.transport or ["socket", "shm"]
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    cells, info = run(args)
    text = render(cells, info, args, started, time.perf_counter() - t0, load_before)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
