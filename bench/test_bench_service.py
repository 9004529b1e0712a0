"""Pool service benchmarks: the daemon's round trips against a bare Unix-socket round trip.

Everything talks to real processes: a ``poolsvc serve`` daemon, and a bare
echo server (two Python processes, one blocking ``recv``/``sendall`` loop),
so that the daemon's cost is read against the floor of the same machine in
the same run (DESIGN.md section 7: alloc+free within 1.5x of a bare round
trip; batched requests >= 10x the operations per second of single ones).

``test_service_ratios`` interleaves every measurement round by round and
reports medians of the per-round ratios (``benchmark.extra_info`` and
stdout with ``-s``); the other benchmarks give pytest-benchmark's own
statistics per operation.  On a shared 2-core machine single figures
deserve scepticism: read the ratios.
"""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from poolsvc.service import protocol as P
from poolsvc.service.client import connect

ECHO = textwrap.dedent("""
    import os, socket, sys
    path = sys.argv[1]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
""")

#: A request the size of an ALLOC frame, echoed back (the bare round trip).
BARE_MESSAGE = P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096))
BATCH = 256


@pytest.fixture(scope="module")
def sockdir(tmp_path_factory):
    return tmp_path_factory.mktemp("svcbench")


@pytest.fixture(scope="module")
def daemon(sockdir):
    path = str(sockdir / "daemon.sock")
    conf = sockdir / "bench.toml"
    conf.write_text('dynamic_size = "256MiB"\narena_step = "4MiB"\n[service]\nlog_level = "WARNING"\n')
    proc = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "serve", "--config", str(conf),
                             "--socket", path], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.05)
    yield path
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def echo(sockdir):
    path = str(sockdir / "echo.sock")
    proc = subprocess.Popen([sys.executable, "-c", ECHO, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    yield sock
    sock.close()
    proc.wait(timeout=30)


def _bare(sock: socket.socket) -> None:
    sock.sendall(BARE_MESSAGE)
    got = 0
    while got < len(BARE_MESSAGE):
        got += len(sock.recv(65536))


def _median_us(fn, n: int) -> float:
    times = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) / 1000.0


def _batched_ops_per_s(ctx, alloc_name: str, reps: int) -> float:
    """Operations (each alloc and each free counts one) per second, in batches of BATCH."""
    t0 = time.perf_counter()
    for _ in range(reps):
        b = ctx.batch()
        alloc = getattr(b, alloc_name)
        for _ in range(BATCH):
            alloc(4096)
        shms = b.run()
        b = ctx.batch()
        for shm in shms:
            b.close(shm)
        b.run()
    return 2 * BATCH * reps / (time.perf_counter() - t0)


# -- pytest-benchmark figures, one operation per call ---------------------------------------------
def test_bare_socket_round_trip(benchmark, echo):
    benchmark.extra_info["what"] = f"{len(BARE_MESSAGE)}-byte echo between two Python processes"
    benchmark(_bare, echo)


@pytest.mark.parametrize("spin_us", [0, 200])
def test_service_ping(benchmark, daemon, spin_us):
    with connect(daemon, spin_us=spin_us) as client:
        benchmark.extra_info["what"] = f"PING round trip through the daemon, client spin {spin_us} us"
        benchmark(client.ping)


@pytest.mark.parametrize("kind", ["alloc_user_buf", "alloc_priv_buf"])
def test_service_alloc_free(benchmark, daemon, kind):
    with connect(daemon) as client:
        ctx = client.open_context("bench")
        alloc = getattr(ctx, kind)
        alloc(4096).close()
        benchmark.extra_info["what"] = f"{kind}(4096) + close() through the daemon (one round trip)"
        benchmark(lambda: alloc(4096).close())


@pytest.mark.parametrize("kind", ["alloc_user_buf", "alloc_priv_buf"])
def test_service_batched(benchmark, daemon, kind):
    with connect(daemon) as client:
        ctx = client.open_context("bench")

        def pair_batches():
            b = ctx.batch()
            alloc = getattr(b, kind)
            for _ in range(BATCH):
                alloc(4096)
            shms = b.run()
            b = ctx.batch()
            for shm in shms:
                b.close(shm)
            b.run()

        benchmark.extra_info["what"] = f"{BATCH} x {kind}(4096) then {BATCH} closes, two BATCH requests"
        benchmark.extra_info["ops_per_call"] = 2 * BATCH
        benchmark(pair_batches)


# -- the section 7 targets, as medians of ratios taken round by round in one run -------------------------
def test_service_ratios(benchmark, daemon, echo, smoke):
    rounds, n, reps = (1, 20, 1) if smoke else (15, 300, 4)
    rows: dict[str, list[float]] = {k: [] for k in (
        "bare_us", "ping_us", "user_us", "priv_us", "user_spin_us", "priv_spin_us",
        "ratio_user", "ratio_priv", "ratio_user_spin", "ratio_priv_spin", "ratio_ping",
        "single_user_ops", "batched_user_ops", "batch_gain_user",
        "single_priv_ops", "batched_priv_ops", "batch_gain_priv")}
    spin = connect(daemon, name="ratios-spin", spin_us=200)
    still = connect(daemon, name="ratios")
    try:
        ctx, ctx0 = still.open_context("ratios"), spin.open_context("ratios-spin")
        for c in (ctx, ctx0):
            for _ in range(50):
                c.alloc_user_buf(4096).close()
                c.alloc_priv_buf(4096).close()

        def one_round():
            bare = _median_us(lambda: _bare(echo), n)
            ping = _median_us(still.ping, n)
            user = _median_us(lambda: ctx.alloc_user_buf(4096).close(), n)
            priv = _median_us(lambda: ctx.alloc_priv_buf(4096).close(), n)
            user0 = _median_us(lambda: ctx0.alloc_user_buf(4096).close(), n)
            priv0 = _median_us(lambda: ctx0.alloc_priv_buf(4096).close(), n)
            # single: one op per round trip (the pipelined free rides along and is counted too)
            single_user, single_priv = 2e6 / user, 2e6 / priv
            batched_user = _batched_ops_per_s(ctx, "alloc_user_buf", reps)
            batched_priv = _batched_ops_per_s(ctx, "alloc_priv_buf", reps)
            for key, value in (("bare_us", bare), ("ping_us", ping), ("user_us", user),
                               ("priv_us", priv), ("user_spin_us", user0), ("priv_spin_us", priv0),
                               ("ratio_user", user / bare), ("ratio_priv", priv / bare),
                               ("ratio_user_spin", user0 / bare), ("ratio_priv_spin", priv0 / bare),
                               ("ratio_ping", ping / bare),
                               ("single_user_ops", single_user), ("batched_user_ops", batched_user),
                               ("batch_gain_user", batched_user / single_user),
                               ("single_priv_ops", single_priv), ("batched_priv_ops", batched_priv),
                               ("batch_gain_priv", batched_priv / single_priv)):
                rows[key].append(value)

        benchmark.pedantic(lambda: [one_round() for _ in range(rounds)], rounds=1, iterations=1)
    finally:
        spin.close()
        still.close()
    medians = {k: round(statistics.median(v), 3) for k, v in rows.items()}
    benchmark.extra_info.update(medians)
    benchmark.extra_info["rounds"] = rounds
    print("\nservice targets (medians over rounds):")
    for key, value in medians.items():
        print(f"  {key:20} {value:>12}")
