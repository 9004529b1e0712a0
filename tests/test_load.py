"""Tests of ``poolsvc load``: short bounded runs with faults, record/replay, the checkers.

Every run here starts its own ``poolsvc serve`` subprocess on a temporary
socket and lasts a few seconds; each asserts zero violations and zero leaks
(the runner's own checks, see poolsvc/load/invariants.py), plus the figures
the run must have produced.  The checkers themselves are tested on doctored
inputs, so that "zero violations" is known to mean something.
"""
from __future__ import annotations

import json
import os
import random

import pytest

from poolsvc.cli import main
from poolsvc.errors import BadParameters, ConfigError
from poolsvc.load import invariants, report, trace
from poolsvc.load.faults import CASES, run_case
from poolsvc.load.mix import LoadSpec, OpMix, SizeDist
from poolsvc.load.runner import LoadRunner

from svcutil import DaemonThread
from sysutil import open_fds


def _assert_clean(rep: dict) -> None:
    assert rep["violations"]["count"] == 0, rep["violations"]["quoted"]
    assert rep["leaks"] == {}, rep["leaks"]
    assert rep["ok"] is True
    assert rep["errors"]["unexpected"] == {}


def test_short_run_with_kills_and_malformed_requests():
    fds = open_fds()
    rep = LoadRunner(LoadSpec(clients=3, duration=3.0, kill_rate=2.0, malformed_rate=10.0,
                              seed=7)).run()
    _assert_clean(rep)
    assert rep["faults"]["kills"] >= 1 and rep["faults"]["restarts"] >= 1
    assert rep["faults"]["malformed_sent"] >= 1
    for op in ("alloc_user", "alloc_kernel", "alloc_priv", "free", "lookup", "invoke",
               "register_user"):
        assert rep["ops"][op]["count"] > 0, op
        assert 0 < rep["ops"][op]["p50_us"] <= rep["ops"][op]["p99_us"] <= rep["ops"][op]["max_us"] * 1.1
    assert rep["invariants"]["snapshots_checked"] >= 3
    assert rep["unverified_checks"] == 0  # dynamic pool: every buffer was checked
    assert open_fds() == fds


def test_batched_exhaustion_with_kills():
    rep = LoadRunner(LoadSpec(clients=2, duration=3.0, batch=32, exhaust=True, kill_rate=1.0,
                              malformed_rate=5.0, sizes="log:4096:256KiB"),
                     dynamic_size="8MiB").run()
    _assert_clean(rep)
    assert rep["errors"]["by_type"].get("OutOfMemory", 0) > 0  # the pool did run dry
    assert rep["ops"]["batch"]["count"] > 0


def test_ops_bound_ends_the_run():
    rep = LoadRunner(LoadSpec(clients=2, duration=30.0, ops=400)).run()
    _assert_clean(rep)
    assert 400 <= rep["ops_total"] < 800 and rep["elapsed_s"] < 25
    # the workers' CPU over their operations (the set-up is not counted)
    assert 0 < rep["client_cpu_s"] < 10 * rep["elapsed_s"]
    assert 0 <= rep["client_cpu_sys_s"] <= rep["client_cpu_s"]
    assert rep["client_cpu_us_per_op"] == pytest.approx(1e6 * rep["client_cpu_s"] / rep["ops_total"], rel=0.05)
    assert "client CPU: " in report.text(rep)


