"""The contiguous-vs-scattered study (``poolsvc bench``): the model's predictions hold.

One small study (32 MiB of dynamic RAM, two levels, four sizes, three trials)
is shared by the module; the CLI tests run ``--quick`` variants and check the
saved folder, the legend, the summary and the plots.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from poolsvc import Config, System, study, studyreport
from poolsvc._backend import core
from poolsvc.cli import main
from poolsvc.fragmentation import INDEX_ORDER, Ageing, copy_layout, unusable_index

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def report():
    levels = [lv for lv in study.LEVELS if lv.name in ("fresh", "severe")]
    return study.run_study(sizes=[4 * KiB, 64 * KiB, 1 * MiB, 8 * MiB], levels=levels, trials=3,
                           seed=7, dynamic_size=32 * MiB, static_daemon=False)


def cell(report, level, size, strategy):
    hit = report.cell(level, size, strategy)
    assert hit is not None
    return hit


def test_fresh_system_serves_every_strategy(report):
    for strategy in study.STRATEGIES:
        r = cell(report, "fresh", 64 * KiB, strategy)
        assert r.failures == 0 and r.p50_us is not None and r.access_mb_s > 0
        assert r.segments == 1 and r.longest_run_pages == 16 and r.frames == 16


def test_mechanism_costs_per_strategy(report):
    contiguous = cell(report, "fresh", 1 * MiB, "contiguous")
    assert (contiguous.list_pages, contiguous.messages, contiguous.pinned_pages) == (1, 2, 0)
    static = cell(report, "fresh", 64 * KiB, "static")
    assert (static.list_pages, static.messages, static.pinned_pages, static.setup_us) == (0, 0, 0, None)
    scattered = cell(report, "severe", 1 * MiB, "scattered")
    assert (scattered.frames, scattered.list_pages, scattered.list_bytes) == (256, 1, 4096)
    assert scattered.messages == 2 and scattered.pinned_pages == 256


def test_contiguous_fails_under_fragmentation_scattered_does_not(report):
    severe = report.level("severe")
    assert severe.largest_free_run < 256  # no 1 MiB run is left
    assert cell(report, "severe", 1 * MiB, "contiguous").failure_rate == 1.0
    scattered = cell(report, "severe", 1 * MiB, "scattered")
    assert scattered.failure_rate == 0.0
    assert scattered.segments > 1 and scattered.setup_us > 0
    assert scattered.longest_run_pages < 256


def test_static_pool_fails_only_when_full(report):
    for level in ("fresh", "severe"):
        assert cell(report, level, 1 * MiB, "static").failure_rate == 0.0
        r = cell(report, level, 8 * MiB, "static")
        assert r.failure_rate == 1.0 and r.max_live == 0  # 4 MiB pool


def test_contiguous_above_max_order_always_fails(report):
    r = cell(report, "fresh", 8 * MiB, "contiguous")
    assert r.failure_rate == 1.0 and "order" in r.failure_reason


def test_levels_are_reported_as_the_index_reached(report):
    fresh, severe = report.levels
    assert fresh.index < 0.05 and fresh.index == fresh.unusable_index[INDEX_ORDER]
    assert severe.index >= 0.99 and severe.target == 0.99
    for lv in report.levels:
        assert sum(c << k for k, c in enumerate(lv.free_blocks_per_order)) == lv.free_frames


def test_ageing_reaches_each_target_and_only_grows():
    frames = core.FrameAllocator(0x50000000, 4096, 10)
    ageing = Ageing(frames, np.random.default_rng(3))
    last = 0.0
    for target in (0.1, 0.5, 0.9):
        reached = ageing.run_until(target)
        assert reached >= target and reached >= last
        assert reached == unusable_index(frames.free_blocks_per_order(), INDEX_ORDER)
        last = reached
    assert frames.used_frames <= 4096 * ageing.max_occupancy


def test_ageing_is_reproducible():
    def layout(seed):
        frames = core.FrameAllocator(0x50000000, 4096, 10)
        Ageing(frames, np.random.default_rng(seed)).run_until(0.9)
        return frames.used_map().copy()
    assert np.array_equal(layout(5), layout(5))
    assert not np.array_equal(layout(5), layout(6))


def test_copy_layout_replays_a_layout_onto_a_system():
    frames = core.FrameAllocator(0x50000000, 4096, 10)
    Ageing(frames, np.random.default_rng(1)).run_until(0.5)
    with System(Config(dynamic_size=16 * MiB)) as system:
        own = system.dynamic.used_map().copy()
        claimed = copy_layout(frames.used_map(), system.dynamic)
        expected = (frames.used_map() != 0) | (own != 0)
        assert np.array_equal(system.dynamic.used_map() != 0, expected)
        assert claimed == int(((frames.used_map() != 0) & (own == 0)).sum())


def test_summary_answers_the_question(report):
    lines = studyreport.summary_lines(report)
    text = "\n".join(lines)
    assert "contiguous at severe (index" in text and "refuses every attempt from 1 MiB" in text
    assert "scattered at severe (index" in text and "1 MiB = 256 frames in" in text
    assert "2 messages to the secure world, one pinned page per frame" in text
    assert "static pool (4 MiB) runs out by capacity" in text


def test_cli_saves_results_in_a_named_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--quick", "--sizes", "4KiB,256KiB", "--trials", "2", "--dynamic-size", "16MiB",
               "--transport", "socket"])
    assert rc == 0
    text = capsys.readouterr().out
    (folder,) = (tmp_path / "poolsvc-results").iterdir()
    assert f"results saved in poolsvc-results/{folder.name}/" in text
    for heading in ("columns:", "summary:", "segs", "pinned", "msgs", "kpages", "waste",
                    "static pool, embedded and through the daemon:", "daemon (socket)"):
        assert heading in text
    data = json.loads((folder / "results.json").read_text())
    assert data["machine"]["cores"] >= 1 and data["summary"] and "segs" in data["legend"]
    assert {r["strategy"] for r in data["results"]} == set(study.STRATEGIES)
    assert [lv["level"] for lv in data["levels"]] == study.QUICK_LEVELS
    report_md = (folder / "report.md").read_text()
    assert "## Summary" in report_md and "| severe | 256 KiB | scattered |" in report_md
    assert "## The static pool, embedded and through the daemon" in report_md
    assert [(f["where"], f["size"]) for f in data["static_pool"]] == [
        ("embedded", 4 * KiB), ("embedded", 256 * KiB), ("daemon", 4 * KiB), ("daemon", 256 * KiB)]
    pytest.importorskip("matplotlib")
    for name in ("latency.png", "failure.png"):
        assert (folder / name).stat().st_size > 10_000


def test_cli_extra_outputs_and_no_save(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    rc = main(["bench", "--quick", "--sizes", "4KiB", "--trials", "1", "--dynamic-size", "16MiB",
               "--no-save", "--no-daemon", "--json", str(out), "--markdown", str(tmp_path / "r.md")])
    assert rc == 0
    assert not (tmp_path / "poolsvc-results").exists()
    data = json.loads(out.read_text())
    assert data["params"]["trials"] == 1 and data["static_pool"] == []
    assert f"wrote {out}" in capsys.readouterr().out
