"""Pool service benchmarks: the daemon's round trips against a bare Unix-socket round trip.

Everything talks to real processes: a ``poolsvc serve`` daemon, and a bare
echo server (two Python processes, one blocking ``recv``/``sendall`` loop),
so that the daemon's cost is read against the floor of the same machine in
the same run (docs/design.md section 7: alloc+free within 1.5x of a bare round
trip; batched requests >= 10x the operations per second of single ones).
Both transports are measured: ``socket`` (every frame on the Unix socket)
and ``shm`` (ordinary requests through the connection's shared-memory slot,
see docs/protocol.md), beside the embedded System doing the same work.

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

import poolsvc
from poolsvc.service import protocol as P

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


class _EchoSocket(socket.socket):
    """The client end of the echo connection, knowing the echo server's pid."""

    echo_pid = 0


@pytest.fixture(scope="module")
def echo(sockdir):
    path = str(sockdir / "echo.sock")
    proc = subprocess.Popen([sys.executable, "-c", ECHO, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    sock = _EchoSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.echo_pid = proc.pid
    yield sock
    sock.close()
    proc.wait(timeout=30)


def _bare_placed(sock: "_EchoSocket", apart: bool, n: int) -> float | None:
    """The bare round trip with the echo server and this process pinned to one CPU
    (``apart=False``) or to two (``apart=True``); None on a one-CPU machine.

    A blocking ping-pong is bimodal on a VM: on one CPU each side hands over with a
    "sync" wake-up and no idle CPU is woken; on two, every message wakes an idle
    vCPU, which costs several times more.  The affinities are restored
    afterwards.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    pid = sock.echo_pid
    mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(pid)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        os.sched_setaffinity(pid, {cpus[1] if apart else cpus[0]})
        for _ in range(50):
            _bare(sock)
        return _median_us(lambda: _bare(sock), n)
    finally:
        os.sched_setaffinity(pid, theirs)
        os.sched_setaffinity(0, mine)


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


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_service_ping(benchmark, daemon, transport):
    with poolsvc.connect(daemon, transport=transport) as client:
        benchmark.extra_info["what"] = f"PING round trip through the daemon, {transport} transport"
        benchmark(client.ping)


@pytest.mark.parametrize("transport", ["socket", "shm"])
@pytest.mark.parametrize("kind", ["alloc_user_buf", "alloc_priv_buf"])
def test_service_alloc_free(benchmark, daemon, kind, transport):
    with poolsvc.connect(daemon, transport=transport) as client:
        ctx = client.open_context("bench")
        alloc = getattr(ctx, kind)
        alloc(4096).close()
        benchmark.extra_info["what"] = (f"{kind}(4096) + close() through the daemon (one round trip), "
                                        f"{transport} transport")
        benchmark(lambda: alloc(4096).close())


@pytest.mark.parametrize("transport", ["socket", "shm"])
@pytest.mark.parametrize("kind", ["alloc_user_buf", "alloc_priv_buf"])
def test_service_batched(benchmark, daemon, kind, transport):
    with poolsvc.connect(daemon, transport=transport) as client:
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
#: (row key, target, "<=" or ">=") of each section 7 service figure, per transport and kind.
TARGETS = {"ratio": (1.5, "<="), "batch_gain": (10.0, ">=")}


def _single_sync(ctx, alloc_name: str, n: int) -> float:
    """Operations per second when every operation is its own request, waited for:
    alloc (one round trip), then close and flush (a second round trip)."""
    alloc = getattr(ctx, alloc_name)
    t0 = time.perf_counter()
    for _ in range(n):
        alloc(4096).close()
        ctx.flush()
    return 2 * n / (time.perf_counter() - t0)


def verdicts(medians: dict[str, float]) -> list[tuple[str, float, str, bool]]:
    """``(row, median, target, met)`` for every target row present in ``medians``."""
    out = []
    for key, value in medians.items():
        for name, (target, op) in TARGETS.items():
            if f"_{name}_" in key and not key.endswith("_ping"):
                met = value <= target if op == "<=" else value >= target
                out.append((key, value, f"{op} {target:g}", met))
    return out


def test_service_ratios(benchmark, daemon, echo, smoke):
    """Every section 7 service figure, interleaved round by round against the bare round trip.

    Rows (medians over rounds of per-round values):
      ``bare_us``: the bare Unix-socket round trip between two Python processes,
      placed by the scheduler (the figure the targets are judged against);
      ``bare_together_us`` / ``bare_apart_us``: the same pinned to one CPU / two
      (see ``_bare_placed``), and ``{t}_pair_vs_apart_{kind}`` the pair over the
      latter (the placement in which each message wakes the other vCPU);
      ``{t}_{kind}_us``: alloc_{kind}_buf(4096) + close() through the daemon with
      transport ``t`` (``emb``: the embedded System, no daemon); the close is
      pipelined, as ``Shm.close`` does, so the pair costs one round trip;
      ``{t}_ratio_{kind}``: that pair over the bare round trip (target <= 1.5);
      ``{t}_single_{kind}_ops``: operations per second when each alloc and each
      close is its own request, waited for (two round trips per pair);
      ``{t}_pipelined_{kind}_ops``: the same with the close pipelined;
      ``{t}_batched_{kind}_ops``: 256 allocs in one BATCH, then 256 closes in one;
      ``{t}_batch_gain_{kind}``: batched over single (target >= 10).
    """
    rounds, n, reps = (1, 20, 1) if smoke else (15, 300, 10)
    rows: dict[str, list[float]] = {}
    sock_client = poolsvc.connect(daemon, name="ratios", transport="socket")
    shm_client = poolsvc.connect(daemon, name="ratios-shm", transport="shm")
    embedded = poolsvc.System(poolsvc.Config(dynamic_size=256 << 20, arena_step=4 << 20))
    try:
        ctxs = {"sock": sock_client.open_context("ratios"), "shm": shm_client.open_context("ratios-shm"),
                "emb": embedded.open_context("ratios-embedded")}
        assert ctxs["shm"]._channel.transport == "shm"  # (pings go through the context's channel)
        pings = {"sock": sock_client.ping, "shm": shm_client.ping}
        for c in ctxs.values():
            for _ in range(50):
                c.alloc_user_buf(4096).close()
                c.alloc_priv_buf(4096).close()

        def add(key: str, value: float) -> None:
            rows.setdefault(key, []).append(value)

        def one_round():
            for apart in (False, True):
                placed = _bare_placed(echo, apart, n)
                if placed is not None:
                    add("bare_apart_us" if apart else "bare_together_us", placed)
            bare = _median_us(lambda: _bare(echo), n)
            add("bare_us", bare)
            for t in ("sock", "shm"):
                ping = _median_us(pings[t], n)
                add(f"{t}_ping_us", ping)
                add(f"{t}_ratio_ping", ping / bare)
            for kind in ("priv", "user"):
                for t in ("emb", "sock", "shm"):
                    alloc = getattr(ctxs[t], f"alloc_{kind}_buf")
                    pair = _median_us(lambda alloc=alloc: alloc(4096).close(), n)
                    add(f"{t}_{kind}_us", pair)
                    if t == "emb":
                        continue
                    add(f"{t}_ratio_{kind}", pair / bare)
                    if "bare_apart_us" in rows:
                        add(f"{t}_pair_vs_apart_{kind}", pair / rows["bare_apart_us"][-1])
                    single = _single_sync(ctxs[t], f"alloc_{kind}_buf", n)
                    batched = _batched_ops_per_s(ctxs[t], f"alloc_{kind}_buf", reps)
                    add(f"{t}_single_{kind}_ops", single)
                    add(f"{t}_pipelined_{kind}_ops", 2e6 / pair)
                    add(f"{t}_batched_{kind}_ops", batched)
                    add(f"{t}_batch_gain_{kind}", batched / single)

        benchmark.pedantic(lambda: [one_round() for _ in range(rounds)], rounds=1, iterations=1)
    finally:
        sock_client.close()
        shm_client.close()
        embedded.close()
    medians = {k: round(statistics.median(v), 3) for k, v in rows.items()}
    benchmark.extra_info.update(medians)
    benchmark.extra_info["rounds"] = rounds
    print("\nservice figures (medians over rounds; sock = socket transport, shm = shm slot, "
          "emb = embedded System):")
    for key, value in medians.items():
        print(f"  {key:26} {value:>12}")
    print("section 7 targets:")
    rows = verdicts(medians)
    for key, value, target, met in rows:
        benchmark.extra_info[f"met_{key}"] = met
        print(f"  {key:26} {value:>12}  target {target:6}  {'met' if met else 'NOT MET'}")
    # Per target: on which transports it holds for both kinds (bench/README.md explains why
    # one transport may not meet both when the co-located bare round trip is short).
    for name, (target, op) in TARGETS.items():
        where = [t for t in ("sock", "shm")
                 if all(met for key, _, _, met in rows if key.startswith(f"{t}_{name}_"))
                 and any(key.startswith(f"{t}_{name}_") for key, _, _, _ in rows)]
        label = {"sock": "socket", "shm": "shm"}
        print(f"  {name} {op} {target:g}: met for both kinds on "
              f"{', '.join(label[t] for t in where) or 'no transport'}")
        benchmark.extra_info[f"met_{name}_on"] = [label[t] for t in where]
