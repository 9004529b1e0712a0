"""Tests of ``poolsvc load --sweep``, the start of a run, progress and option checks.

The sweep's table is checked on canned reports (no processes) and once end
to end on two short runs; the option checks exit 2 before anything runs.
"""
from __future__ import annotations

import io
import json
import os

import pytest

from poolsvc.cli import main
from poolsvc.errors import ConfigError
from poolsvc.load import progress, sweep
from poolsvc.load.mix import LoadSpec
from poolsvc.load.runner import START_WINDOW, LoadRunner


def _fake_report(spec: LoadSpec) -> dict:
    rate = {1: 1000.0, 8: 4000.0, 64: 3000.0}[spec.clients]
    return {"spec": spec.to_json(), "machine": {"cpus": 2}, "service": {"backend": "pure"},
            "ops_per_s": rate, "ops_total": int(rate * spec.duration), "start_s": 0.5,
            "latency_us": {"p50_us": 10.0 * spec.clients, "p99_us": 99.0 * spec.clients},
            "violations": {"count": 0 if spec.clients != 64 else 2}, "leaks": {},
            "ok": spec.clients != 64}


def test_sweep_rows_ratios_tables_and_plot(tmp_path):
    result = sweep.run(LoadSpec(duration=2.0), [1, 8, 64], _fake_report)
    assert result["format"] == sweep.FORMAT and result["reference_clients"] == 8
    rows = {r["clients"]: r for r in result["rows"]}
    assert rows[1]["of_reference"] == 0.25 and rows[8]["of_reference"] == 1.0 \
        and rows[64]["of_reference"] == 0.75
    assert rows[64]["p99_us"] == 99.0 * 64 and rows[64]["violations"] == 2
    assert result["ok"] is False  # one run failed
    text = sweep.text(result)
    assert "75%" in text and "RESULT: FAILED" in text and "of ref" in text
    assert os.path.getsize(sweep.plot(result, str(tmp_path / "plots"))[0]) > 1000
    md = sweep.markdown(result).splitlines()
    assert md[2].startswith("| clients | ops/s |") and md[3].startswith("|---:|")
    assert md[4:] == ["| 1 | 1,000 | 25% | 10.0 | 99.0 | 0.5 | 0 | OK |",
                      "| 8 | 4,000 | 100% | 80.0 | 792.0 | 0.5 | 0 | OK |",
                      "| 64 | 3,000 | 75% | 640.0 | 6336.0 | 0.5 | 2 | FAILED |"]
    without_8 = sweep.run(LoadSpec(duration=2.0), [64, 1], _fake_report)
    assert without_8["reference_clients"] == 64  # no 8: the first count


def test_sweep_rounds_give_medians_and_ratios_within_each_round():
    """Three rounds on a machine that slows down between them: a count's ratio is the
    median of its ratios to the reference of the same round, not of its median
    throughput to the reference's median (which mixes rounds)."""
    speed = iter([1.0, 1.0, 0.5, 0.5, 0.8, 0.8])  # per run, in the order they run
    base = {8: 4000.0, 64: 3000.0}
    ratio_in_round = iter([0.75, 0.9, 0.6])

    def report(spec: LoadSpec) -> dict:
        doc = _fake_report(spec)
        doc["ok"] = True
        doc["ops_per_s"] = base[8] * next(speed)
        if spec.clients == 64:
            doc["ops_per_s"] *= next(ratio_in_round)
        return doc

    result = sweep.run(LoadSpec(duration=2.0), [8, 64], report, rounds=3)
    rows = {r["clients"]: r for r in result["rows"]}
    assert result["rounds"] == 3 and len(result["runs"]) == 6
    assert rows[8]["rounds"]["ops_per_s"] == [4000.0, 2000.0, 3200.0] and rows[8]["ops_per_s"] == 3200.0
    assert rows[64]["rounds"]["of_reference"] == [0.75, 0.9, 0.6]
    assert rows[64]["of_reference"] == 0.75 and rows[8]["of_reference"] == 1.0
    assert rows[64]["ops_total"] == sum(r["ops_total"] for r in result["runs"][1::2])
    text = sweep.text(result)
    assert "3 rounds" in text and "75% 90% 60%" in text
    assert sweep.markdown(result).splitlines()[2].startswith("| clients | ops/s | of ref | rounds |")
    with pytest.raises(ConfigError, match="--rounds"):
        sweep.run(LoadSpec(duration=2.0), [8], report, rounds=0)


def test_sweep_counts_are_checked():
    assert sweep.parse_counts(" 1, 8,64 ") == [1, 8, 64]
    for bad, reason in (("1,x", "not a number"), ("8,8", "given twice"), ("0", "outside"),
                        ("1,5000", "outside"), ("", "not a number")):
        with pytest.raises(ConfigError, match=reason):
            sweep.parse_counts(bad)


@pytest.mark.parametrize("args, reason", [
    (["--clients", "0"], "--clients: 0 is outside 1..1024"),
    (["--clients", "1025"], "outside 1..1024"),
    (["--duration", "-1"], "--duration"),
    (["--duration", "nan"], "--duration"),
    (["--batch", "0"], "--batch"),
    (["--max-live", "0"], "--max-live"),
    (["--ops", "-1"], "--ops"),
    (["--kill-rate", "-0.5"], "--kill-rate"),
    (["--malformed-rate", "1e9"], "--malformed-rate"),
    (["--sweep", "1,two"], "--sweep"),
    (["--sweep", "1,8", "--clients", "4"], "--clients applies to a single run"),
    (["--sweep", "1,8", "--record", "t.trace"], "--record applies to a single run"),
    (["--markdown", "t.md"], "--markdown writes the table of a --sweep"),
    (["--rounds", "2"], "--rounds repeats a --sweep"),
    (["--sweep", "1,8", "--rounds", "0"], "--rounds: 0 is not a number of rounds"),
])
def test_bad_numbers_and_combinations_exit_2_with_the_reason(args, reason, capsys):
    assert main(["load", "--quiet"] + args) == 2
    assert reason in capsys.readouterr().err


