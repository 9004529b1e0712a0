"""A load report for people: the text summary, the side-by-side comparison, the plots.

The report itself is the JSON-ready dict :meth:`LoadRunner.run` returns
(``--json FILE`` writes it as is); this module only renders it.

Concurrency: pure functions (``plot`` writes files and uses matplotlib's
non-interactive Agg backend).
"""
from __future__ import annotations

import json
import os
from typing import Any

from ..errors import BadParameters
from .mix import TIMED

#: The load targets of docs/design.md section 7, in operations per second.
TARGET_SINGLE = 40_000
TARGET_BATCHED = 400_000


def load(path: str) -> dict[str, Any]:
    """A report written by ``--json``; BadParameters if it is not one."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise BadParameters(f"report {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise BadParameters(f"report {path}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != "poolsvc-load-report/1":
        raise BadParameters(f"report {path}: not a poolsvc load report (no format "
                            "'poolsvc-load-report/1')")
    return doc


def text(report: dict[str, Any]) -> str:
    """The report as a few aligned tables."""
    spec = report["spec"]
    svc = report["service"]
    lines = []
    mode = f"replay of {spec['replay']}" if spec.get("replay") else f"mix {spec['mix']}"
    lines.append(f"poolsvc load{(' ' + report['label']) if report.get('label') else ''}: "
                 f"{spec['clients']} clients, {report['elapsed_s']:.1f} s, batch {spec['batch']}, "
                 f"sizes {spec['sizes']}{', exhaust' if spec.get('exhaust') else ''}")
    lines.append(f"  {mode}")
    if report.get("start_s"):
        lines.append(f"  clients connected in {report['start_s']:.1f} s before the run (not counted)")
    lines.append(f"  service: pool {svc.get('pool')}, backend {svc.get('backend')}, "
                 f"{svc.get('config')}, transport {svc.get('transport', 'default')}, "
                 f"machine {report['machine']['cpus']} CPUs")
    lines.append("")
    lines.append(f"{'operation':<16}{'count':>10}{'ops/s':>10}{'p50 us':>11}{'p90 us':>11}"
                 f"{'p99 us':>11}{'p99.9 us':>11}{'max us':>11}")
    for op in TIMED:
        e = report["ops"].get(op)
        if e is None:
            continue
        lines.append(f"{op:<16}{e['count']:>10,}{e['per_s']:>10,.0f}" + _latencies(e))
    every = report.get("latency_us")
    if every:
        lines.append(f"{'total':<16}{report['ops_total']:>10,}{report['ops_per_s']:>10,.0f}"
                     + _latencies(every))
    else:
        lines.append(f"{'total':<16}{report['ops_total']:>10,}{report['ops_per_s']:>10,.0f}")
    target = TARGET_BATCHED if spec["batch"] > 1 else TARGET_SINGLE
    lines.append(f"  section 7 target ({'batched' if spec['batch'] > 1 else 'single'}): "
                 f">= {target:,} ops/s -> {report['ops_per_s'] / target:.0%} of it")
    if "client_cpu_s" in report:
        ops = report["ops_total"]
        in_kernel = 1e6 * report.get("client_cpu_sys_s", 0.0) / ops if ops else 0.0
        lines.append(f"  client CPU: {report['client_cpu_us_per_op']:.2f} us per operation, "
                     f"{in_kernel:.2f} of them in the kernel ({report['client_cpu_s']:.1f} s over "
                     "all clients, waits for the daemon included)")
    lines.append("")
    errs = report["errors"]["by_type"]
    lines.append("errors: " + (", ".join(f"{k} {v}" for k, v in sorted(errs.items())) or "none")
                 + (" (OutOfMemory is expected when pools fill)" if errs else ""))
    f = report["faults"]
    lines.append(f"faults: {f['kills']} clients SIGKILLed ({f['restarts']} restarted), "
                 f"{f['malformed_sent']} malformed requests")
    lines.append(checks_line(report))
    leaks = report.get("leaks", {})
    lines.append("leaks: " + (", ".join(f"{k} {v:+d}" for k, v in leaks.items()) or "none"))
    v = report.get("violations", {"count": 0, "quoted": []})
    lines.append(f"violations: {v['count']}")
    for item in v["quoted"]:
        lines.append(f"  - {item}")
    if "trace" in report:
        lines.append(f"trace: {report['trace']['lines']} lines written to {report['trace']['path']}")
    lines.append("RESULT: " + ("OK" if report.get("ok") else "FAILED"))
    return "\n".join(lines) + "\n"


def checks_line(report: dict[str, Any]) -> str:
    """The checks a run made: STATS snapshots, operations skipped, content checks without a
    view (``unverified_checks``), and those of static-pool private buffers, which stay in
    the daemon by design (``daemon_private_checks``, named even when 0 on a static pool)."""
    text = (f"checks: {report['invariants']['snapshots_checked']} STATS snapshots, "
            f"{report['skipped_ops']} operations skipped, "
            f"{report['unverified_checks']} content checks impossible (no view)")
    private = report.get("daemon_private_checks")
    if private is not None and (private or report.get("service", {}).get("pool") == "static"):
        text += f", daemon-private: {private:,}, not client-visible by design"
    return text


def _latencies(summary: dict[str, Any]) -> str:
    """p50, p90, p99, p99.9 and max of a latency summary, in 11-character columns."""
    return "".join(f" {summary[k]:>10.1f}" for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us"))


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Two reports side by side: throughput and latency per operation, B/A ratios."""
    def cfg(r: dict[str, Any]) -> str:
        s = r["service"]
        return f"{s.get('pool')} pool, {s.get('config')}"

    rows = [("configuration", cfg(a), cfg(b), ""),
            ("clients / batch", f"{a['spec']['clients']} / {a['spec']['batch']}",
             f"{b['spec']['clients']} / {b['spec']['batch']}", ""),
            ("elapsed s", f"{a['elapsed_s']:.1f}", f"{b['elapsed_s']:.1f}", "")]

    def ratio(x: float, y: float) -> str:
        return f"{y / x:.2f}x" if x else "-"

    rows.append(("total ops", f"{a['ops_total']:,}", f"{b['ops_total']:,}", ratio(a["ops_total"], b["ops_total"])))
    rows.append(("ops/s", f"{a['ops_per_s']:,.0f}", f"{b['ops_per_s']:,.0f}", ratio(a["ops_per_s"], b["ops_per_s"])))
    for op in TIMED:
        ea, eb = a["ops"].get(op), b["ops"].get(op)
        if ea is None and eb is None:
            continue
        ea = ea or {"count": 0, "p50_us": 0.0, "p99_us": 0.0}
        eb = eb or {"count": 0, "p50_us": 0.0, "p99_us": 0.0}
        rows.append((f"{op} count", f"{ea['count']:,}", f"{eb['count']:,}", ratio(ea["count"], eb["count"])))
        rows.append((f"{op} p50 us", f"{ea['p50_us']:.1f}", f"{eb['p50_us']:.1f}", ratio(ea["p50_us"], eb["p50_us"])))
        rows.append((f"{op} p99 us", f"{ea['p99_us']:.1f}", f"{eb['p99_us']:.1f}", ratio(ea["p99_us"], eb["p99_us"])))
    for key, label in (("skipped_ops", "skipped ops"), ("unverified_checks", "unverified checks"),
                       ("daemon_private_checks", "daemon-private checks")):
        rows.append((label, f"{a.get(key, 0):,}", f"{b.get(key, 0):,}", ""))
    ea, eb = a["errors"]["by_type"], b["errors"]["by_type"]
    for err in sorted(set(ea) | set(eb)):
        rows.append((f"errors {err}", f"{ea.get(err, 0):,}", f"{eb.get(err, 0):,}", ""))
    rows.append(("violations", str(a.get("violations", {}).get("count", "?")),
                 str(b.get("violations", {}).get("count", "?")), ""))
    rows.append(("result", "OK" if a.get("ok") else "FAILED", "OK" if b.get("ok") else "FAILED", ""))
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(max(len(r[1]) for r in rows), len(names[0])) + 2
    w2 = max(max(len(r[2]) for r in rows), len(names[1])) + 2
    out = [f"{'':<{w0}}{names[0]:>{w1}}{names[1]:>{w2}}{'B/A':>8}"]
    out += [f"{r[0]:<{w0}}{r[1]:>{w1}}{r[2]:>{w2}}{r[3]:>8}" for r in rows]
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], directory: str) -> list[str]:
    """Throughput and latency over time as PNGs in ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    rows = report["timeline"]
    title = (f"poolsvc load: {report['spec']['clients']} clients, batch {report['spec']['batch']}, "
             f"{report['service'].get('pool')} pool ({report['machine']['cpus']} CPUs)")
    paths = []
    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [r["ops"] for r in rows], label="all operations", color="black", linewidth=2)
    ax.axhline(TARGET_BATCHED if report["spec"]["batch"] > 1 else TARGET_SINGLE, color="red",
               linestyle="--", label="section 7 target")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("operations per second (ops/s)")
    ax.set_title(title, fontsize=10)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = os.path.join(directory, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(9, 6))
    ops = [op for op in TIMED if any(op in r["latency_us"] for r in rows)]
    cmap = plt.get_cmap("tab10")
    colors = [cmap(i) for i in range(10)]
    for i, op in enumerate(ops):
        pts = [(r["t"], r["latency_us"][op]) for r in rows if op in r["latency_us"]]
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1]["p50"] for p in pts], color=colors[i % 10], label=f"{op} p50")
        ax.plot(xs, [p[1]["p99"] for p in pts], color=colors[i % 10], linestyle=":", label=f"{op} p99")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency seen by the client (µs, log scale)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    path = os.path.join(directory, "latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
