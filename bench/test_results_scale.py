"""Rendering of ``bench/results/scale.md`` (bench/results.py, family ``scale``) from a
``bench/scale.py`` document built in the test: the figures of every workload, the ratios
beside their floors with the goals judged from them, start-up and memory, skipped cells
and the plot.  No client or daemon runs here.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("bench_results", Path(__file__).with_name("results.py"))
assert _SPEC is not None and _SPEC.loader is not None
results = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = results          # dataclasses look their module up there
_SPEC.loader.exec_module(results)


def _row(transport: str, clients: int, workload: str, pairs: int | None, ratio: float | None) -> dict:
    return {"transport": transport, "clients": clients, "workload": workload, "runs": 3, "pairs_per_s": pairs,
            "of_reference": ratio, "p50_us": 100.0 * clients, "p99_us": 300.0 * clients,
            "p999_us": 500.0 * clients, "max_us": 900.0 * clients,
            "server_us_per_pair": 12.5, "server_switches_per_pair": 1.0, "client_us_per_pair": 20.0,
            "client_sleeps_per_pair": 0.5, "client_preemptions_per_pair": 0.25, "errors": 0}


def _cell_row(transport: str, clients: int, kib: float) -> dict:
    return {"transport": transport, "clients": clients, "runs": 3, "fork_s": 0.5, "start_s": 2.0,
            "daemon_kib_per_client": kib, "machine_kib_per_client": 4096.0, "daemon_fds": 3 * clients,
            "daemon_fd_limit": 20000, "errors": 0}


def _doc() -> dict:
    rows = []
    for transport, ratios in (("socket", {1: 0.5, 8: 1.0, 64: 0.75, 256: 0.3}),
                              ("shm", {1: 0.6, 8: 1.0, 64: 0.8, 256: None}),
                              ("shm-freeforall", {8: 1.0, 64: 0.5})):
        for clients, ratio in ratios.items():
            rows.append(_row(transport, clients, "alloc", None if ratio is None else int(20_000 * ratio), ratio))
            rows.append(_row(transport, clients, "ping", 30_000, 0.9 if clients != 8 else 1.0))
            rows.append(_row(transport, clients, "raw", 80_000, 0.85 if clients != 8 else 1.0))
    return {"format": "poolsvc-bench-scale/2", "counts": [1, 8, 64, 256],
            "transports": ["socket", "shm", "shm-freeforall"],
            "workloads": ["alloc", "ping", "raw"],
            "pairs": {"alloc": "alloc_user_buf(4096) + close", "ping": "PING", "raw": "echo"},
            "seconds": 5.0, "rounds": 3, "reference_clients": 8, "cpus": 2,
            "loadavg_start": [1.0, 2.0, 3.0], "loadavg_end": [4.0, 5.0, 6.0], "time_limit_s": 600.0,
            "skipped": [{"round": 2, "transport": "shm", "clients": 256}], "rows": rows,
            "cell_rows": [_cell_row("socket", 64, 300.0), _cell_row("shm", 256, 156.2),
                          _cell_row("socket", 256, 300.0)]}


def test_scale_body_tables_and_goals():
    text = "\n".join(results.scale_body(_doc(), "scale"))
    assert "![pairs/s, ratios and latency against client processes](scale/scale.png)" in text
    assert ("| socket | 64 | alloc | 15,000 | 75% | 6,400.0 | 19,200.0 | 32,000.0 | 57,600.0 | 12.5 | 1.00 | 20.0 "
            "| 0.50 | 0.25 | 0 |") in text
    assert "| shm | 256 | alloc | - | - |" in text       # a cell without figures
    assert "| socket | 64 | 75% | 90% | 85% | 400% | yes |" in text  # raw 80,000 here / alloc 20,000 at 8
    assert "| socket | 256 | 30% | 90% | 85% | 400% | **no** |" in text
    assert "| shm | 256 | - | 90% | 85% | 400% | - |" in text  # a cell without a ratio is not judged
    assert "| socket | 1 | 50% | 90% | 85% | 400% | - |" in text  # nor a count without a goal
    assert "| shm-freeforall | 64 | 50% | 90% | 85% | 400% | - |" in text  # nor a comparison transport
    assert "| shm | 256 | 0.50 | 2.00 | 156.2 | yes | 4,096 | 768 (20,000) | 0 |" in text
    assert "| socket | 256 | 0.50 | 2.00 | 300.0 | **no** |" in text
    assert "| socket | 64 | 0.50 | 2.00 | 300.0 | - |" in text  # memory judged from 256 on
    assert "load average 1.0 2.0 3.0 at the start, 4.0 5.0 6.0 at the end" in text
    assert "round 2 shm 256" in text
    assert "| raw here / alloc at 8 |" in text


def test_scale_body_shows_the_light_client_beside_the_busy_ones():
    doc = _doc()
    doc["workloads"].append("light")
    doc["light_period_ms"] = 20.0
    for clients, p99 in ((1, 400.0), (64, 3_000.0)):
        row = _row("shm", clients, "light", 0 if clients == 1 else 90_000, None if clients == 1 else 0.9)
        row.update(light_pairs=250, light_p50_us=250.0, light_p99_us=p99, light_max_us=2 * p99)
        if clients == 1:
            row.update(p50_us=None, p99_us=None, p999_us=None, max_us=None)
        doc["rows"].append(row)
    text = "\n".join(results.scale_body(doc, "scale"))
    assert "### A light client among busy ones" in text and "every 20 ms" in text
    assert "| shm | 64 | 250 | 250.0 | 3,000.0 | 6,000.0 | 90,000 | 19,200.0 |" in text
    assert "| shm | 1 | 250 | 250.0 | 400.0 | 800.0 | 0 | - |" in text  # no busy process
    assert "| socket | 64 | 75% | 90% | 85% | - | 400% | yes |" in text  # a ratio column for light
    results.scale_plot(doc, Path("/dev/null"))  # the light workload has a line style


def test_scale_plot_is_written(tmp_path):
    path = tmp_path / "scale.png"
    results.scale_plot(_doc(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_body_shows_the_table_and_judges_the_goal_at_64_and_256():
    """``sweep.md`` from a ``poolsvc load --sweep`` document (built by the sweep from
    canned reports): its table with each round's ratio, and the goal judged only at
    64 and 256 clients, on the median of the rounds' ratios."""
    from poolsvc.load import sweep
    from poolsvc.load.mix import LoadSpec

    per_round = iter([10_000.0, 7_500.0, 6_000.0, 10_000.0, 6_000.0, 7_100.0, 10_000.0, 8_000.0, 6_500.0])

    def report(spec: LoadSpec) -> dict:
        return {"spec": spec.to_json(), "machine": {"cpus": 2}, "service": {"backend": "compiled"},
                "ops_per_s": next(per_round), "ops_total": 1, "start_s": 0.1,
                "latency_us": {"p50_us": 9.0, "p99_us": 300.0}, "violations": {"count": 0},
                "leaks": {}, "ok": True}

    doc = sweep.run(LoadSpec(duration=1.0), [8, 64, 256], report, rounds=3)
    text = "\n".join(results.sweep_body(doc, "sweep"))
    assert "| 8 | 10,000 | 100% | 100% 100% 100% |" in text
    assert "| 64 | 7,500 | 75% | 75% 60% 80% |" in text      # median of the ratios: 75%
    assert "| 64 | 75% | yes |" in text and "| 256 | 65% | **no** |" in text
    assert "| 8 | 100% |" not in text                        # the reference is not judged
    assert "![throughput and latency against client processes](sweep/sweep.png)" in text
