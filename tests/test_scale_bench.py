"""The scaling study's machinery (bench/scale.py) on a few processes and short windows:
a cell runs every workload against a real daemon and the plain echo server (the light
client paced among busy processes in ``light``), the study
computes each workload's ratio against its own reference count, and the time limit
skips cells instead of running them.  The figures themselves are the benchmark's
business (bench/results/scale.md); here only that they are measured and consistent.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
assert _SPEC is not None and _SPEC.loader is not None
scale = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = scale
_SPEC.loader.exec_module(scale)


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_a_cell_measures_every_workload(transport):
    got = scale.cell(ROOT, transport, 3, list(scale.WORKLOADS), 0.3, 60.0)
    assert got["errors"] == [] and got["ready"] == 3
    assert set(got["workloads"]) == set(scale.WORKLOADS)
    for workload, w in got["workloads"].items():
        assert w["errors"] == 0, (workload, w["first_errors"])
        assert w["pairs"] > 0 and w["pairs_per_s"] == round(w["pairs"] / 0.3)
        assert 0 < w["p50_us"] <= w["p99_us"]
        assert w["client_us_per_pair"] > 0 and w["server_cpu_s"] >= 0
    light = got["workloads"]["light"]  # the first process paced, the two others busy
    assert 0 < light["light_pairs"] <= 0.3 / scale.LIGHT_PERIOD + 1 and light["light_error"] is None
    assert 0 < light["light_p50_us"] <= light["light_p99_us"] <= light["light_max_us"]
    assert got["daemon_rss_after_kib"] >= got["daemon_rss_before_kib"] > 0
    assert got["daemon_fd_limit"] is None or got["daemon_fd_limit"] > 0


def test_the_study_compares_each_workload_with_its_own_reference_count():
    doc = scale.study(ROOT, [1, scale.REFERENCE_CLIENTS], ["shm"], ["ping", "raw"], 0.2, 1, 60.0, 3600.0)
    assert doc["format"] == scale.FORMAT and doc["skipped"] == []
    rows = {(r["clients"], r["workload"]): r for r in doc["rows"]}
    assert set(rows) == {(1, "ping"), (1, "raw"), (8, "ping"), (8, "raw")}
    for workload in ("ping", "raw"):
        assert rows[(8, workload)]["of_reference"] == 1.0
        one = rows[(1, workload)]
        assert one["of_reference"] == pytest.approx(one["pairs_per_s"] / rows[(8, workload)]["pairs_per_s"],
                                                     abs=1e-3)
    assert [(c["transport"], c["clients"]) for c in doc["cell_rows"]] == [("shm", 1), ("shm", 8)]


def test_cells_past_the_time_limit_are_skipped():
    doc = scale.study(ROOT, [1, 8], ["socket", "shm"], ["raw"], 0.1, 1, 60.0, time_limit=-1.0)
    assert doc["cells"] == [] and doc["rows"] == []
    assert len(doc["skipped"]) == 4
