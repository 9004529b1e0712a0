"""Regenerate the results files in ``bench/results/``: one Markdown file per benchmark family.

Usage (from the repository root)::

    python bench/results.py                      # every pytest-benchmark family
    python bench/results.py --family alloc       # one family (repeat --family for more)
    python bench/results.py --family study       # the study behind `poolsvc bench`
    python bench/results.py --family load        # four 60 s `poolsvc load` runs
    python bench/results.py --family scale       # bench/scale.py: throughput against clients
    python bench/results.py --family sweep       # `poolsvc load --sweep`: the same, load clients
    POOLSVC_PUREPYTHON=1 python bench/results.py --family system   # the pure backend

Owns: the list of families (which benchmark files or commands make each), running
them (pytest with ``--benchmark-json`` to a temporary file, the ``poolsvc``
command with ``--json``, or ``bench/scale.py``), and rendering each family's figures as
``bench/results/<family>.md`` under a header that names the machine (CPU model,
cores, Python, numpy, backend), the date, the commit and the command that
regenerates the file.  The figures are whatever the run measured; nothing here
edits them.

Single figures on a shared machine deserve scepticism: each benchmark compares a
kernel with its floor or its pure twin in the same run, and the ratios are the
figures to read.  The header records the load average before the run.

Concurrency: runs the families one after the other, each in its own subprocess.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Target:
    """One docs/design.md section 7 target, read from a family's benchmarks."""

    name: str
    target: str
    #: benchmarks -> the measured value, or None when the run did not produce it
    measure: Callable[[list[dict[str, Any]]], float | None]
    met: Callable[[float], bool]
    unit: str = ""


@dataclass(frozen=True)
class Family:
    """A benchmark family: what runs it and what its results file says about it."""

    name: str
    title: str
    files: tuple[str, ...] = ()
    about: str = ""
    targets: tuple[Target, ...] = field(default_factory=tuple)


