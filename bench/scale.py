"""The scaling study: alloc + free pairs per second and their latency against the number of
client processes, on both transports, and the daemon's memory per idle connected client.

Usage (from the repository root)::

    python bench/scale.py                                  # 1, 8, 64, 256 clients, both transports
    python bench/scale.py --counts 1,8,64,256,1024 --rounds 3 --json scale.json
    python bench/scale.py --tree /path/to/other/checkout   # measure another checkout's code

``bench/results.py --family scale`` runs it and renders ``bench/results/scale.md`` and its plot.

Throughput cell (one transport, one client count N): a fresh ``poolsvc serve`` daemon of
the measured tree, N forked client processes that each connect (one connection per
process), open a Context and wait at a gate; the gate opens for all at once and each
process loops ``ctx.alloc_user_buf(4096).close()`` for ``--seconds``, timing every
pair.  Figures: the pairs of all processes per second, the p50 and p99 of one pair over
all processes, the daemon's CPU time per pair, and the throughput as a fraction of the
8-process figure of the same transport and round (the ratio the scaling goals are stated
in: issue "Hundreds of clients without collapse").  With ``--rounds`` > 1 the cells are
run round by round (each round every count, each count both transports, alternated) and
each figure is the median over rounds.

Memory cell: a fresh daemon, its ``VmRSS`` (``/proc/<pid>/status``); ``--idle`` client
processes connect, each with a Context and one 4 KiB alloc + close, then stay idle; once
all are connected, ``VmRSS`` again: (after - before) / N is the daemon's memory per idle
connected client.

The output is a JSON document (``format: poolsvc-bench-scale/1``) on stdout or in
``--json``.  Single figures on a shared machine deserve scepticism: read the ratios taken
in one run, and the load average recorded beside them.

Concurrency: forks the client processes (before any thread exists in this process);
every daemon and client it starts is ended before it returns.
"""
from __future__ import annotations

import argparse
import array
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FORMAT = "poolsvc-bench-scale/1"
REFERENCE_CLIENTS = 8
PAIR_SIZE = 4096
#: Seconds allowed for a daemon to come up and for every client to connect.
START_TIMEOUT = 300.0
#: ``connect(shm_spin_us=...)`` of the clients (None: the library's default); ``--client-spin-us``.
CLIENT_SPIN_US: float | None = None


def _loadavg() -> list[float]:
    with open("/proc/loadavg") as fh:
        return [float(x) for x in fh.read().split()[:3]]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _quantile(sorted_values: array.array, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Daemon:
    """``poolsvc serve`` of ``tree`` on a socket in ``workdir``, sized for ``clients``."""

    def __init__(self, tree: Path, workdir: str, clients: int) -> None:
        self.path = os.path.join(workdir, f"scale-{os.getpid()}.sock")
        config = os.path.join(workdir, "scale.toml")
        with open(config, "w") as fh:  # room for every client process (one connection each)
            fh.write(f"[service]\nmax_clients = {max(256, clients + 16)}\n")
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc", "serve", "--socket", self.path,
                                      "--config", config, "--log-level", "warning"], cwd=str(tree), env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not start (status {self.proc.returncode})")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _client(index: int, socket_path: str, transport: str, seconds: float, ready_w: int, gate_r: int,
            out_path: str) -> None:
    """A forked client process: connect, report ready, wait at the gate, then (``seconds``
    > 0) alloc + close pairs for ``seconds``, or (0) stay idle until the gate closes.
    Writes its pair count and timings (or its error) to ``out_path``."""
    import poolsvc

    result: dict[str, Any] = {"pairs": 0, "error": None}
    latencies = array.array("d")
    try:
        spin = {} if CLIENT_SPIN_US is None else {"shm_spin_us": CLIENT_SPIN_US}
        client = poolsvc.connect(socket_path, name=f"scale-{index}", transport=transport,
                                 connect_timeout=START_TIMEOUT, timeout=START_TIMEOUT, **spin)
        ctx = client.open_context()
        ctx.alloc_user_buf(PAIR_SIZE).close()
        ctx.flush()
        os.write(ready_w, b"r")
        os.read(gate_r, 1)  # returns at EOF: the gate is open
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        if seconds > 0:
            clock = time.perf_counter
            alloc = ctx.alloc_user_buf
            record = latencies.append
            end = clock() + seconds
            now = clock()
            while now < end:
                start = now
                alloc(PAIR_SIZE).close()
                now = clock()
                record(now - start)
            ctx.flush()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        result.update(pairs=len(latencies),
                      cpu_s=usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime,
                      sleeps=usage1.ru_nvcsw - usage0.ru_nvcsw, preempted=usage1.ru_nivcsw - usage0.ru_nivcsw)
        client.close()
    except BaseException as exc:  # reported, not raised: the parent counts failures
        result["error"] = f"{type(exc).__name__}: {exc}"
    with open(out_path, "wb") as fh:
        head = json.dumps(result).encode()
        fh.write(len(head).to_bytes(4, "little") + head + latencies.tobytes())


