"""A scaling study: one load run per client count, throughput and latency against clients.

``poolsvc load --sweep 1,8,64,256 --duration S`` runs :class:`LoadRunner`
once per count, each on a daemon of its own (or on ``--socket``), with the
same spec but for the number of clients, and gathers one row per run: the
operations per second, every operation's p50 and p99 latency, the time the
clients took to connect, and whether the run kept every invariant.  The
throughput of each count is also given as a fraction of the reference count's
(8 clients when the sweep has it, else its first count), the ratio the
scaling goals are stated in.

The sweep is a JSON-ready dict (``format: poolsvc-load-sweep/1``) that
:func:`text` and :func:`markdown` render as a table.

Concurrency: one thread; the runs are one after the other.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import ConfigError
from .mix import LoadSpec

FORMAT = "poolsvc-load-sweep/1"
#: The client count the others are compared with, when the sweep has it.
REFERENCE_CLIENTS = 8


def parse_counts(text: str) -> list[int]:
    """Client counts from ``"1,8,64,256"``: ConfigError unless each is an integer
    a run accepts (see :class:`LoadSpec`) and no count repeats."""
    counts: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            n = int(part)
        except ValueError:
            raise ConfigError(f"--sweep: {part!r} is not a number of clients (e.g. 1,8,64,256)") from None
        if n in counts:
            raise ConfigError(f"--sweep: {n} clients given twice")
        try:
            LoadSpec(clients=n)  # the same bounds as --clients
        except ConfigError as exc:
            raise ConfigError(f"--sweep: {exc}") from None
        counts.append(n)
    return counts


def run(spec: LoadSpec, counts: list[int], runner: Callable[[LoadSpec], dict[str, Any]]) -> dict[str, Any]:
    """Run ``runner(spec with clients=n)`` for each count; the sweep (``ok`` when
    every run was)."""
    runs = [runner(spec.replace(clients=n)) for n in counts]
    rows = [row(n, report) for n, report in zip(counts, runs)]
    ref = next((r for r in rows if r["clients"] == REFERENCE_CLIENTS), rows[0])
    for r in rows:
        r["of_reference"] = round(r["ops_per_s"] / ref["ops_per_s"], 3) if ref["ops_per_s"] else None
    first = runs[0]
    return {"format": FORMAT, "spec": {k: v for k, v in first["spec"].items() if k != "clients"},
            "counts": counts, "reference_clients": ref["clients"], "machine": first["machine"],
            "service": first["service"], "rows": rows, "ok": all(r["ok"] for r in rows),
            "runs": runs}


def row(clients: int, report: dict[str, Any]) -> dict[str, Any]:
    """One count's figures from its run's report."""
    every = report.get("latency_us", {})
    return {"clients": clients, "ops_per_s": report.get("ops_per_s", 0.0),
            "ops_total": report.get("ops_total", 0), "p50_us": every.get("p50_us", 0.0),
            "p99_us": every.get("p99_us", 0.0), "start_s": report.get("start_s", 0.0),
            "violations": report.get("violations", {}).get("count", 0),
            "leaks": len(report.get("leaks", {})), "ok": bool(report.get("ok"))}


COLUMNS = ("clients", "ops/s", "of ref", "p50 us", "p99 us", "start s", "violations", "result")


def _cells(sweep: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in sweep["rows"]:
        ratio = "-" if r["of_reference"] is None else f"{r['of_reference']:.0%}"
        out.append([str(r["clients"]), f"{r['ops_per_s']:,.0f}", ratio, f"{r['p50_us']:.1f}",
                    f"{r['p99_us']:.1f}", f"{r['start_s']:.1f}", str(r["violations"]),
                    "OK" if r["ok"] else "FAILED"])
    return out


def _heading(sweep: dict[str, Any]) -> str:
    spec = sweep["spec"]
    return (f"poolsvc load --sweep {','.join(map(str, sweep['counts']))}: {spec['duration']:g} s each, "
            f"batch {spec['batch']}, sizes {spec['sizes']}; {sweep['machine']['cpus']} CPUs, "
            f"{sweep['service'].get('backend')} backend; 'of ref': throughput as a fraction of "
            f"{sweep['reference_clients']} clients'; p50/p99 over every operation; 'start s': "
            "time the clients took to connect (not counted)")


def text(sweep: dict[str, Any]) -> str:
    """The sweep as an aligned table, with its heading and result."""
    cells = _cells(sweep)
    widths = [max(len(c), *(len(row[i]) for row in cells)) + 2 for i, c in enumerate(COLUMNS)]
    lines = [_heading(sweep), "", "".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.append("RESULT: " + ("OK" if sweep["ok"] else "FAILED"))
    return "\n".join(lines) + "\n"


def markdown(sweep: dict[str, Any]) -> str:
    """The sweep as a markdown table under its heading."""
    lines = [_heading(sweep), "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _cells(sweep)]
    return "\n".join(lines) + "\n"


def client_axes(linear: Sequence[Any], latency: Any, clients: list[int]) -> None:
    """The axes of a plot against client counts: each of ``linear`` (throughput, ratios)
    from zero, so that a fall reads at its true size; ``latency`` on a log scale; clients
    on a log scale with one tick per count; grids and legends."""
    for ax in linear:
        ax.set_ylim(bottom=0)
    latency.set_yscale("log")
    latency.set_xlabel("client processes")
    for ax in (*linear, latency):
        ax.set_xscale("log")
        ax.set_xticks(clients, [str(n) for n in clients])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)


def plot(sweep: dict[str, Any], directory: str) -> list[str]:
    """``sweep.png`` in ``directory``: throughput (from zero), and p50 with its p99 above
    it (log scale), against the number of clients (log scale; a run that failed is marked
    with an x); returns its path."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    rows = sweep["rows"]
    clients = [r["clients"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(clients, [r["ops_per_s"] for r in rows], marker="o", color="black", label="ops/s")
    bottom.plot(clients, [r["p50_us"] for r in rows], marker="o", color="tab:blue", label="p50")
    bottom.fill_between(clients, [r["p50_us"] for r in rows], [r["p99_us"] for r in rows],
                        color="tab:blue", alpha=0.2, label="p50 to p99")
    bottom.plot(clients, [r["p99_us"] for r in rows], linestyle=":", color="tab:blue", label="p99")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        top.scatter([r["clients"] for r in failed], [max(r["ops_per_s"], 1.0) for r in failed],
                    marker="x", s=80, color="red", zorder=3, label="run failed (violations or leaks)")
    top.set_ylabel("operations per second, all clients")
    bottom.set_ylabel("latency of one operation (µs)")
    client_axes([top], bottom, clients)
    spec = sweep["spec"]
    top.set_title(f"poolsvc load --sweep: {spec['duration']:g} s per count, batch {spec['batch']}, "
                  f"{sweep['service'].get('transport', 'default')} transport, "
                  f"{sweep['machine']['cpus']} CPUs", fontsize=10)
    fig.tight_layout()
    path = os.path.join(directory, "sweep.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