def test_sweep_end_to_end(tmp_path, capsys):
    js, md = str(tmp_path / "s.json"), str(tmp_path / "s.md")
    assert main(["load", "--sweep", "1,2", "--duration", "1", "--quiet", "--json", js,
                 "--markdown", md]) == 0
    out = capsys.readouterr().out
    assert "RESULT: OK" in out and f"wrote {js}" in out and f"wrote {md}" in out
    doc = json.load(open(js))
    assert [r["clients"] for r in doc["rows"]] == [1, 2] and doc["ok"] is True
    for row, run in zip(doc["rows"], doc["runs"]):
        assert row["violations"] == 0 and row["ops_total"] > 0 and 0 < row["p50_us"] <= row["p99_us"]
        assert run["spec"]["clients"] == row["clients"] and run["ok"] is True
    assert open(md).read().count("\n| ") == 3  # header and two rows


def test_initial_clients_start_in_waves_then_run_together():
    """More clients than START_WINDOW: all connect, then all run the full duration."""
    rep = LoadRunner(LoadSpec(clients=START_WINDOW + 2, duration=1.5, seed=2)).run()
    assert rep["violations"]["count"] == 0, rep["violations"]["quoted"]
    assert rep["ok"] is True and rep["clients_run"] == START_WINDOW + 2
    assert rep["start_s"] > 0 and rep["elapsed_s"] >= 1.5
    assert rep["latency_us"]["count"] == rep["ops_total"]


def test_snapshots_are_spaced_to_take_at_most_a_share_of_the_daemon():
    from poolsvc.load.runner import CHECK_SHARE

    runner = LoadRunner(LoadSpec(clients=2, duration=1.0))
    assert runner._next_check(100.0) == 100.0 + runner.spec.check_interval  # none taken yet
    runner.check_s = runner.spec.check_interval * CHECK_SHARE / 2  # a quick one
    assert runner._next_check(100.0) == 100.0 + runner.spec.check_interval
    runner.check_s = 0.012  # a slow one (256 clients): 1.2 s to the next
    assert runner._next_check(100.0) == pytest.approx(100.0 + 0.012 / CHECK_SHARE)


def test_worker_waits_for_its_start_line(monkeypatch):
    from poolsvc.load.worker import Worker

    w = Worker.__new__(Worker)
    w.deadline = 0.0
    monkeypatch.setattr("sys.stdin", io.StringIO("go 1234.5\n"))
    assert w._wait_for_start() is True and w.deadline == 1234.5
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the runner went away
    assert w._wait_for_start() is False


# -- progress ------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_without_a_terminal(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = progress.Progress(out, 10.0, "x ")
    p.update("running", 1.0, "ops 5")
    clock[0] += 1.0
    p.update("running", 2.0, "ops 9")  # within LOG_EVERY: not written
    clock[0] += progress.LOG_EVERY
    p.update("running", 7.0, "ops 20")
    p.update("done", 10.2, "ops 30", final=True)  # the last one always
    assert out.getvalue().splitlines() == ["x running [  1.0/10s] ops 5",
                                           "x running [  7.0/10s] ops 20",
                                           "x done [ 10.2/10s] ops 30"]
    progress.Progress(None, 1.0).update("running", 0.5, "silent")  # no stream: nothing


def test_progress_on_a_terminal_without_tqdm(monkeypatch):
    monkeypatch.setattr(progress, "_tqdm", lambda: None)
    out = _Tty()
    p = progress.Progress(out, 5.0)
    p.update("running", 1.0, "ops 5")
    p.update("done", 5.0, "ops 9", final=True)
    text = out.getvalue()
    assert text.startswith("\rrunning [  1.0/5s] ops 5") and text.endswith("\n")
    assert text.count("\r") == 2


def test_progress_drives_a_tqdm_bar_on_a_terminal(monkeypatch):
    made = []

    class FakeBar:
        def __init__(self, **kw):
            self.kw, self.n, self.calls, self.closed = kw, 0.0, [], False
            made.append(self)

        def set_description_str(self, text, refresh=True):
            self.calls.append(("desc", text))

        def set_postfix_str(self, text, refresh=True):
            self.calls.append(("postfix", text))

        def refresh(self):
            self.calls.append(("refresh", self.n))

        def close(self):
            self.closed = True

    monkeypatch.setattr(progress, "_tqdm", lambda: FakeBar)
    p = progress.Progress(_Tty(), 8.0, "64 clients: ")
    p.update("starting 3/64", 0.0, "ops 0")
    p.update("done", 9.0, "ops 100", final=True)
    bar = made[0]
    assert bar.kw["total"] == 8.0
    assert ("desc", "64 clients: starting 3/64") in bar.calls and ("postfix", "ops 100") in bar.calls
    assert ("refresh", 8.0) in bar.calls  # elapsed beyond the total: the bar is full, not over
    assert bar.closed and p.bar is None


def test_progress_with_the_real_tqdm():
    pytest.importorskip("tqdm")
    out = _Tty()
    p = progress.Progress(out, 10.0, "8 clients: ")
    p.update("running", 4.0, "ops 1,234")
    p.update("done", 10.3, "ops 3,000", final=True)
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("8 clients: done") and "10/10 s" in last and last.endswith("ops 3,000")