def _find(benchmarks: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for b in benchmarks:
        if b["name"] == name:
            return b
    return None


def _extra(name: str, key: str, scale: float = 1.0) -> Callable[[list[dict[str, Any]]], float | None]:
    """The ``extra_info[key]`` of benchmark ``name`` times ``scale``."""
    def get(benchmarks: list[dict[str, Any]]) -> float | None:
        b = _find(benchmarks, name)
        if b is None or key not in b.get("extra_info", {}):
            return None
        return float(b["extra_info"][key]) * scale
    return get


def _share(name: str, floor: str) -> Callable[[list[dict[str, Any]]], float | None]:
    """Bandwidth of benchmark ``name`` as a fraction of benchmark ``floor``'s."""
    def get(benchmarks: list[dict[str, Any]]) -> float | None:
        a, b = _find(benchmarks, name), _find(benchmarks, floor)
        if a is None or b is None:
            return None
        return b["stats"]["median"] / a["stats"]["median"]
    return get


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda v: v <= limit


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda v: v >= limit


def _service_targets() -> tuple[Target, ...]:
    out = []
    for transport, label in (("sock", "socket"), ("shm", "shm")):
        for kind in ("priv", "user"):
            out.append(Target(f"{label}: alloc_{kind}_buf + close / bare round trip", "<= 1.5",
                              _extra("test_service_ratios", f"{transport}_ratio_{kind}"), _at_most(1.5), "x"))
            out.append(Target(f"{label}: alloc_{kind}_buf batched / single ops/s", ">= 10",
                              _extra("test_service_ratios", f"{transport}_batch_gain_{kind}"),
                              _at_least(10), "x"))
    return tuple(out)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("alloc", "Allocators", ("bench/test_bench_alloc.py",),
           "Alloc + free pairs of 1-16 pages from Python on pools held at 50% occupancy, beside "
           "the floors (pure-Python first-fit, a word-scan bitmap, `multiprocessing.heap`, the "
           "compiled call itself).",
           (Target("FrameAllocator alloc_contig + free_contig pair", "<= 150 ns",
                   _extra("test_frames_pair_compiled", "ns_per_op"), _at_most(150), " ns"),)),
    Family("pagelist", "Page lists", ("bench/test_bench_pagelist.py",),
           "Build, parse and merge of OP-TEE page lists for 1 GiB and 1 MiB buffers, beside a "
           "numpy copy of the same list bytes and the pure-Python twin.",
           (Target("build 1 GiB / copy of its 2 MiB list", "<= 1.25",
                   _extra("test_build_ratio_1gib_vs_copy", "ratio_median"), _at_most(1.25), "x"),
            Target("build 1 MiB", "<= 1 µs",
                   _extra("test_build_1mib_compiled", "us_per_call"), _at_most(1.0), " µs"),
            Target("compiled / pure build", ">= 200",
                   _extra("test_build_ratio_compiled_vs_pure", "ratio_median"), _at_least(200), "x"))),
    Family("register", "Registration", ("bench/test_bench_register.py",),
           "register_user_buf + close against alloc_user_buf + close of the same size, interleaved "
           "in one run, and the per-page cost of registration against alloc_scattered's.",
           (Target("register / alloc + close, 4 KiB", "<= 3",
                   _extra("test_register_ratios", "ratio_4k"), _at_most(3.0), "x"),
            Target("register / alloc + close, 1 MiB", "<= 1.5",
                   _extra("test_register_ratios", "ratio_1m"), _at_most(1.5), "x"),
            Target("per page: registration / alloc_scattered", "<= 2",
                   _extra("test_register_ratios", "ratio_per_page"), _at_most(2.0), "x"))),
    Family("tables", "Lookups", ("bench/test_bench_tables.py",),
           "Per-call cost from Python of the frame table, id table and address map, and the "
           "frame table's batch translation, beside the pure-Python twin.",
           tuple(Target(f"{label} per call", "<= 100 ns", _extra(name, "ns_per_call"), _at_most(100), " ns")
                 for name, label in (
                     ("test_frame_table[lookup-compiled]", "FrameTable.lookup"),
                     ("test_frame_table[translate-compiled]", "FrameTable.translate"),
                     ("test_id_table_find[compiled]", "IdTable.find"),
                     ("test_address_map_lookup[compiled]", "AddressMap.lookup")))),
    Family("copy", "Gather / scatter", ("bench/test_bench_copy.py",),
           "Gather and scatter through the frame table of buffers whose pages are scattered over "
           "their storage, beside `numpy.copyto` of the same size.",
           tuple(Target(f"{op} {size} / numpy.copyto bandwidth", ">= 60%",
                        _share(f"test_copy[compiled-{op}-{size}]", f"test_copyto_floor[{size}]"),
                        _at_least(0.6), "x")
                 for size in ("1MiB", "64MiB") for op in ("gather", "scatter"))),
    Family("system", "The embedded System", ("bench/test_bench_system.py",),
           "The System's allocation and registration paths (alloc + close, register + close), "
           "beside their floors: the frame allocator pair, the arena kernel, the REGISTER / "
           "UNREGISTER message round trip, and both ends of the message call alone."),
    Family("wire", "Batch framing and arena kernels", ("bench/test_bench_wire.py",),
           "The kernels of the service's batched path (`split_frames`, `run_batch`) and the dynamic "
           "pool's per-allocation kernel (`ArenaPages.take` / `give`), compiled beside pure."),
    Family("tee", "Sessions with the secure world", ("bench/test_bench_tee.py",),
           "The SHA-256 trusted app over a 32 MiB registered buffer beside `hashlib` in the "
           "benchmark process, and one `invoke` on 64 bytes with each kind of memref the driver "
           "converts (registered, temporary private memory bounced through the pool, temporary "
           "POSIX shared memory registered for the call)."),
    Family("service", "Pool service", ("bench/test_bench_service.py",),
           "Round trips through a `poolsvc serve` daemon on both transports (socket, shm slot), "
           "against a bare Unix-socket echo between two Python processes in the same run. "
           "`test_service_ratios` interleaves everything round by round; its figures are "
           "medians over rounds (`bench/README.md` defines each one).",
           _service_targets()),
    Family("fastpath", "The daemon's compiled ALLOC and SHM_CLOSE", ("bench/test_bench_fastpath.py",),
           "An ALLOC + SHM_CLOSE pair through the handlers of an in-process daemon (real "
           "connections, the compiled System), served by the compiled `ShmRequests` "
           "(ext/fastpath.pyx) and by its plain-Python twin, for the dynamic and the static pool; "
           "`test_fastpath_ratio` interleaves both round by round (`docs/core.md`)."),
    Family("client", "The client library's CPU per operation", ("bench/test_bench_client.py",),
           "The client side alone of ALLOC, `view()` and SHM_CLOSE, single and in batches of 256, "
           "over a channel answered from canned replies (no daemon), beside the floor of the bare "
           "struct calls a request needs; `test_client_ratios` interleaves them round by round."),
    Family("clientwire", "The client's compiled request round trip", ("bench/test_bench_clientwire.py",),
           "PING, and ALLOC behind a pipelined SHM_CLOSE, through the client wire (ext/clientwire.pyx) "
           "and its plain-Python twin, on both transports, against an in-process peer that answers "
           "before each request, so that only the client's part is timed; "
           "`test_clientwire_ratios` interleaves both backends round by round (`docs/core.md`)."),
    Family("study", "The study behind `poolsvc bench`",
           about="Contiguous allocation, the reserved static pool and registered scattered pages, "
                 "by buffer size and fragmentation level (`docs/benchmarks.md` explains the "
                 "columns and the plots). Failure rates and the mechanism's counts (frames, runs, "
                 "list pages, messages, pinned pages) depend only on the seed; times and "
                 "bandwidths on the machine."),
    Family("load", "Load: `poolsvc load`",
           about="Eight client processes for 60 s (counted once every client is connected) "
                 "against a `poolsvc serve` daemon started for the run, with SIGKILLs and "
                 "malformed requests (`docs/load.md`): the default mix in single requests, then in "
                 "batches of 256; then ALLOC and CLOSE of 4 KiB alone, single, then batched."),
    Family("scale", "Scaling: throughput against client processes",
           about="`bench/scale.py`: N forked client processes (1 to 1,024) against a fresh `poolsvc "
                 "serve` daemon and a fresh plain-Python echo server per cell, on the socket and shm "
                 "transports and on shm without turns (`shm-freeforall`, `max_polled_slots = 0`); in "
                 "each cell every process loops `alloc_user_buf(4096)` + `close`, then the two floors "
                 "(an empty PING through the daemon, a 16-byte echo with the echo server), each in a "
                 "common window; cells alternated round by round, figures are medians over rounds "
                 "(`docs/load.md`, \"Scaling\"). Per cell also the start-up time and the daemon's "
                 "memory and descriptors per connected client."),
    Family("sweep", "Scaling under `poolsvc load`: alloc + free against client processes",
           about="`poolsvc load --sweep` (`docs/load.md`, \"Sweep\"): the load harness's client "
                 "processes (each checks every buffer it holds, keeps latency histograms and reports "
                 "four times a second) allocate and free 4 KiB buffers, one request each, against a "
                 "fresh `poolsvc serve` per run with its default settings; the counts run in turn, "
                 "round after round, and each row gives medians over the rounds, its ratio to 8 "
                 "clients taken within each round."),
)}

