"""A scaling study: one load run per client count, throughput and latency against clients.

``poolsvc load --sweep 1,8,64,256 --duration S`` runs :class:`LoadRunner`
once per count, each on a daemon of its own (or on ``--socket``), with the
same spec but for the number of clients, and gathers one row per run: the
operations per second, every operation's p50 and p99 latency, the time the
clients took to connect, and whether the run kept every invariant.  The
throughput of each count is also given as a fraction of the reference count's
(8 clients when the sweep has it, else its first count), the ratio the
scaling goals are stated in.

With ``--rounds R`` the whole sweep is run R times, the counts one after the
other in each round, and a count's row gives the medians over the rounds:
of its throughput, its p50 and p99, and of its ratio to the reference *in the
same round*.  A machine whose speed drifts over minutes then moves the
rounds' ratios apart (each round's are listed) rather than one count's run
against another's.

The sweep is a JSON-ready dict (``format: poolsvc-load-sweep/1``) that
:func:`text` and :func:`markdown` render as a table.

Concurrency: one thread; the runs are one after the other.
"""
from __future__ import annotations

from statistics import median
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


def run(spec: LoadSpec, counts: list[int], runner: Callable[[LoadSpec], dict[str, Any]],
        rounds: int = 1) -> dict[str, Any]:
    """Run ``runner(spec with clients=n)`` for each count, ``rounds`` times over; the
    sweep (``ok`` when every run was)."""
    if rounds < 1:
        raise ConfigError(f"--rounds: {rounds} is not a number of rounds (1 or more)")
    runs = [runner(spec.replace(clients=n)) for _ in range(rounds) for n in counts]
    by_round = [runs[i:i + len(counts)] for i in range(0, len(runs), len(counts))]
    ref_at = counts.index(REFERENCE_CLIENTS) if REFERENCE_CLIENTS in counts else 0
    refs = [row(counts[ref_at], one[ref_at])["ops_per_s"] for one in by_round]  # each round's reference
    rows = []
    for at, n in enumerate(counts):
        mine = [row(n, one[at]) for one in by_round]
        ratios = [round(r["ops_per_s"] / ref, 3) if ref else None for r, ref in zip(mine, refs)]
        known = [r for r in ratios if r is not None]
        rows.append({"clients": n,
                     "ops_per_s": median(r["ops_per_s"] for r in mine),
                     "ops_total": sum(r["ops_total"] for r in mine),
                     "p50_us": median(r["p50_us"] for r in mine),
                     "p99_us": median(r["p99_us"] for r in mine),
                     "start_s": median(r["start_s"] for r in mine),
                     "violations": sum(r["violations"] for r in mine),
                     "leaks": sum(r["leaks"] for r in mine),
                     "ok": all(r["ok"] for r in mine),
                     "of_reference": round(median(known), 3) if known else None,
                     "rounds": {"ops_per_s": [r["ops_per_s"] for r in mine], "of_reference": ratios}})
    first = runs[0]
    return {"format": FORMAT, "spec": {k: v for k, v in first["spec"].items() if k != "clients"},
            "counts": counts, "rounds": rounds, "reference_clients": counts[ref_at],
            "machine": first["machine"], "service": first["service"], "rows": rows,
            "ok": all(r["ok"] for r in rows), "runs": runs}


def row(clients: int, report: dict[str, Any]) -> dict[str, Any]:
    """One count's figures from its run's report."""
    every = report.get("latency_us", {})
    return {"clients": clients, "ops_per_s": report.get("ops_per_s", 0.0),
            "ops_total": report.get("ops_total", 0), "p50_us": every.get("p50_us", 0.0),
            "p99_us": every.get("p99_us", 0.0), "start_s": report.get("start_s", 0.0),
            "violations": report.get("violations", {}).get("count", 0),
            "leaks": len(report.get("leaks", {})), "ok": bool(report.get("ok"))}


COLUMNS = ("clients", "ops/s", "of ref", "p50 us", "p99 us", "start s", "violations", "result")


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"


def _columns(sweep: dict[str, Any]) -> tuple[str, ...]:
    """The table's columns: with more than one round, each round's ratio after the median's."""
    if sweep.get("rounds", 1) > 1:
        return COLUMNS[:3] + ("rounds",) + COLUMNS[3:]
    return COLUMNS


def _cells(sweep: dict[str, Any]) -> list[list[str]]:
    out = []
    several = sweep.get("rounds", 1) > 1
    for r in sweep["rows"]:
        cells = [str(r["clients"]), f"{r['ops_per_s']:,.0f}", _percent(r["of_reference"])]
        if several:
            cells.append(" ".join(_percent(x) for x in r["rounds"]["of_reference"]))
        cells += [f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['start_s']:.1f}",
                  str(r["violations"]), "OK" if r["ok"] else "FAILED"]
        out.append(cells)
    return out


def _heading(sweep: dict[str, Any]) -> str:
    spec = sweep["spec"]
    rounds = sweep.get("rounds", 1)
    medians = (f" {rounds} rounds, the medians over them; 'rounds': each round's 'of ref';"
               if rounds > 1 else "")
    return (f"poolsvc load --sweep {','.join(map(str, sweep['counts']))}: {spec['duration']:g} s each, "
            f"batch {spec['batch']}, sizes {spec['sizes']}; {sweep['machine']['cpus']} CPUs, "
            f"{sweep['service'].get('backend')} backend;{medians} 'of ref': throughput as a "
            f"fraction of {sweep['reference_clients']} clients' (in the same round); p50/p99 over "
            "every operation; 'start s': time the clients took to connect (not counted)")


def text(sweep: dict[str, Any]) -> str:
    """The sweep as an aligned table, with its heading and result."""
    cells, columns = _cells(sweep), _columns(sweep)
    widths = [max(len(c), *(len(row[i]) for row in cells)) + 2 for i, c in enumerate(columns)]
    lines = [_heading(sweep), "", "".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.append("RESULT: " + ("OK" if sweep["ok"] else "FAILED"))
    return "\n".join(lines) + "\n"


def markdown(sweep: dict[str, Any]) -> str:
    """The sweep as a markdown table under its heading."""
    columns = _columns(sweep)
    lines = [_heading(sweep), "", "| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" for _ in columns) + "|"]
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