def _run_clients(daemon: Daemon, workdir: str, count: int, transport: str, seconds: float,
                 while_idle: Any = None) -> dict[str, Any]:
    """Fork ``count`` clients against ``daemon``, open the gate once all are ready, gather
    their results.  ``while_idle(daemon)`` runs once all are connected, before the gate."""
    ready_r, ready_w = os.pipe()
    gate_r, gate_w = os.pipe()
    outs = [os.path.join(workdir, f"client-{i}.bin") for i in range(count)]
    pids = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                os.close(ready_r)
                os.close(gate_w)
                _client(i, daemon.path, transport, seconds, ready_w, gate_r, outs[i])
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    os.close(ready_w)
    os.close(gate_r)
    ready = 0
    while ready < count:
        got = os.read(ready_r, 4096)
        if not got:
            break  # every client either reported ready or exited
        ready += len(got)
    os.close(ready_r)
    figures: dict[str, Any] = {"ready": ready}
    if while_idle is not None:
        figures.update(while_idle(daemon))
    cpu0, load0, t0 = _cpu_seconds(daemon.proc.pid), _loadavg(), time.perf_counter()
    os.close(gate_w)
    for pid in pids:
        os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    daemon_cpu = _cpu_seconds(daemon.proc.pid) - cpu0
    pairs, errors = 0, []
    cpu = sleeps = preempted = 0.0
    latencies = array.array("d")
    for path in outs:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            os.unlink(path)
        except OSError:
            errors.append("no result")
            continue
        n = int.from_bytes(data[:4], "little")
        result = json.loads(data[4:4 + n])
        if result["error"]:
            errors.append(result["error"])
        pairs += result["pairs"]
        cpu += result.get("cpu_s", 0.0)
        sleeps += result.get("sleeps", 0)
        preempted += result.get("preempted", 0)
        latencies.frombytes(data[4 + n:])
    ordered = array.array("d", sorted(latencies))
    per_pair = 1 / pairs if pairs else 0.0
    figures.update(pairs=pairs, wall_s=round(wall, 2), daemon_cpu_s=round(daemon_cpu, 2),
                   client_cpu_s=round(cpu, 2), client_us_per_pair=round(cpu * per_pair * 1e6, 1),
                   client_sleeps_per_pair=round(sleeps * per_pair, 2),
                   client_preemptions_per_pair=round(preempted * per_pair, 3),
                   p50_us=round(_quantile(ordered, 0.5) * 1e6, 1),
                   p99_us=round(_quantile(ordered, 0.99) * 1e6, 1),
                   errors=len(errors), first_errors=errors[:3], loadavg=load0)
    return figures


def throughput_cell(tree: Path, transport: str, count: int, seconds: float) -> dict[str, Any]:
    """One cell: ``count`` processes doing alloc + close pairs for ``seconds`` (module doc)."""
    with tempfile.TemporaryDirectory(prefix="poolsvc-scale-") as workdir:
        daemon = Daemon(tree, workdir, count)
        try:
            got = _run_clients(daemon, workdir, count, transport, seconds)
        finally:
            daemon.stop()
    got.update(transport=transport, clients=count, pairs_per_s=round(got["pairs"] / seconds),
               daemon_us_per_pair=round(got["daemon_cpu_s"] / got["pairs"] * 1e6, 1) if got["pairs"] else None)
    return got