def test_record_then_replay_on_two_configurations(tmp_path):
    rec = str(tmp_path / "run.trace")
    original = LoadRunner(LoadSpec(clients=2, duration=2.5, kill_rate=1.5, seed=3), record=rec).run()
    _assert_clean(original)
    tr = trace.read(rec)
    assert tr.clients == 2 and tr.ops > 0
    assert any(inc.end == "kill" for inc in tr.incarnations) == (original["faults"]["kills"] > 0)
    dyn = LoadRunner(LoadSpec(clients=2, duration=120.0, seed=3), replay=rec, label="dyn").run()
    static = LoadRunner(LoadSpec(clients=2, duration=120.0, seed=3), replay=rec, no_dynamic=True,
                        label="static").run()
    for rep in (dyn, static):
        _assert_clean(rep)
        assert rep["faults"]["kills"] == sum(inc.end == "kill" for inc in tr.incarnations)
    # The same stream ran on both: allocation attempts match one for one.
    for op in ("alloc_user", "alloc_kernel", "alloc_priv"):
        assert dyn["ops"][op]["count"] == static["ops"][op]["count"]
    assert dyn["service"]["pool"] == "dynamic" and static["service"]["pool"] == "static"
    assert static["skipped_ops"] > 0  # no registration without dynamic shm
    text = report.compare(dyn, static, ("dyn", "static"))
    assert "dyn" in text and "static pool" in text and "alloc_user p99 us" in text


def test_cli_run_compare_and_plot(tmp_path, capsys):
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    args = ["load", "--clients", "2", "--duration", "1.5", "--quiet", "--malformed-rate", "5"]
    assert main(args + ["--json", a, "--plot", str(tmp_path / "plots")]) == 0
    assert main(args + ["--batch", "16", "--json", b, "--label", "batched"]) == 0
    out = capsys.readouterr().out
    assert "RESULT: OK" in out and "section 7 target" in out
    assert os.path.getsize(tmp_path / "plots" / "throughput.png") > 1000
    assert os.path.getsize(tmp_path / "plots" / "latency.png") > 1000
    assert main(["load", "--compare", a, b]) == 0
    table = capsys.readouterr().out
    assert "batched" in table and "ops/s" in table
    assert json.load(open(b))["spec"]["batch"] == 16


def test_cli_refuses_bad_arguments(capsys):
    assert main(["load", "--mix", "alloc_user=oops"]) == 2
    assert main(["load", "--socket", "/nonexistent", "--no-dynamic"]) == 2
    assert "ConfigError" in capsys.readouterr().err


# -- the pieces ---------------------------------------------------------------------------------
def test_every_malformed_case_gets_its_promised_reply(tmp_path):
    daemon = DaemonThread(tmp_path / "d.sock")
    try:
        rng = random.Random(5)
        for case in CASES:
            for _ in range(2):
                assert run_case(daemon.path, case, rng) is None
        stats = daemon.stats()
        assert invariants.summary(stats)["contexts"] == 0
    finally:
        daemon.stop()


def test_snapshot_checker_reports_broken_accounting(tmp_path):
    daemon = DaemonThread(tmp_path / "d.sock")
    try:
        stats = daemon.stats()
    finally:
        daemon.stop()
    own = invariants.own_figures(stats)
    assert invariants.check_snapshot(stats, own) == []
    bad = json.loads(json.dumps(stats))
    bad["pools"]["dynamic"]["used_frames"] += 1
    found = invariants.check_snapshot(bad, own)
    assert any("free" in v for v in found) and any("counted twice" in v for v in found)
    bad = json.loads(json.dumps(stats))
    bad["ids"] += 2
    assert any(v.startswith("ids:") for v in invariants.check_snapshot(bad, own))
    before = invariants.summary(stats)
    after = dict(before, storage_objects=before["storage_objects"] + 1)
    assert invariants.leaks(before, after) == {"storage_objects": 1}


def test_worker_detects_a_foreign_tag():
    from poolsvc.load.ledger import TAG, TAG_MAGIC, Held
    from poolsvc.load.worker import Worker

    w = Worker.__new__(Worker)
    w.slot, w.gen, w.violations, w.unverified = 1, 0, [], 0
    buf = bytearray(100)
    held = Held(type("S", (), {"cookie": 0x1234})(), "u", 100, 9)
    held.view = memoryview(buf)
    w._write(held, full=True)
    w._verify(held, "free")
    assert w.violations == []
    buf[:16] = TAG.pack(TAG_MAGIC, 5, 2, 77)
    w._verify(held, "free")
    assert len(w.violations) == 1 and "client 5.2 buffer 77" in w.violations[0]


