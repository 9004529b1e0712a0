"""``python -m poolsvc.load.profile``: one load client's loop in process, by phase.

Runs with either backend; each test starts its own daemon and profiles for a
fraction of a second, so only the shape of the answer is checked: every
operation accounted for, the phases within the total, no violation.
"""
from __future__ import annotations

import tempfile

import pytest

from poolsvc.load import profile
from poolsvc.load.daemon import LoadDaemon
from poolsvc.load.mix import LoadSpec


@pytest.mark.parametrize("batch", [1, 64])
def test_the_phases_add_up_to_the_loop(batch: int) -> None:
    spec = LoadSpec(clients=1, mix="alloc_user=1,free=1", sizes="fixed:4096", batch=batch)
    with tempfile.TemporaryDirectory(prefix="poolsvc-profile-test-") as workdir:
        daemon = LoadDaemon(workdir, config_path=None, dynamic_size="64MiB", no_dynamic=False, clients=1)
        path = daemon.start()
        try:
            doc = profile.profile(path, spec, 0.5)
        finally:
            _, problems = daemon.stop()
    assert problems == []
    assert doc["ops"] > 0 and doc["violations"] == []
    phases = doc["phases"]
    assert set(phases) == set(profile.PHASES) | {"other"}
    assert all(us >= 0 for us in phases.values())
    assert sum(phases.values()) <= doc["us_per_op"] * 1.001 + 1e-9
    busy = ("taking in", "library") if batch > 1 else ("single operations",)
    assert all(phases[name] > 0 for name in busy)


def test_the_command_prints_the_phases_and_a_cprofile(capsys: pytest.CaptureFixture[str]) -> None:
    assert profile.main(["--seconds", "0.3", "--batch", "16", "--cprofile", "5"]) == 0
    out = capsys.readouterr().out
    assert "us of this thread's CPU per operation" in out and "taking in" in out
    assert "tottime" in out  # the cProfile table