def memory_cell(tree: Path, transport: str, count: int) -> dict[str, Any]:
    """The daemon's RSS per idle connected client, with ``count`` clients (module doc)."""
    with tempfile.TemporaryDirectory(prefix="poolsvc-scale-") as workdir:
        daemon = Daemon(tree, workdir, count)
        try:
            time.sleep(0.5)  # let the daemon finish starting before the baseline
            before = _rss_kib(daemon.proc.pid)

            def after(d: Daemon) -> dict[str, Any]:
                return {"rss_after_kib": _rss_kib(d.proc.pid)}

            got = _run_clients(daemon, workdir, count, transport, 0.0, after)
        finally:
            daemon.stop()
    per = (got["rss_after_kib"] - before) / got["ready"] if got["ready"] else None
    return {"transport": transport, "clients": count, "ready": got["ready"], "errors": got["errors"],
            "rss_before_kib": before, "rss_after_kib": got["rss_after_kib"],
            "kib_per_client": round(per, 1) if per is not None else None}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def study(tree: Path, counts: list[int], transports: list[str], seconds: float, rounds: int,
          idle: int) -> dict[str, Any]:
    """Every cell, round by round; the JSON document (module doc)."""
    started = time.time()
    load_start = _loadavg()
    cells: list[dict[str, Any]] = []
    for r in range(rounds):
        for count in counts:
            for transport in (transports if r % 2 == 0 else transports[::-1]):
                cell = throughput_cell(tree, transport, count, seconds)
                cell["round"] = r
                cells.append(cell)
                print(f"round {r} {transport:6} {count:5} clients: {cell['pairs_per_s']:9,} pairs/s "
                      f"p50 {cell['p50_us']:9,.1f} us p99 {cell['p99_us']:10,.1f} us "
                      f"errors {cell['errors']}", file=sys.stderr, flush=True)
    for cell in cells:  # each cell against the reference count of its own round and transport
        ref = next((c for c in cells if c["round"] == cell["round"] and c["transport"] == cell["transport"]
                    and c["clients"] == REFERENCE_CLIENTS), None)
        cell["of_reference"] = (round(cell["pairs_per_s"] / ref["pairs_per_s"], 3)
                                if ref and ref["pairs_per_s"] else None)
    rows = []
    for transport in transports:
        for count in counts:
            mine = [c for c in cells if c["transport"] == transport and c["clients"] == count]
            rows.append({"transport": transport, "clients": count, "runs": len(mine),
                         "pairs_per_s": _median([c["pairs_per_s"] for c in mine]),
                         "of_reference": _median([c["of_reference"] for c in mine]),
                         "p50_us": _median([c["p50_us"] for c in mine]),
                         "p99_us": _median([c["p99_us"] for c in mine]),
                         "daemon_us_per_pair": _median([c["daemon_us_per_pair"] for c in mine]),
                         "errors": sum(c["errors"] for c in mine)})
    memory = [memory_cell(tree, transport, idle) for transport in transports] if idle else []
    for m in memory:
        print(f"memory {m['transport']:6} {m['clients']} idle clients: {m['kib_per_client']} KiB each",
              file=sys.stderr, flush=True)
    return {"format": FORMAT, "tree": str(tree), "counts": counts, "transports": transports,
            "seconds": seconds, "rounds": rounds, "reference_clients": REFERENCE_CLIENTS,
            "pair": f"alloc_user_buf({PAIR_SIZE}) + close", "cpus": os.cpu_count(),
            "loadavg_start": load_start, "loadavg_end": _loadavg(),
            "run_s": round(time.time() - started, 1), "rows": rows, "memory": memory, "cells": cells}


def parse_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise SystemExit(f"--counts: {text!r} is not a list of distinct positive client counts")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=parse_counts, default=[1, 8, 64, 256],
                        help="client process counts (default 1,8,64,256)")
    parser.add_argument("--transports", default="socket,shm",
                        help="comma-separated transports (default socket,shm)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per cell (default 5)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every cell (default 1)")
    parser.add_argument("--idle", type=int, default=256,
                        help="idle clients of the memory cell (default 256; 0: no memory cell)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="checkout whose poolsvc is measured (default this one)")
    parser.add_argument("--client-spin-us", type=float,
                        help="the clients' connect(shm_spin_us=...) (default: the library's)")
    parser.add_argument("--json", type=Path, help="write the document here (default stdout)")
    args = parser.parse_args(argv)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not transports or set(transports) - {"socket", "shm"}:
        raise SystemExit(f"--transports: {args.transports!r}: expected socket, shm or both")
    global CLIENT_SPIN_US
    CLIENT_SPIN_US = args.client_spin_us
    tree = args.tree.resolve()
    sys.path.insert(0, str(tree))  # the forked clients import the measured tree's poolsvc
    import poolsvc

    if not Path(poolsvc.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"poolsvc imports from {poolsvc.__file__}, not from {tree}")
    doc = study(tree, args.counts, transports, args.seconds, args.rounds, args.idle)
    text = json.dumps(doc, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