@pytest.mark.parametrize("batch_size", [1, 256])
def test_drain_with_nothing_held_draws_from_the_mix(batch_size):
    """After an OutOfMemory with no buffer left to free, the worker goes on with
    the mix (it used to return no line at all, and its queue.pop() failed)."""
    import random

    from poolsvc.load.worker import Worker

    w = Worker.__new__(Worker)
    w.draining, w.exhaust, w.live, w.pending_release = True, True, {}, []
    w.batch_size, w.rng = batch_size, random.Random(1)
    w._gen_single = lambda op: f"single {op}"
    w._gen_batch = lambda choose_batch: "batch"
    lines = w.generate(lambda: "alloc_user", lambda: "alloc_user")
    assert lines == (["single alloc_user"] if batch_size == 1 else ["batch"])
    assert not w.draining


def test_mix_sizes_and_spec_validation():
    mix = OpMix.parse("alloc_user=3, free=1")
    assert dict(mix.weights)["alloc_user"] == 3 and dict(mix.weights)["invoke"] == 0
    for bad in ("nope=1", "free=-1", "free=x", "free=0", "free"):
        with pytest.raises(ConfigError):
            OpMix.parse(bad)
    rng = random.Random(1)
    draw = SizeDist.parse("log:64:64KiB").sampler(rng)
    assert all(64 <= draw() <= 65536 for _ in range(1000))
    assert SizeDist.parse("choice:4KiB,8KiB").values == (4096, 8192)
    for bad in ("log:10:5", "fixed:0", "weird:1", "choice:"):
        with pytest.raises(ConfigError):
            SizeDist.parse(bad)
    with pytest.raises(ConfigError):
        LoadSpec(clients=0)
    with pytest.raises(ConfigError):
        LoadSpec(batch=5000)


def test_chooser_draws_by_weight_and_takes_the_last_on_rounding():
    choose = OpMix.parse("alloc_user=1,free=3").chooser(random.Random(3))
    draws = [choose() for _ in range(4000)]
    assert set(draws) == {"alloc_user", "free"} and 0.2 < draws.count("alloc_user") / 4000 < 0.3
    top = type("Top", (), {"random": lambda self: 1.0})()  # a draw of exactly the total weight
    assert OpMix.parse("alloc_user=1,free=3").chooser(top)() == "free"
    assert OpMix.parse("free=1").chooser(random.Random(1), frozenset({"lookup"})).names == []


def test_worker_report_line_counts_single_samples_and_batched_figures():
    from collections import defaultdict
    import io

    from poolsvc.histogram import Histogram
    from poolsvc.load.worker import Worker

    w = _bare_worker()
    w.samples, w.counts, w.errors, w.hists = defaultdict(list), {}, {}, {}
    w.daemon_private, w.cpu_mark, w.trace, w.out = 0, (0.0, 0.0), None, io.StringIO()
    for ns in (1000, 3000, 2000):
        w._time("free", ns)
    w._time_batched("free", 500, 4, 4)
    w._time_batched("batch", 9000, 0, 1)
    Worker.report(w, "tick")
    doc = json.loads(w.out.getvalue())
    assert doc["n"] == {"free": 7, "batch": 0} and doc["cpu"] >= doc["cpu_sys"] >= 0 and doc["cpu"] > 0
    free = Histogram.from_wire(doc["h"]["free"])
    assert free.count == 7 and free.min_ns == 500 and free.max_ns == 3000
    assert w.samples == {} and w.counts == {} and w.hists == {}


