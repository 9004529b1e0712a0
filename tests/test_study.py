"""The contiguous-vs-scattered study (``poolsvc bench``): the model's predictions hold."""
from __future__ import annotations

import json

import numpy as np
import pytest

from poolsvc import Config, System, study
from poolsvc.cli import main

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def report():
    levels = [lv for lv in study.LEVELS if lv.name in ("fresh", "severe")]
    return study.run_study(sizes=[4 * KiB, 64 * KiB, 1 * MiB, 8 * MiB], levels=levels, trials=3,
                           seed=7, dynamic_size=32 * MiB)


def cell(report, level, size, strategy):
    (hit,) = [r for r in report.results
              if r.level == level and r.size == size and r.strategy == strategy]
    return hit


def test_fresh_system_serves_every_strategy(report):
    for strategy in study.STRATEGIES:
        r = cell(report, "fresh", 64 * KiB, strategy)
        assert r.failures == 0 and r.p50_us is not None and r.access_mb_s > 0
        assert r.segments == 1 and r.longest_run_pages == 16


def test_contiguous_fails_under_fragmentation_scattered_does_not(report):
    severe = {lv.level: lv for lv in report.levels}["severe"]
    assert severe.largest_free_run < 256  # no 1 MiB run is left
    assert cell(report, "severe", 1 * MiB, "contiguous").failure_rate == 1.0
    scattered = cell(report, "severe", 1 * MiB, "scattered")
    assert scattered.failure_rate == 0.0
    assert scattered.segments > 1 and scattered.setup_us > 0
    assert scattered.overhead_bytes == 4096  # one list page for 256 entries


def test_static_pool_fails_only_when_full(report):
    for level in ("fresh", "severe"):
        assert cell(report, level, 1 * MiB, "static").failure_rate == 0.0
        assert cell(report, level, 8 * MiB, "static").failure_rate == 1.0  # 4 MiB pool


def test_contiguous_above_max_order_always_fails(report):
    r = cell(report, "fresh", 8 * MiB, "contiguous")
    assert r.failure_rate == 1.0 and "order" in r.failure_reason


def test_fragmentation_metrics_rise(report):
    fresh, severe = report.levels
    assert fresh.unusable_index[9] < 0.1  # only the message page breaks the alignment
    assert severe.unusable_index[9] > 0.9
    for lv in report.levels:
        assert sum(c << k for k, c in enumerate(lv.free_blocks_per_order)) == lv.free_frames


def test_ageing_is_reproducible():
    def layout(seed):
        with System(Config(dynamic_size=16 * MiB)) as s:
            study.Ager(s.dynamic, np.random.default_rng([seed, 3]), study.LEVELS[3]).run()
            return s.dynamic.used_map().copy()
    assert np.array_equal(layout(5), layout(5))
    assert not np.array_equal(layout(5), layout(6))


def test_cli_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "r.json"
    plots = tmp_path / "plots"
    rc = main(["bench", "--quick", "--sizes", "4KiB,256KiB", "--trials", "2",
               "--dynamic-size", "16MiB", "--json", str(out), "--plot", str(plots),
               "--markdown", str(tmp_path / "r.md")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "contiguous" in text and "scattered" in text and "unusable" in text
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1
    assert {r["strategy"] for r in data["results"]} == set(study.STRATEGIES)
    assert "| severe | 256 KiB | scattered |" in (tmp_path / "r.md").read_text()
    for name in ("latency.png", "failure.png"):
        assert (plots / name).stat().st_size > 10_000
