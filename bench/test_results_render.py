"""Rendering of the results files (bench/results.py) from a pytest-benchmark document.

Owns: the checks that a results file names the machine, the date and the
command, that per-operation figures come from ``extra_info`` when a benchmark
records them, that targets are judged from the right benchmarks, and that the
study's report keeps working links inside ``study.md``.  No
benchmark runs here; the documents are built in the test.
"""
from __future__ import annotations

import datetime
import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("bench_results", Path(__file__).with_name("results.py"))
assert _SPEC is not None and _SPEC.loader is not None
results = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = results          # dataclasses look their module up there
_SPEC.loader.exec_module(results)


def bench(name: str, median_s: float, group: str | None = None, **extra) -> dict:
    return {"name": name, "fullname": f"bench/test_x.py::{name}", "group": group,
            "stats": {"median": median_s, "rounds": 7}, "extra_info": extra}


@pytest.fixture
def doc() -> dict:
    return {"benchmarks": [
        bench("test_frames_pair_compiled", 1e-3, "frames", ns_per_op=120.0, op="pair"),
        bench("test_frames_pair_pure", 2e-3, "frames", ns_per_op=1200.0, op="pair"),
        bench("test_other", 5e-6),
    ]}


def test_header_names_machine_date_and_command():
    info = results.machine("compiled")
    started = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)
    text = "\n".join(results.header(results.FAMILIES["alloc"], info, "python bench/results.py --family alloc",
                                    started, 75.0))
    assert "| date | 2026-01-02 03:04 UTC |" in text
    assert "| run time | 1 min 15 s |" in text
    assert f"| CPU | {results.cpu_model()} |" in text
    assert "| backend | compiled |" in text
    assert "python bench/results.py --family alloc" in text
    assert "| Python | " in text and "| cores | " in text


def test_per_op_figures_and_ratios(doc):
    lines = results.render_pytest(results.FAMILIES["alloc"], doc)
    text = "\n".join(lines)
    assert "| `test_frames_pair_compiled` | pair | 120.0 ns | 1.00x | 7 |" in text
    assert "| `test_frames_pair_pure` | pair | 1.20 µs | 10.00x | 7 |" in text
    # a lone benchmark without extra_info: its median per call, no ratio column
    assert "| `test_other` | 5.00 µs | 7 |" in text


def test_targets_judged(doc):
    text = "\n".join(results.render_pytest(results.FAMILIES["alloc"], doc))
    assert "| FrameAllocator alloc_contig + free_contig pair | 120 ns | <= 150 ns | yes |" in text
    doc["benchmarks"][0]["extra_info"]["ns_per_op"] = 151.0
    text = "\n".join(results.render_pytest(results.FAMILIES["alloc"], doc))
    assert "| 151 ns | <= 150 ns | **no** |" in text
    del doc["benchmarks"][0]
    text = "\n".join(results.render_pytest(results.FAMILIES["alloc"], doc))
    assert "| not measured | <= 150 ns | - |" in text


def test_copy_share_is_bandwidth_fraction():
    doc = {"benchmarks": [bench("test_copy[compiled-gather-1MiB]", 2e-4),
                          bench("test_copyto_floor[1MiB]", 1e-4)]}
    text = "\n".join(results.render_pytest(results.FAMILIES["copy"], doc))
    assert "| gather 1MiB / numpy.copyto bandwidth | 50% | >= 60% | **no** |" in text


def test_figure_benchmarks_listed_apart():
    figures = {f"k{i}": float(i) for i in range(8)}
    doc = {"benchmarks": [bench("test_service_ratios", 3.0, **figures)]}
    text = "\n".join(results.render_pytest(results.FAMILIES["service"], doc))
    assert "### Figures of `test_service_ratios`" in text
    assert "| `k7` | 7 |" in text
    assert "### test_service_ratios" not in text


def test_study_body_links_relative_to_the_results_file():
    report = ("# poolsvc bench: title\n\nMeasured on a machine.\n\n"
              "![latency p50 with p99 band](latency.png)\n\n[web](https://example.org/a.png) [here](#summary)\n")
    (body,) = results.study_body(report, "study")
    assert not body.startswith("# ")            # study.md has its own title
    assert body.startswith("Measured on a machine.")
    assert "![latency p50 with p99 band](study/latency.png)" in body
    assert "[web](https://example.org/a.png) [here](#summary)" in body