def test_trace_reader_names_the_bad_line(tmp_path):
    path = tmp_path / "t.trace"
    path.write_text('#poolsvc-trace 1 {}\n@ 0 0 exit 2\na u 4096 1\n')
    with pytest.raises(BadParameters, match="announces 2"):
        trace.read(str(path))
    path.write_text('#poolsvc-trace 1 {}\n@ 0 0 exit 1\nz 1\n')
    with pytest.raises(BadParameters, match=":3: unknown operation"):
        trace.read(str(path))
    path.write_text("not a trace\n")
    with pytest.raises(BadParameters, match="header"):
        trace.read(str(path))


# -- the worker's checks, on doctored buffers (they must still bite) ------------------------------
def _bare_worker(dynamic: bool = True):
    from poolsvc.load.worker import Worker

    w = Worker.__new__(Worker)
    w.slot, w.gen, w.violations, w.unverified, w.skipped = 3, 1, [], 0, 0
    w.dynamic, w.live, w.live_list, w.pages, w.free_regions = dynamic, {}, [], {}, []
    return w


class _FakeShm:
    """What Worker._hold reads of a service Shm: one page run (``page_run``)."""

    def __init__(self, first: int, npages: int, size: int, cookie: int = 0x99) -> None:
        self.page_run = (first, npages)
        self.cookie, self.id, self.buf = cookie, 1, bytearray(size)

    def view(self) -> memoryview:
        return memoryview(self.buf)