#: Families run by default: everything that pytest-benchmark measures.
PYTEST_FAMILIES = ("alloc", "pagelist", "tables", "copy", "system", "register", "wire", "tee", "service",
                   "fastpath", "client", "clientwire")

LOAD_RUNS = (
    ("single requests", ["--clients", "8", "--duration", "60", "--kill-rate", "0.5",
                         "--malformed-rate", "5"]),
    ("batched (256)", ["--clients", "8", "--duration", "60", "--batch", "256", "--max-live", "512",
                       "--kill-rate", "0.5", "--malformed-rate", "5"]),
    # ALLOC and CLOSE alone against the same targets, with SIGKILLs: the requests the
    # daemon serves in compiled code (docs/core.md, ShmRequests)
    ("alloc + close, single", ["--clients", "8", "--duration", "60", "--mix", "alloc_user=1,free=1",
                               "--sizes", "fixed:4096", "--kill-rate", "1"]),
    ("alloc + close, batched (256)", ["--clients", "8", "--duration", "60", "--batch", "256",
                                      "--mix", "alloc_user=1,free=1", "--sizes", "fixed:4096",
                                      "--kill-rate", "1"]),
)


# -- the machine --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(backend: str) -> dict[str, str]:
    import numpy

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = f"{mem / (1 << 30):.0f} GiB"
    except (ValueError, OSError):  # pragma: no cover
        memory = "unknown"
    return {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} ({usable} usable by this process)",
        "memory": memory,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": numpy.__version__,
        "backend": backend,
        "load average before the run": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "ext", "poolsvc", "bench",
                ":(exclude)bench/results")
    return rev + (" (with uncommitted changes)" if dirty else "")


def header(family: Family, info: dict[str, str], command: str, started: datetime.datetime,
           seconds: float) -> list[str]:
    out = [f"# Results: {family.title}", "",
           "Generated by `bench/results.py`; do not edit by hand. Regenerate with:", "",
           "```sh", command, "```", "",
           "| | |", "|---|---|",
           f"| date | {started.strftime('%Y-%m-%d %H:%M UTC')} |",
           f"| run time | {seconds // 60:.0f} min {seconds % 60:.0f} s |",
           f"| commit | {commit()} |"]
    out += [f"| {k} | {v} |" for k, v in info.items()]
    out += ["",
            "The machine may be shared with other jobs, so single figures deserve scepticism: "
            "compare figures taken in the same run (each benchmark sits beside its floor or its "
            "pure-Python twin) and read the ratios rather than absolute times.", ""]
    if family.about:
        out += [family.about, ""]
    return out


# -- pytest-benchmark families ------------------------------------------------------------------

