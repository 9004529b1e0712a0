"""The request profile (bench/profile_request.py) runs end to end and its columns add up.

A smoke run with tiny rounds: no figure is judged, only the shape of the
document: every column's rows sum to its client-measured total, the daemon's
parts sum to its whole serve, and the Markdown names the machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("profile_request", Path(__file__).with_name("profile_request.py"))
assert _SPEC is not None and _SPEC.loader is not None
profile = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(profile)


def test_profile_adds_up():
    args = argparse.Namespace(transport=["socket", "shm"], pool=["dynamic", "static"], kind="user", size=4096,
                              batch=4, rounds=2, floor_n=20, clients=2, seconds=0.2)
    doc = profile.run(args)
    assert set(doc["pools"]) == {"dynamic", "static"}
    total = "**total, client-measured**"
    for entry in doc["pools"].values():
        columns = entry["columns"]
        assert {"socket single ALLOC", "shm single CLOSE", "shm single PING", "socket batched CLOSE"} <= set(columns)
        for col in columns.values():
            parts = sum(v for label, v in col.items() if label != total and not label.startswith("client: round"))
            assert math.isclose(parts, col[total], rel_tol=1e-9, abs_tol=1e-9)
        for key, daemon in entry["daemon"].items():
            if key.count(".") == 2:  # "<transport>.<mode>.<op>"
                assert math.isclose(sum(v for k, v in daemon.items() if k != "total"), daemon["total"],
                                    rel_tol=1e-9, abs_tol=1e-9)
        assert entry["daemon"]["hot"], "the handler profile is empty"
        assert entry["daemon"]["compiled_per_op"] > 0
        assert len(entry["load"]) == 4 and all(ops > 0 for ops in entry["load"].values())
    text = "\n".join(profile.render(doc, "python bench/profile_request.py"))
    assert "| CPU |" in text and "load average" in text
    assert "## Floors" in text and "bounds against the goals" in text