def test_worker_batched_ends_catch_a_changed_head_or_tail():
    from poolsvc.load.ledger import TAG, TAG_MAGIC

    w = _bare_worker()
    for size, spot in ((5000, 0), (5000, 4999), (4103, 4090), (33, 32)):
        shm = _FakeShm(0x100000, 2, size)
        held = w._hold(shm, "u", size, 7, full=False)
        assert held.full == (size <= 32)
        pattern = (TAG.pack(TAG_MAGIC, 3, 1, 7) * (size // 16 + 1))[:size]
        assert bytes(shm.buf[:16]) == pattern[:16] and bytes(shm.buf[-16:]) == pattern[-16:]
        w._verify(held, "free")
        assert w.violations == []
        shm.buf[spot] ^= 0xFF
        w._verify(held, "free")
        assert len(w.violations) == 1 and "changed under its owner" in w.violations[0]
        w.violations.clear()
        w._forget(held)
    assert w.live == {} and w.live_list == [] and w.pages == {}


def test_worker_catches_a_page_given_twice():
    import numpy as np

    w = _bare_worker()
    a = w._hold(_FakeShm(0x200000, 3, 3 * 4096), "u", 3 * 4096, 1, full=False)
    assert sorted(w.pages) == [0x200000, 0x201000, 0x202000] and w.violations == []
    # a scattered buffer (its page array came in the reply) sharing one page with buffer 1
    scattered = _FakeShm(0, 2, 8192)
    scattered.page_run = None
    scattered.pages = np.array([0x500000, 0x201000], dtype=np.uint64)
    w._hold(scattered, "k", 8192, 2, full=False)
    assert len(w.violations) == 1 and "page 0x201000 of new buffer 2" in w.violations[0] \
        and "live buffer 1" in w.violations[0]
    # an overlapping run caught as well; priv buffers have no pages to check
    w._hold(_FakeShm(0x202000, 1, 100), "k", 100, 3, full=False)
    assert len(w.violations) == 2 and "page 0x202000 of new buffer 3" in w.violations[1]
    w._hold(_FakeShm(0x200000, 1, 100), "p", 100, 4, full=False)
    assert len(w.violations) == 2
    w._forget(a)
    assert 0x200000 not in w.pages and w.pages[0x201000] == 2 and w.pages[0x202000] == 3


def test_worker_batches_are_seeded_and_use_a_buffer_once():
    from poolsvc.load.mix import BATCHABLE
    from poolsvc.load.ledger import Held

    def batches(seed: int) -> list:
        w = _bare_worker()
        w.rng = random.Random(seed)
        w.size = SizeDist.parse("log:64:64KiB").sampler(w.rng)
        w.exhaust, w.max_live, w.batch_size, w.next_handle = False, 40, 64, 100
        w.pending_release = []
        for h in range(1, 41):
            held = Held(type("S", (), {"id": h % 3})(), "u", 64, h)
            held.index = len(w.live_list)
            w.live[h] = held
            w.live_list.append(held)
        choose = OpMix.parse("alloc_user=2,alloc_priv=1,free=4,lookup=3").chooser(w.rng, BATCHABLE)
        out = [w._gen_batch(choose) for _ in range(5)]
        for code, toks, count in out:
            assert code == "b" and count == len(toks) == 64
            used = [t[1] for t in toks if t[0] in "fl"]
            assert len(used) == len(set(used))  # at most once among frees and lookups
            assert all(w.live[h].shm.id > 0 for c, h in (t[:2] for t in toks) if c == "l")
        return out

    assert batches(4) == batches(4)
    assert batches(4) != batches(5)


def test_trace_text_round_trips_the_operation_tuples():
    ops = [("a", "u", 4096, 7), ("r", "U", 100, 12, 8), ("f", 7), ("l", 8), ("i", 8),
           ("b", [("x", 3), ("a", "k", 64, 9), ("f", 4), ("l", 5)], 3), ("b", [("x", 1)], 0)]
    lines = [trace.format_op(op) for op in ops]
    assert lines[0] == "a u 4096 7" and lines[5] == "b x:3 a:k:64:9 f:4 l:5"
    assert [trace.parse_op(line) for line in lines] == ops
    for bad in ("a u 12", "b a:u:1", "f x", "q 1", ""):
        with pytest.raises(BadParameters):
            trace.parse_op(bad)


class _FakeBatch:
    """A Context.batch() stand-in: records the calls, ``run`` gives the canned results."""

    def __init__(self, results: list) -> None:
        self.results, self.calls = results, []
        for name in ("alloc_user_buf", "alloc_kernel_buf", "alloc_priv_buf", "close", "shm_from_id"):
            setattr(self, name, lambda *a, _n=name: self.calls.append((_n, *a)))

    def run(self) -> list:
        assert len(self.calls) == len(self.results)
        return self.results


def test_worker_batched_page_check_follows_the_batch_order():
    """A batch runs its operations in order: an alloc placed before a free in the
    same batch must not get that buffer's pages (it was still live then); an alloc
    after it may.  (The frees used to forget their pages before the batch ran.)"""
    w = _bare_worker()
    w.hists, w.counts, w.errors, w.pending_release, w.draining = {}, {}, {}, [], False
    w._hold(_FakeShm(0x200000, 2, 8192), "u", 8192, 1, full=False)
    w._hold(_FakeShm(0x300000, 2, 8192), "u", 8192, 2, full=False)
    # alloc then free of buffer 1: the daemon gave the new buffer 3 one of 1's pages
    w.ctx = type("C", (), {"batch": lambda self: _FakeBatch([_FakeShm(0x201000, 1, 100), None])})()
    w.op_batch([("a", "u", 100, 3), ("f", 1)])
    assert len(w.violations) == 1 and "page 0x201000 of new buffer 3" in w.violations[0] \
        and "live buffer 1" in w.violations[0]
    w.violations.clear()
    # free of buffer 2 then alloc: its pages may come back at once
    w.ctx = type("C", (), {"batch": lambda self: _FakeBatch([None, _FakeShm(0x300000, 2, 5000)])})()
    w.op_batch([("f", 2), ("a", "k", 5000, 4)])
    assert w.violations == []
    assert w.pages == {0x201000: 3, 0x300000: 4, 0x301000: 4}
    assert sorted(w.live) == [3, 4]
    assert w.counts == {"batch": 0, "alloc_user": 1, "alloc_kernel": 1, "free": 2}