def per_op(b: dict[str, Any]) -> tuple[float, str]:
    """The benchmark's cost per operation in nanoseconds, and what the operation is."""
    extra = b.get("extra_info", {})
    for key, scale in (("ns_per_op", 1.0), ("ns_per_call", 1.0), ("us_per_op", 1e3), ("us_per_call", 1e3)):
        if key in extra:
            return float(extra[key]) * scale, "op"
    ops = extra.get("ops_per_call") or extra.get("ops_per_round") or extra.get("calls_per_round") or 1
    return b["stats"]["median"] * 1e9 / ops, ("op" if ops != 1 else "call")


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:,.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:,.2f} µs"
    return f"{ns:,.1f} ns"


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v) or "none"
    return str(v).replace("|", "\\|")


def what(b: dict[str, Any]) -> str:
    extra = b.get("extra_info", {})
    text = extra.get("op") or extra.get("what") or ""
    return str(text).replace("|", "\\|")


def group_tables(benchmarks: list[dict[str, Any]]) -> list[str]:
    """One table per pytest-benchmark group (else per test function): median per operation, and
    the ratio to the group's reference row (its first compiled row, else its first row)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for b in benchmarks:
        if _many_figures(b):
            continue                 # rendered by figure_tables
        groups.setdefault(b.get("group") or b["name"].split("[")[0], []).append(b)
    out: list[str] = []
    for name, rows in groups.items():
        ref = next((b for b in rows if "compiled" in b["name"]), rows[0])
        ref_ns = per_op(ref)[0]
        cols = [("benchmark", "---"), ("what", "---"), ("median per op", "---:"),
                (f"vs `{ref['name']}`", "---:"), ("extra", "---"), ("rounds", "---:")]
        table = []
        for b in rows:
            ns, _ = per_op(b)
            extra = ", ".join(f"{k} {fmt_value(v)}" for k, v in b.get("extra_info", {}).items()
                              if k in ("GB_per_s", "GB_per_s_in_out", "ratio_median", "target"))
            table.append([f"`{b['name']}`", what(b), fmt_ns(ns), f"{ns / ref_ns:.2f}x", extra,
                          str(b["stats"]["rounds"])])
        # drop the optional columns this group leaves empty, and the ratio of a lone row
        keep = [k for k in range(len(cols))
                if not (k in (1, 4) and not any(row[k] for row in table)) and not (k == 3 and len(rows) == 1)]
        out += [f"### {name}", "", "| " + " | ".join(cols[k][0] for k in keep) + " |",
                "|" + "|".join(cols[k][1] for k in keep) + "|"]
        out += ["| " + " | ".join(row[k] for k in keep) + " |" for row in table]
        out.append("")
    return out


def _numeric_extra(b: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in b.get("extra_info", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _many_figures(b: dict[str, Any]) -> bool:
    """True for a benchmark that records figures of its own (``test_service_ratios``, or any
    that sets ``extra_info["figures"] = True``) rather than one timed operation."""
    return b.get("extra_info", {}).get("figures") is True or len(_numeric_extra(b)) >= 6


def figure_tables(benchmarks: list[dict[str, Any]]) -> list[str]:
    """Every numeric ``extra_info`` entry of the benchmarks that record many figures."""
    out: list[str] = []
    for b in benchmarks:
        if not _many_figures(b):
            continue
        numeric = _numeric_extra(b)
        out += [f"### Figures of `{b['name']}`", "", "| figure | median |", "|---|---:|"]
        out += [f"| `{k}` | {fmt_value(v)} |" for k, v in numeric.items()]
        out.append("")
    return out


def target_table(family: Family, benchmarks: list[dict[str, Any]]) -> list[str]:
    if not family.targets:
        return []
    out = ["## Targets (docs/design.md section 7)", "",
           "| target | measured | wanted | met |", "|---|---:|---|---|"]
    for t in family.targets:
        value = t.measure(benchmarks)
        if value is None:
            out.append(f"| {t.name} | not measured | {t.target} | - |")
            continue
        shown = f"{value:.0%}" if t.target.endswith("%") else f"{value:,.3g}{t.unit}"
        out.append(f"| {t.name} | {shown} | {t.target} | {'yes' if t.met(value) else '**no**'} |")
    return out + [""]


def render_pytest(family: Family, doc: dict[str, Any]) -> list[str]:
    """The body of a pytest-benchmark family's results file."""
    benchmarks = doc["benchmarks"]
    out = target_table(family, benchmarks)
    out += ["## All benchmarks", "",
            "Medians per operation (pytest-benchmark's median round divided by the operations "
            "the round performs); ratios are of medians of this run.", ""]
    out += group_tables(benchmarks)
    out += figure_tables(benchmarks)
    return out


def run_pytest(family: Family, pytest_args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="poolsvc-results-") as tmp:
        path = os.path.join(tmp, "benchmark.json")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *family.files,
               f"--benchmark-json={path}", *pytest_args]
        print("running:", shlex.join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, check=False)
        if proc.returncode != 0 or not os.path.exists(path):
            raise SystemExit(f"{family.name}: pytest exited with status {proc.returncode}")
        with open(path) as fh:
            return json.load(fh)


