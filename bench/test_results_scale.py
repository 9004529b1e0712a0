"""Rendering of ``bench/results/scale.md`` (bench/results.py, family ``scale``) from a
``bench/scale.py`` document built in the test: the table, the goals judged from the
ratios, the memory figures and the plot.  No client or daemon runs here.
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


def _row(transport: str, clients: int, pairs: int, ratio: float | None) -> dict:
    return {"transport": transport, "clients": clients, "runs": 3, "pairs_per_s": pairs,
            "of_reference": ratio, "p50_us": 100.0 * clients, "p99_us": 300.0 * clients,
            "daemon_us_per_pair": 12.5, "errors": 0}


def _doc() -> dict:
    return {"format": "poolsvc-bench-scale/1", "counts": [1, 8, 64, 256], "transports": ["socket", "shm"],
            "seconds": 5.0, "rounds": 3, "reference_clients": 8, "pair": "alloc_user_buf(4096) + close",
            "cpus": 2, "loadavg_start": [1.0, 2.0, 3.0], "loadavg_end": [4.0, 5.0, 6.0],
            "rows": [_row("socket", 1, 10_000, 0.5), _row("socket", 8, 20_000, 1.0),
                     _row("socket", 64, 15_000, 0.75), _row("socket", 256, 6_000, 0.3),
                     _row("shm", 1, 30_000, 0.6), _row("shm", 8, 50_000, 1.0),
                     _row("shm", 64, 40_000, 0.8), _row("shm", 256, 0, None)],
            "memory": [{"transport": "shm", "clients": 256, "ready": 256, "errors": 0, "rss_before_kib": 40_000,
                        "rss_after_kib": 80_000, "kib_per_client": 156.2}]}


def test_scale_body_tables_and_goals():
    text = "\n".join(results.scale_body(_doc(), "scale"))
    assert "![pairs/s and latency against client processes](scale/scale.png)" in text
    assert "| socket | 64 | 15,000 | 75% | 6,400.0 | 19,200.0 | 12.5 | 0 |" in text
    assert "| socket | 256 | 30% | **no** |" in text
    assert "| shm | 64 | 80% | yes |" in text
    assert "| shm | 256 | - | - |" in text            # a cell without a ratio is not judged
    assert "| shm | 256 of 256 | 40,000 | 80,000 | 156.2 | yes |" in text
    assert "load average 1.0 2.0 3.0 at the start, 4.0 5.0 6.0 at the end" in text


def test_scale_plot_is_written(tmp_path):
    path = tmp_path / "scale.png"
    results.scale_plot(_doc(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