# -- command families ---------------------------------------------------------------------------

def study_body(report: str, folder: str) -> list[str]:
    """The body of ``study.md`` from the study's ``report.md`` (saved in ``folder``, beside
    ``study.md``): its own title dropped, and its links to files beside it (``latency.png``)
    made relative to ``study.md`` (``study/latency.png``)."""
    lines = report.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = "\n".join(lines).strip("\n")
    return [re.sub(r"\]\((?![a-z]+:|/|#)([^)]+)\)", lambda m: f"]({folder}/{m.group(1)})", text)]


def run_study(output: Path) -> list[str]:
    """Run ``poolsvc bench`` with its defaults, saving its folder (report.md, results.json and
    the plots) as ``<output>/study/``; returns the body of ``study.md``."""
    from poolsvc.study import DEFAULT_TRIALS

    folder = output / "study"
    for old in folder.glob("*"):
        old.unlink()                 # the folder holds this run's files only
    cmd = [sys.executable, "-m", "poolsvc", "bench", "--out", str(folder)]
    print("running:", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"study: poolsvc bench exited with status {proc.returncode}")
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    out = [f"Command run: `python -m poolsvc bench --out {shown}` with its defaults "
           f"(`--seed 1`, {DEFAULT_TRIALS:,} attempts per cell). That folder holds its report "
           f"([study/report.md](study/report.md)), every figure as JSON "
           f"([study/results.json](study/results.json)) and the plots.", ""]
    return out + study_body((folder / "report.md").read_text(), folder.name)


def run_load() -> list[str]:
    """Run the standard loads of ``LOAD_RUNS``; returns the body of ``load.md``: one row per
    run (throughput beside its docs/design.md section 7 target, faults, checks), then the latency
    percentiles of each run per operation and over every operation."""
    from poolsvc.load.mix import TIMED
    from poolsvc.load.report import TARGET_BATCHED, TARGET_SINGLE

    out = ["| run | command options | ops/s | target ops/s | of target | connect s | kills | "
           "malformed | violations | leaks | result |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    latency: list[str] = []
    with tempfile.TemporaryDirectory(prefix="poolsvc-results-") as tmp:
        for label, options in LOAD_RUNS:
            path = os.path.join(tmp, "load.json")
            cmd = [sys.executable, "-m", "poolsvc", "load", *options, "--json", path]
            print("running:", shlex.join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
            if not os.path.exists(path):
                raise SystemExit(f"load: {label}: no report written")
            with open(path) as fh:
                report = json.load(fh)
            os.unlink(path)
            leaks = report.get("leaks", {})
            target = TARGET_BATCHED if report["spec"]["batch"] > 1 else TARGET_SINGLE
            out.append(f"| {label} | `{' '.join(options)}` | {report['ops_per_s']:,.0f} | {target:,} | "
                       f"{report['ops_per_s'] / target:.0%} | {report.get('start_s', 0.0):.1f} | "
                       f"{report['faults']['kills']} | {report['faults']['malformed_sent']} | "
                       f"{report.get('violations', {}).get('count', '?')} | "
                       f"{', '.join(f'{k} {v:+d}' for k, v in leaks.items()) or 'none'} | "
                       f"{'OK' if report.get('ok') else 'FAILED'} |")
            latency += [f"### Latency seen by the clients, {label} (µs)", "",
                        "| operation | count | p50 | p90 | p99 | p99.9 |", "|---|---:|---:|---:|---:|---:|"]
            rows = [(op, report["ops"].get(op)) for op in TIMED]
            rows.append(("every operation", report.get("latency_us")))
            for op, e in rows:
                if e:
                    latency.append(f"| {op} | {e['count']:,} | {e['p50_us']:,.1f} | {e['p90_us']:,.1f} | "
                                   f"{e['p99_us']:,.1f} | {e['p999_us']:,.1f} |")
            latency.append("")
    return ["The load targets are those of docs/design.md section 7. 'connect s': the time the "
            "clients took to connect before the run's clock started (not counted). A batched "
            "operation's latency is its batch's round trip divided by its size; the `batch` row "
            "is the round trip itself (docs/load.md). Percentiles are exact to 3 significant "
            "digits.", ""] + out + [""] + latency


SWEEP_ARGS = ["--sweep", "8,64,256", "--rounds", "5", "--duration", "10", "--mix", "alloc_user=1,free=1",
              "--sizes", "fixed:4096"]


def sweep_body(doc: dict[str, Any], folder: str) -> list[str]:
    """The body of ``sweep.md`` from a ``poolsvc load --sweep`` document: its table, the
    goal judged at ``SCALE_RATIO_COUNTS``, and a link to the plot in ``folder``."""
    from poolsvc.load import sweep

    out = sweep.markdown(doc).splitlines() + [
        "", f"Goal: at least {SCALE_RATIO_GOAL:.0%} of the {doc['reference_clients']}-client throughput with "
        f"{', '.join(map(str, SCALE_RATIO_COUNTS))} clients (the median of the rounds' ratios).", "",
        "| clients | of ref | goal met |", "|---:|---:|---|"]
    for r in doc["rows"]:
        if r["clients"] in SCALE_RATIO_COUNTS:
            met = "-" if r["of_reference"] is None else (
                "yes" if r["of_reference"] >= SCALE_RATIO_GOAL else "**no**")
            out.append(f"| {r['clients']:,} | {_ratio(r['of_reference'])} | {met} |")
    return out + ["", f"![throughput and latency against client processes]({folder}/sweep.png)"]


def run_sweep(output: Path) -> list[str]:
    """Run ``poolsvc load`` with ``SWEEP_ARGS``, keep its JSON and plot in ``<output>/sweep/``;
    returns the body of ``sweep.md``."""
    folder = output / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    cmd = [sys.executable, "-m", "poolsvc", "load", *SWEEP_ARGS, "--quiet", "--json", str(path),
           "--plot", str(folder)]
    print("running:", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    if not path.exists():
        raise SystemExit(f"sweep: poolsvc load exited with status {proc.returncode}, no report written")
    doc = json.loads(path.read_text())
    doc.pop("runs", None)  # each run's whole report: the table's figures are in the rows
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return [f"Command run: `poolsvc load {' '.join(SWEEP_ARGS)}`; the rows in "
            f"[sweep/results.json](sweep/results.json).", ""] + sweep_body(doc, folder.name)


SCALE_ARGS = ["--counts", "1,8,64,256,1024", "--transports", "socket,shm,shm-freeforall", "--rounds", "3",
              "--seconds", "5", "--time-limit", "2400"]
#: The goals the scale family is judged against (issue "Hundreds of clients without collapse"):
#: alloc + close throughput at these counts against the reference count's, and the daemon's
#: memory per idle connected client from this count on (fewer clients leave it to noise).
SCALE_RATIO_GOAL = 0.7
SCALE_RATIO_COUNTS = (64, 256)
SCALE_RSS_GOAL_KIB = 256
SCALE_RSS_FROM = 256


def _fmt(value: Any, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def scale_body(doc: dict[str, Any], folder: str) -> list[str]:
    """The body of ``scale.md`` from a ``bench/scale.py`` document: the figures of every
    workload, the ratios beside their floors with the goals, start-up and memory, and a
    link to the plot in ``folder`` (beside ``scale.md``)."""
    ref = doc["reference_clients"]
    load = doc["loadavg_start"], doc["loadavg_end"]
    pairs = "; ".join(f"`{w}`: {what}" for w, what in doc["pairs"].items())
    out = [f"Pairs: {pairs}. {doc['seconds']:g} s per workload, {doc['rounds']} round(s), {doc['cpus']} CPUs; "
           f"load average {' '.join(map(str, load[0]))} at the start, {' '.join(map(str, load[1]))} at the "
           f"end. 'of {ref}': pairs/s as a fraction of the same workload's {ref}-process figure of the same "
           "transport and round (median over rounds). p50 / p99 / p99.9 / max: one pair, over every pair "
           "of every process. `shm-freeforall`: shm with `max_polled_slots = 0`, every slot polled, so "
           "that the kernel's scheduler alone picks which client runs (`shm` takes turns, "
           "`docs/protocol.md`, \"Turns\"). Server: the daemon (`raw`: the echo server), its CPU time and "
           "context switches over the window per pair. Client: CPU time, sleeps (voluntary context switches) "
           "and preemptions "
           "(involuntary ones) per pair, over all processes (`docs/load.md`, \"Scaling\").", "",
           f"![pairs/s, ratios and latency against client processes]({folder}/scale.png)", "",
           f"| transport | clients | workload | pairs/s | of {ref} | p50 µs | p99 µs | p99.9 µs | max µs | "
           "server CPU µs / pair | server switches / pair | client CPU µs / pair | client sleeps / pair | "
           "client preemptions / pair | errors |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        out.append(f"| {r['transport']} | {r['clients']:,} | {r['workload']} | {_fmt(r['pairs_per_s'], ',.0f')} | "
                   f"{_ratio(r['of_reference'])} | {_fmt(r['p50_us'])} | {_fmt(r['p99_us'])} | "
                   f"{_fmt(r.get('p999_us'))} | {_fmt(r.get('max_us'))} | "
                   f"{_fmt(r['server_us_per_pair'])} | {_fmt(r['server_switches_per_pair'], '.2f')} | "
                   f"{_fmt(r['client_us_per_pair'])} | {_fmt(r['client_sleeps_per_pair'], '.2f')} | "
                   f"{_fmt(r['client_preemptions_per_pair'], '.2f')} | {r['errors']} |")
    workloads = doc["workloads"]
    counts = ", ".join(map(str, SCALE_RATIO_COUNTS))
    ceiling = "alloc" in workloads and "raw" in workloads
    out += ["", "### Ratios beside the floors", "",
            f"Each workload's throughput as a fraction of its own {ref}-process figure. Goal: alloc + close "
            f"at least {SCALE_RATIO_GOAL:.0%} with {counts} processes (judged only there)."
            + (f" 'raw here / alloc at {ref}': the `raw` floor's pairs/s at this count as a fraction of alloc + "
               f"close's at {ref} processes: the share of the {ref}-process figure that an echo doing no work "
               "reaches when its processes sleep and are woken for every reply: the ceiling of any service "
               "whose requests do."
               if ceiling else ""), "",
            "| transport | clients | " + " | ".join(f"{w} of {ref}" for w in workloads)
            + (f" | raw here / alloc at {ref}" if ceiling else "") + " | goal met |",
            "|---|---:|" + "---:|" * (len(workloads) + ceiling) + "---|"]
    ratios = {(r["transport"], r["clients"], r["workload"]): r["of_reference"] for r in doc["rows"]}
    rates = {(r["transport"], r["clients"], r["workload"]): r["pairs_per_s"] for r in doc["rows"]}
    for transport in doc["transports"]:
        for count in doc["counts"]:
            if (transport, count, workloads[0]) not in ratios:
                continue
            alloc = ratios.get((transport, count, "alloc"))
            met = "-" if count not in SCALE_RATIO_COUNTS or alloc is None or transport not in (
                "socket", "shm") else (
                "yes" if alloc >= SCALE_RATIO_GOAL else "**no**")
            cells = " | ".join(_ratio(ratios.get((transport, count, w))) for w in workloads)
            if ceiling:
                raw, top = rates.get((transport, count, "raw")), rates.get((transport, ref, "alloc"))
                cells += " | " + _ratio(raw / top if raw and top else None)
            out.append(f"| {transport} | {count:,} | {cells} | {met} |")
    if "light" in workloads:
        out += ["", "### A light client among busy ones", "",
                f"The `light` workload: the first process makes one alloc + close every "
                f"{doc.get('light_period_ms', 20):g} ms, the others run alloc + close without pause. Its "
                "pairs, p50, p99 and maximum (median over rounds), beside the busy processes' pairs/s and "
                "p99. With turns (`shm`), a client whose places were brief visits queues in the brief lane "
                "and takes the extra place, 1 ms at a time (`docs/protocol.md`, \"Turns\"); its first pair "
                "may wait for the crowd of busy processes that rang at once, the maximum.", "",
                "| transport | clients | light pairs | light p50 µs | light p99 µs | light max µs | "
                "busy pairs/s | busy p99 µs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in doc["rows"]:
            if r["workload"] == "light":
                out.append(f"| {r['transport']} | {r['clients']:,} | {_fmt(r.get('light_pairs'), ',.0f')} | "
                           f"{_fmt(r.get('light_p50_us'))} | {_fmt(r.get('light_p99_us'))} | "
                           f"{_fmt(r.get('light_max_us'))} | {_fmt(r['pairs_per_s'], ',.0f')} | "
                           f"{_fmt(r['p99_us'])} |")
    out += ["", "### Start-up and memory", "",
            "'fork s': forking the processes; 'connect s': from the gate that lets all of them connect at "
            "once until each has a Context, one alloc + close done and its echo connection. Daemon KiB per "
            "client: its `VmRSS` growth over that, per process; machine KiB per client: the fall of "
            f"`MemAvailable`, per process. Goal: the daemon's at most {SCALE_RSS_GOAL_KIB} KiB (judged from "
            f"{SCALE_RSS_FROM} processes on). Descriptors: the daemon's open ones once all are connected, "
            "and its soft limit.", "",
            "| transport | clients | fork s | connect s | daemon KiB / client | goal met | machine KiB / client | "
            "daemon fds (limit) | errors |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for c in doc["cell_rows"]:
        per = c["daemon_kib_per_client"]
        met = "-" if per is None or c["clients"] < SCALE_RSS_FROM else (
            "yes" if per <= SCALE_RSS_GOAL_KIB else "**no**")
        out.append(f"| {c['transport']} | {c['clients']:,} | {_fmt(c['fork_s'], '.2f')} | "
                   f"{_fmt(c['start_s'], '.2f')} | {_fmt(per)} | {met} | {_fmt(c['machine_kib_per_client'], ',.0f')} "
                   f"| {_fmt(c['daemon_fds'], ',.0f')} ({_fmt(c['daemon_fd_limit'], ',')}) | {c['errors']} |")
    if doc.get("skipped"):
        out += ["", f"Not run (the study's time limit of {doc['time_limit_s']:g} s was reached): " + ", ".join(
            f"round {s['round']} {s['transport']} {s['clients']:,}" for s in doc["skipped"]) + "."]
    return out


def scale_plot(doc: dict[str, Any], path: Path) -> None:
    """``path`` (png) against client processes (log scale): pairs/s of every workload
    (from zero), each workload's fraction of its reference figure with the goal, and
    alloc + close's p50, p99 and p99.9 (log scale); one colour per transport, one line style
    per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poolsvc.load.sweep import client_axes

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    styles = {"alloc": "-", "ping": "--", "raw": ":", "light": "-."}
    for transport, color in zip(doc["transports"], ("tab:blue", "tab:orange", "tab:green")):
        for workload in doc["workloads"]:
            rows = [r for r in doc["rows"] if r["transport"] == transport and r["workload"] == workload
                    and r["pairs_per_s"]]
            clients = [r["clients"] for r in rows]
            label = f"{transport} {workload}"
            top.plot(clients, [r["pairs_per_s"] for r in rows], marker="o", linestyle=styles[workload],
                     color=color, label=label)
            with_ratio = [r for r in rows if r["of_reference"] is not None]
            middle.plot([r["clients"] for r in with_ratio], [r["of_reference"] for r in with_ratio], marker="o",
                        linestyle=styles[workload], color=color, label=label)
            if workload == "alloc":
                bottom.plot(clients, [r["p50_us"] for r in rows], marker="o", color=color, label=f"{transport} p50")
                bottom.plot(clients, [r["p99_us"] for r in rows], marker="^", linestyle=":", color=color,
                            label=f"{transport} p99")
                tail = [r for r in rows if r.get("p999_us") is not None]
                bottom.plot([r["clients"] for r in tail], [r["p999_us"] for r in tail], marker="v",
                            linestyle="--", color=color, label=f"{transport} p99.9")
    middle.axhline(SCALE_RATIO_GOAL, color="grey", linewidth=0.8)
    top.set_ylabel("pairs per second, all processes")
    middle.set_ylabel(f"fraction of the {doc['reference_clients']}-process figure")
    bottom.set_ylabel("alloc + close pair (µs)")
    client_axes([top, middle], bottom, doc["counts"])
    top.set_title(f"bench/scale.py: {doc['seconds']:g} s per workload, median of {doc['rounds']} round(s), "
                  f"{doc['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_scale(output: Path) -> list[str]:
    """Run ``bench/scale.py`` with ``SCALE_ARGS``, keep its JSON and plot in ``<output>/scale/``;
    returns the body of ``scale.md``."""
    folder = output / "scale"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    cmd = [sys.executable, str(ROOT / "bench" / "scale.py"), *SCALE_ARGS, "--json", str(path)]
    print("running:", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    if proc.returncode != 0 or not path.exists():
        raise SystemExit(f"scale: bench/scale.py exited with status {proc.returncode}")
    doc = json.loads(path.read_text())
    scale_plot(doc, folder / "scale.png")
    return [f"Command run: `python bench/scale.py {' '.join(SCALE_ARGS)}`; every cell's figures in "
            f"[scale/results.json](scale/results.json).", ""] + scale_body(doc, folder.name)


# -- main ---------------------------------------------------------------------------------------

def generate(name: str, backend: str, pytest_args: list[str], output: Path) -> Path:
    family = FAMILIES[name]
    started = datetime.datetime.now(datetime.timezone.utc)
    info = machine(backend)          # the load average before this family's run
    command = f"python bench/results.py --family {name}"
    if backend == "pure":
        command = "POOLSVC_PUREPYTHON=1 " + command
    t0 = time.monotonic()
    if family.files:
        body = render_pytest(family, run_pytest(family, pytest_args))
    else:
        runners = {"study": lambda: run_study(output), "scale": lambda: run_scale(output),
                   "sweep": lambda: run_sweep(output)}
        body = runners.get(name, run_load)()
    lines = header(family, info, command, started, time.monotonic() - t0) + body
    text = "\n".join(lines).rstrip() + "\n"
    suffix = "-pure" if backend == "pure" else ""
    path = output / f"{name}{suffix}.md"
    path.write_text(text)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES),
                        help="family to run (repeatable; default: " + ", ".join(PYTEST_FAMILIES) + ")")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="directory of the results files (default bench/results)")
    parser.add_argument("pytest_args", nargs="*",
                        help="extra pytest arguments, after --")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from poolsvc import BACKEND

    args.output.mkdir(parents=True, exist_ok=True)
    for name in args.family or PYTEST_FAMILIES:
        generate(name, str(BACKEND), args.pytest_args, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
