"""The scaling study: request/reply pairs per second, their latency and their cost against
the number of client processes, on both transports (and shm without turns), beside two
floors measured in the same cells, and the start-up and memory cost of the clients.

Usage (from the repository root)::

    python bench/scale.py                                  # 1, 8, 64, 256, 1024 clients
    python bench/scale.py --counts 8,64,256 --rounds 3 --json scale.json
    python bench/scale.py --tree /path/to/other/checkout   # measure another checkout's code

``bench/results.py --family scale`` runs it and renders ``bench/results/scale.md`` and its plot.

A cell is one transport (``TRANSPORTS``: socket, shm, and shm-freeforall, shm with
``max_polled_slots = 0`` so that the turns the daemon gives slots are off) and one
client count N: a fresh ``poolsvc serve`` daemon of the measured tree, a fresh
plain-Python echo server (:func:`_echo_server`: one process, one epoll loop, no
poolsvc), and N forked client processes.  The processes are forked first
and wait; then all connect at once (one connection to the daemon with a Context and one
4 KiB alloc + close, and one to the echo server), which the cell times as its start-up.
Then the workloads run one after the other (``WORKLOADS``; their order alternates round
by round), each in a common window of ``--seconds``: every process loops one pair and
times it, in the same loop shape:

- ``alloc``: ``ctx.alloc_user_buf(4096).close()`` (the close rides with the next request);
- ``ping``: ``client.ping()``, the empty request through the daemon: the service's floor,
  what a request costs the transport, the loop and the wake-ups without any work;
- ``raw``: a 16-byte send and its echo over a Unix socket with the echo server: the
  machine's floor for a Python request/reply between processes that sleep and wake;
- ``light``: ``alloc`` in every process but the first, the *light client*, which makes
  one alloc + close (flushed: two requests) every ``LIGHT_PERIOD`` and sleeps between:
  what a client that needs the service now and then waits among busy ones
  (``docs/protocol.md``, "Turns").  Its figures are the busy processes' (none with one
  process), and the light client's pairs, p50, p99 and maximum as ``light_*``.

Figures per workload: pairs of all processes per second (pairs started in the window),
the p50, p99, p99.9 and maximum of one pair over all processes, the server's (daemon's or echo
server's) CPU time and context switches per pair, the clients' CPU time, voluntary
context switches (sleeps) and involuntary ones (preemptions) per pair (``getrusage``),
and the throughput as a fraction of the same workload's 8-process figure of the same
transport and round, the ratio the scaling goals are stated in (issue "Hundreds of
clients without collapse").  Each floor's ratio beside alloc + close's says whether the
service loses more than the machine does as processes are added.  Figures per cell: the
start-up time, the daemon's ``VmRSS`` growth per connected client (each idle after one
alloc + close), its descriptors and descriptor limit, and the machine's memory per
client process (``MemAvailable`` before the fork and once all are connected).  With
``--rounds`` > 1 every cell runs once per round (each count every transport,
alternated) and each figure is the median over rounds.

Time bounds: connecting is bounded by ``--start-timeout``, each workload by its window
plus ``PHASE_GRACE``; a cell that overruns is ended (its processes killed) and reported
with errors.  ``--time-limit`` bounds the study: cells that would start after it are
skipped and listed.  Progress goes to stderr.

The output is a JSON document (``format: poolsvc-bench-scale/2``) on stdout or in
``--json``.  Single figures on a shared machine deserve scepticism: read the ratios taken
in one run, and the load average recorded beside them.

Concurrency: forks the echo server and the client processes (before any thread exists in
this process); every daemon, server and client it starts is ended before it returns.
"""
from __future__ import annotations

import argparse
import array
import json
import mmap
import os
import resource
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
FORMAT = "poolsvc-bench-scale/2"
REFERENCE_CLIENTS = 8
PAIR_SIZE = 4096
#: The workloads of a cell, in the order of even rounds, and what one pair of each is.
WORKLOADS = ("alloc", "ping", "raw", "light")
#: The light client's pace in the ``light`` workload: one pair per this many seconds.
LIGHT_PERIOD = 0.02
PAIRS = {"alloc": f"alloc_user_buf({PAIR_SIZE}) + close", "ping": "PING (empty request) through the daemon",
         "raw": "16-byte send + echo over a Unix socket with a plain Python echo server",
         "light": f"alloc + close as in `alloc` by every process but the first, the light client, which makes "
                  f"one alloc + close (flushed) every {LIGHT_PERIOD * 1e3:g} ms"}
RAW_MESSAGE = b"0123456789abcdef"
#: The transports a study may run: the client's transport and the daemon's extra
#: ``[service]`` settings.  ``shm-freeforall`` is shm with every slot polled
#: (``max_polled_slots = 0``): the kernel's scheduler alone picks who runs (no turns).
TRANSPORTS = {"socket": ("socket", []), "shm": ("shm", []),
              "shm-freeforall": ("shm", ["max_polled_slots = 0"])}
#: Seconds a workload may run past its window before its cell is ended.
PHASE_GRACE = 60.0
#: Seconds allowed by default for a daemon to come up and for every client to connect.
START_TIMEOUT = 300.0
#: ``connect(shm_spin_us=...)`` of the clients (None: the library's default); ``--client-spin-us``.
CLIENT_SPIN_US: float | None = None
#: Niceness the daemon runs at (``--daemon-nice``; None: this process's).
DAEMON_NICE: int | None = None
#: Extra ``[service]`` settings of the daemon (``--service KEY=VALUE``, TOML values).
SERVICE_SETTINGS: list[str] = []
_CLOCK = time.perf_counter  # CLOCK_MONOTONIC: one clock for every process of the machine


def _loadavg() -> list[float]:
    with open("/proc/loadavg") as fh:
        return [float(x) for x in fh.read().split()[:3]]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(pid: int | str, *keys: str) -> list[int]:
    """The first number of each ``key:`` line of ``/proc/<pid>/status`` (or ``/proc/meminfo``
    for ``pid == "meminfo"``)."""
    path = "/proc/meminfo" if pid == "meminfo" else f"/proc/{pid}/status"
    found: dict[str, int] = {}
    with open(path) as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in keys:
                found[key] = int(rest.split()[0])
    return [found[k] for k in keys]


def _switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of process ``pid`` so far."""
    return sum(_status(pid, "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))


def _descriptors(pid: int) -> tuple[int | None, int | None]:
    """Open descriptors of ``pid`` and its soft descriptor limit (None: not readable)."""
    try:
        count: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # the daemon is not dumpable: readable only with CAP_SYS_PTRACE
        count = None
    limit = None
    try:
        with open(f"/proc/{pid}/limits") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    limit = int(line.split()[3])
    except (OSError, ValueError):
        pass
    return count, limit


def _quantile(sorted_values: array.array, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _kill(pids: list[int]) -> None:
    """SIGKILL and reap ``pids`` (children of this process)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


class Daemon:
    """``poolsvc serve`` of ``tree`` on a socket in ``workdir``, sized for ``clients``."""

    def __init__(self, tree: Path, workdir: str, clients: int, timeout: float,
                 settings: list[str] | None = None) -> None:
        self.path = os.path.join(workdir, f"scale-{os.getpid()}.sock")
        config = os.path.join(workdir, "scale.toml")
        room = max(256, clients + 16)  # every client process: one context, and a monitor while it connects
        with open(config, "w") as fh:
            fh.write("\n".join(["[service]", f"max_clients = {room}", f"max_monitors = {room}",
                                *SERVICE_SETTINGS, *(settings or [])]) + "\n")
        env = dict(os.environ, PYTHONPATH=str(tree))
        nice = DAEMON_NICE
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc", "serve", "--socket", self.path,
                                      "--config", config, "--log-level", "warning"], cwd=str(tree), env=env,
                                     preexec_fn=None if nice is None else lambda: os.setpriority(
                                         os.PRIO_PROCESS, 0, nice))
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not start (status {self.proc.returncode})")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _echo_server(path: str, ready_w: int) -> None:
    """The raw floor's server (a forked process): accept on ``path``, echo what each
    connection sends, one level-triggered epoll loop; runs until killed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4096)
    listener.setblocking(False)
    ep = select.epoll()
    lfd = listener.fileno()
    ep.register(lfd, select.EPOLLIN)
    os.write(ready_w, b"e")
    os.close(ready_w)
    conns: dict[int, socket.socket] = {}
    while True:
        for fd, _ in ep.poll():
            if fd == lfd:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    conns[sock.fileno()] = sock
                    ep.register(sock.fileno(), select.EPOLLIN)
                continue
            sock = conns[fd]
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            if data:
                sock.send(data)
            else:
                ep.unregister(fd)
                del conns[fd]
                sock.close()


def _start_echo_server(workdir: str) -> tuple[int, str]:
    """Fork the echo server; its pid and socket path once it listens."""
    path = os.path.join(workdir, "echo.sock")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(ready_r)
            _echo_server(path, ready_w)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(ready_w)
    got = os.read(ready_r, 1)
    os.close(ready_r)
    if got != b"e":
        _kill([pid])
        raise RuntimeError("the echo server did not start")
    return pid, path


class Gates:
    """The pipes and the shared clock of one cell's processes: a connect gate, one gate
    per workload (each opens, for every process at once, when its write end closes),
    one pipe the processes report on (a byte when connected, one after each workload),
    and a shared page where the parent writes each workload's window before opening
    its gate."""

    def __init__(self, phases: int) -> None:
        self.connect = os.pipe()
        self.phases = [os.pipe() for _ in range(phases)]
        self.report = os.pipe()
        self.windows = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and shared: inherited by fork

    def in_child(self) -> None:
        for _, w in [self.connect, *self.phases]:
            os.close(w)
        os.close(self.report[0])

    def in_parent(self) -> None:
        for r, _ in [self.connect, *self.phases]:
            os.close(r)
        os.close(self.report[1])

    def open(self, gate: tuple[int, int]) -> None:
        os.close(gate[1])

    def set_window(self, k: int, start: float, end: float) -> None:
        struct.pack_into("dd", self.windows, 16 * k, start, end)

    def window_end(self, k: int) -> float:
        return float(struct.unpack_from("dd", self.windows, 16 * k)[1])

    def collect(self, want: int, deadline: float) -> int:
        """Read report bytes until ``want`` arrived, every process closed its end, or
        ``deadline`` (monotonic) passed; the number read."""
        got = 0
        fd = self.report[0]
        while got < want:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            got += len(data)
        return got

    def close(self) -> None:
        for fd in (self.report[0], *(w for _, w in [self.connect, *self.phases])):
            try:
                os.close(fd)
            except OSError:
                pass
        self.windows.close()


def _pair_loop(op: Callable[[], Any], end: float, latencies: array.array) -> None:
    """Run ``op`` until ``end`` (perf_counter), recording each call's seconds."""
    clock = _CLOCK
    record = latencies.append
    now = clock()
    while now < end:
        start = now
        op()
        now = clock()
        record(now - start)


def _paced_loop(op: Callable[[], Any], end: float, latencies: array.array, period: float) -> None:
    """Run ``op`` once per ``period`` until ``end`` (perf_counter), sleeping between calls
    (a call that overruns its period starts the next at once), recording each call's seconds."""
    clock = _CLOCK
    due = clock()
    while due < end:
        start = clock()
        op()
        latencies.append(clock() - start)
        due = max(due + period, clock())
        if due < end:
            time.sleep(max(0.0, due - clock()))


def _client(index: int, daemon_path: str, echo_path: str, transport: str, workloads: list[str],
            gates: Gates, out_path: str) -> None:
    """A forked client process: wait at the connect gate, connect (daemon and echo
    server), report; then for each workload wait at its gate, loop its pair until its
    window ends, report.  Writes per workload its pair count, CPU time and context
    switches, then every pair's seconds (or the error that stopped it) to ``out_path``."""
    import poolsvc

    gates.in_child()
    os.read(gates.connect[0], 1)  # returns at EOF: the gate is open
    error: str | None = None
    ops: dict[str, Callable[[], Any]] = {}
    try:
        spin = {} if CLIENT_SPIN_US is None else {"shm_spin_us": CLIENT_SPIN_US}
        client = poolsvc.connect(daemon_path, name=f"scale-{index}", transport=transport,
                                 connect_timeout=START_TIMEOUT, timeout=START_TIMEOUT, **spin)
        ctx = client.open_context()
        ctx.alloc_user_buf(PAIR_SIZE).close()
        ctx.flush()
        echo = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        echo.settimeout(START_TIMEOUT)
        echo.connect(echo_path)
        alloc = ctx.alloc_user_buf
        send, recv = echo.send, echo.recv

        def raw() -> None:
            send(RAW_MESSAGE)
            if len(recv(64)) != len(RAW_MESSAGE):  # 16 bytes on a stream socket: always whole
                raise RuntimeError("short echo")

        def light() -> None:
            alloc(PAIR_SIZE).close()
            ctx.flush()

        ops = {"alloc": lambda: alloc(PAIR_SIZE).close(), "ping": client.ping, "raw": raw}
        ops["light"] = light if index == 0 else ops["alloc"]
    except BaseException as exc:  # reported, not raised: the parent counts failures
        error = f"connect: {type(exc).__name__}: {exc}"
    report_w = gates.report[1]
    os.write(report_w, b"r")
    results = []
    latencies = array.array("d")
    for k, workload in enumerate(workloads):
        os.read(gates.phases[k][0], 1)
        mine = array.array("d")
        result: dict[str, Any] = {"pairs": 0}
        if error is None:
            try:
                usage0 = resource.getrusage(resource.RUSAGE_SELF)
                if workload == "light" and index == 0:
                    _paced_loop(ops[workload], gates.window_end(k), mine, LIGHT_PERIOD)
                else:
                    _pair_loop(ops[workload], gates.window_end(k), mine)
                if workload in ("alloc", "light"):
                    ctx.flush()
                usage1 = resource.getrusage(resource.RUSAGE_SELF)
                result.update(cpu_s=usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime,
                              sleeps=usage1.ru_nvcsw - usage0.ru_nvcsw,
                              preempted=usage1.ru_nivcsw - usage0.ru_nivcsw,
                              faults=usage1.ru_minflt - usage0.ru_minflt)
            except BaseException as exc:
                error = f"{workload}: {type(exc).__name__}: {exc}"
        result["pairs"] = len(mine)
        result["error"] = error
        results.append(result)
        latencies.extend(mine)
        os.write(report_w, b"d")
    with open(out_path, "wb") as fh:
        head = json.dumps(results).encode()
        fh.write(len(head).to_bytes(4, "little") + head + latencies.tobytes())


def _read_results(path: str, phases: int) -> tuple[list[dict[str, Any]], list[array.array]]:
    """A client's results per workload and each workload's pair seconds."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        os.unlink(path)
    except OSError:
        return [{"pairs": 0, "error": "no result"}] * phases, [array.array("d")] * phases
    n = int.from_bytes(data[:4], "little")
    results = json.loads(data[4:4 + n])
    every = array.array("d")
    every.frombytes(data[4 + n:])
    out, pos = [], 0
    for r in results:
        out.append(every[pos:pos + r["pairs"]])
        pos += r["pairs"]
    return results, out


def _workload_figures(workload: str, results: list[dict[str, Any]], latencies: list[array.array],
                      seconds: float, server_cpu: float, server_switches: int) -> dict[str, Any]:
    """One workload's figures from every client's results (module doc)."""
    pairs = sum(r["pairs"] for r in results)
    errors = [r["error"] for r in results if r.get("error")]
    cpu = sum(r.get("cpu_s", 0.0) for r in results)
    sleeps = sum(r.get("sleeps", 0) for r in results)
    preempted = sum(r.get("preempted", 0) for r in results)
    faults = sum(r.get("faults", 0) for r in results)
    ordered = array.array("d", sorted(x for lat in latencies for x in lat))
    per = 1 / pairs if pairs else 0.0
    return {"workload": workload, "pairs": pairs, "pairs_per_s": round(pairs / seconds),
            "p50_us": round(_quantile(ordered, 0.5) * 1e6, 1) if ordered else None,
            "p99_us": round(_quantile(ordered, 0.99) * 1e6, 1) if ordered else None,
            "p999_us": round(_quantile(ordered, 0.999) * 1e6, 1) if ordered else None,
            "max_us": round(ordered[-1] * 1e6, 1) if ordered else None,
            "server_cpu_s": round(server_cpu, 2),
            "server_us_per_pair": round(server_cpu * per * 1e6, 1) if pairs else None,
            "server_switches_per_pair": round(server_switches * per, 3) if pairs else None,
            "client_cpu_s": round(cpu, 2), "client_us_per_pair": round(cpu * per * 1e6, 1) if pairs else None,
            "client_sleeps_per_pair": round(sleeps * per, 3) if pairs else None,
            "client_preemptions_per_pair": round(preempted * per, 3) if pairs else None,
            "client_faults_per_pair": round(faults * per, 3) if pairs else None,
            "errors": len(errors), "first_errors": sorted(set(errors))[:3]}


def _light_figures(result: dict[str, Any], latencies: array.array) -> dict[str, Any]:
    """The light client's figures in the ``light`` workload (module doc)."""
    ordered = array.array("d", sorted(latencies))
    return {"light_pairs": result["pairs"], "light_error": result.get("error"),
            "light_p50_us": round(_quantile(ordered, 0.5) * 1e6, 1) if ordered else None,
            "light_p99_us": round(_quantile(ordered, 0.99) * 1e6, 1) if ordered else None,
            "light_max_us": round(ordered[-1] * 1e6, 1) if ordered else None}


def cell(tree: Path, transport: str, count: int, workloads: list[str], seconds: float,
         start_timeout: float) -> dict[str, Any]:
    """One cell: ``count`` processes, a fresh daemon and echo server, every workload (module doc)."""
    out: dict[str, Any] = {"transport": transport, "clients": count, "workloads": {}, "errors": []}
    with tempfile.TemporaryDirectory(prefix="poolsvc-scale-") as workdir:
        wire, settings = TRANSPORTS[transport]
        daemon = Daemon(tree, workdir, count, start_timeout, settings)
        echo_pid, echo_path = _start_echo_server(workdir)
        gates = Gates(len(workloads))
        outs = [os.path.join(workdir, f"client-{i}.bin") for i in range(count)]
        pids: list[int] = []
        try:
            time.sleep(0.2)  # the daemon's start-up is done before its baseline
            rss0 = _status(daemon.proc.pid, "VmRSS")[0]
            avail0 = _status("meminfo", "MemAvailable")[0]
            t0 = _CLOCK()
            for i in range(count):
                pid = os.fork()
                if pid == 0:  # the child
                    code = 0
                    try:
                        _client(i, daemon.path, echo_path, wire, workloads, gates, outs[i])
                    except BaseException:
                        code = 1
                    os._exit(code)
                pids.append(pid)
            gates.in_parent()
            out["fork_s"] = round(_CLOCK() - t0, 2)
            t0 = _CLOCK()
            gates.open(gates.connect)
            ready = gates.collect(count, time.monotonic() + start_timeout)
            out["start_s"] = round(_CLOCK() - t0, 2)
            out["ready"] = ready
            rss1 = _status(daemon.proc.pid, "VmRSS")[0]
            avail1 = _status("meminfo", "MemAvailable")[0]
            fds, fd_limit = _descriptors(daemon.proc.pid)
            out.update(daemon_rss_before_kib=rss0, daemon_rss_after_kib=rss1,
                       daemon_kib_per_client=round((rss1 - rss0) / count, 1),
                       machine_kib_per_client=round((avail0 - avail1) / count, 1),
                       daemon_fds=fds, daemon_fd_limit=fd_limit)
            if ready < count:
                raise TimeoutError(f"{ready} of {count} clients connected within {start_timeout:g} s")
            for k, workload in enumerate(workloads):
                server = echo_pid if workload == "raw" else daemon.proc.pid
                cpu0, switches0 = _cpu_seconds(server), _switches(server)
                start = _CLOCK()
                gates.set_window(k, start, start + seconds)
                gates.open(gates.phases[k])
                done = gates.collect(count, time.monotonic() + seconds + PHASE_GRACE)
                out["workloads"][workload] = {"server_cpu": _cpu_seconds(server) - cpu0,
                                              "server_switches": _switches(server) - switches0,
                                              "wall_s": round(_CLOCK() - start, 2)}
                if done < count:
                    raise TimeoutError(f"{workload}: {done} of {count} clients finished within "
                                       f"{seconds + PHASE_GRACE:g} s")
            for pid in pids:
                os.waitpid(pid, 0)
            pids.clear()
        except (TimeoutError, RuntimeError, OSError) as exc:
            out["errors"].append(f"{type(exc).__name__}: {exc}")
        finally:
            _kill(pids)
            _kill([echo_pid])
            gates.close()
            daemon.stop()
        per_client = [_read_results(path, len(workloads)) for path in outs]
    for k, workload in enumerate(workloads):
        measured = out["workloads"].get(workload)
        if measured is None:
            continue
        results, latencies = [r[0][k] for r in per_client], [r[1][k] for r in per_client]
        light = workload == "light"  # the first process is the light client, the others busy
        figures = _workload_figures(workload, results[light:], latencies[light:], seconds,
                                    measured["server_cpu"], measured["server_switches"])
        if light:
            figures.update(_light_figures(results[0], latencies[0]))
        figures["wall_s"] = measured["wall_s"]
        out["workloads"][workload] = figures
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


#: Per-workload figures summarised as medians over rounds.
MEDIANS = ("pairs_per_s", "of_reference", "p50_us", "p99_us", "p999_us", "max_us", "server_us_per_pair",
           "server_switches_per_pair",
           "client_us_per_pair", "client_sleeps_per_pair", "client_preemptions_per_pair", "client_faults_per_pair",
           "light_pairs", "light_p50_us", "light_p99_us", "light_max_us")
#: Per-cell figures summarised as medians over rounds.
CELL_MEDIANS = ("fork_s", "start_s", "daemon_kib_per_client", "machine_kib_per_client", "daemon_fds")


def study(tree: Path, counts: list[int], transports: list[str], workloads: list[str], seconds: float,
          rounds: int, start_timeout: float, time_limit: float) -> dict[str, Any]:
    """Every cell, round by round; the JSON document (module doc)."""
    started = time.time()
    load_start = _loadavg()
    cells: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for r in range(rounds):
        order = workloads if r % 2 == 0 else workloads[::-1]
        for count in counts:
            for transport in (transports if r % 2 == 0 else transports[::-1]):
                if time.time() - started > time_limit:
                    skipped.append({"round": r, "transport": transport, "clients": count})
                    continue
                _progress(f"round {r} {transport:14} {count:5} clients: starting")
                got = cell(tree, transport, count, order, seconds, start_timeout)
                got["round"] = r
                cells.append(got)
                line = [f"round {r} {transport:14} {count:5} clients: start {got.get('start_s', '-')} s"]
                for workload in workloads:
                    w = got["workloads"].get(workload)
                    if w is not None:
                        p99 = "-" if w["p99_us"] is None else f"{w['p99_us']:,.0f}"
                        line.append(f"{workload} {w['pairs_per_s']:,}/s p99 {p99} us")
                        if w.get("light_p99_us") is not None:
                            line.append(f"light client p99 {w['light_p99_us']:,.0f} us")
                errors = got["errors"] + [e for w in got["workloads"].values() for e in w.get("first_errors", [])]
                _progress("; ".join(line) + (f"; ERRORS {errors[:2]}" if errors else ""))
    if skipped:
        _progress(f"time limit of {time_limit:g} s reached: {len(skipped)} cells skipped")
    for c in cells:  # each workload against its reference count of the same round and transport
        ref = next((x for x in cells if x["round"] == c["round"] and x["transport"] == c["transport"]
                    and x["clients"] == REFERENCE_CLIENTS), None)
        for workload, w in c["workloads"].items():
            base = ref["workloads"].get(workload) if ref else None
            w["of_reference"] = (round(w["pairs_per_s"] / base["pairs_per_s"], 3)
                                 if base and base["pairs_per_s"] else None)
    rows, cell_rows = [], []
    for transport in transports:
        for count in counts:
            mine = [c for c in cells if c["transport"] == transport and c["clients"] == count]
            if not mine:
                continue
            cell_rows.append({"transport": transport, "clients": count, "runs": len(mine),
                              **{k: _median([c.get(k) for c in mine]) for k in CELL_MEDIANS},
                              "daemon_fd_limit": mine[0].get("daemon_fd_limit"),
                              "errors": sum(len(c["errors"]) for c in mine)})
            for workload in workloads:
                got = [c["workloads"][workload] for c in mine if workload in c["workloads"]]
                rows.append({"transport": transport, "clients": count, "workload": workload, "runs": len(got),
                             **{k: _median([g.get(k) for g in got]) for k in MEDIANS},
                             "errors": sum(g["errors"] for g in got) + sum(len(c["errors"]) for c in mine)})
    return {"format": FORMAT, "tree": str(tree), "counts": counts, "transports": transports,
            "workloads": workloads, "pairs": {w: PAIRS[w] for w in workloads}, "seconds": seconds,
            "light_period_ms": LIGHT_PERIOD * 1e3,
            "rounds": rounds, "reference_clients": REFERENCE_CLIENTS, "cpus": os.cpu_count(),
            "loadavg_start": load_start, "loadavg_end": _loadavg(), "run_s": round(time.time() - started, 1),
            "time_limit_s": time_limit, "skipped": skipped, "rows": rows, "cell_rows": cell_rows,
            "cells": cells}


def parse_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise SystemExit(f"--counts: {text!r} is not a list of distinct positive client counts")
    return counts


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    if not chosen or set(chosen) - set(allowed) or len(set(chosen)) != len(chosen):
        raise SystemExit(f"--{what}: {text!r}: expected some of {', '.join(allowed)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=parse_counts, default=[1, 8, 64, 256, 1024],
                        help="client process counts (default 1,8,64,256,1024)")
    parser.add_argument("--transports", default="socket,shm",
                        help="comma-separated transports (default socket,shm; shm-freeforall: shm "
                             "with max_polled_slots = 0, every slot polled, no turns)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads (default {','.join(WORKLOADS)})")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per workload (default 5)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every cell (default 1)")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds for a cell's clients to connect (default 300)")
    parser.add_argument("--time-limit", type=float, default=3600.0,
                        help="seconds after which no new cell starts (default 3600)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="checkout whose poolsvc is measured (default this one)")
    parser.add_argument("--client-spin-us", type=float,
                        help="the clients' connect(shm_spin_us=...) (default: the library's)")
    parser.add_argument("--service", action="append", default=[], metavar="KEY=VALUE",
                        help="a [service] setting of the daemons (TOML value; repeatable)")
    parser.add_argument("--daemon-nice", type=int,
                        help="run the daemon at this niceness (default: this process's)")
    parser.add_argument("--json", type=Path, help="write the document here (default stdout)")
    args = parser.parse_args(argv)
    transports = _choices(args.transports, tuple(TRANSPORTS), "transports")
    workloads = _choices(args.workloads, WORKLOADS, "workloads")
    global CLIENT_SPIN_US, START_TIMEOUT, DAEMON_NICE
    CLIENT_SPIN_US = args.client_spin_us
    DAEMON_NICE = args.daemon_nice
    SERVICE_SETTINGS[:] = [" = ".join(part.strip() for part in kv.split("=", 1)) for kv in args.service]
    START_TIMEOUT = args.start_timeout
    tree = args.tree.resolve()
    sys.path.insert(0, str(tree))  # the forked clients import the measured tree's poolsvc
    import poolsvc
    import poolsvc.client  # noqa: F401  # imported once here, not in each forked process

    if not Path(poolsvc.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"poolsvc imports from {poolsvc.__file__}, not from {tree}")
    doc = study(tree, args.counts, transports, workloads, args.seconds, args.rounds, args.start_timeout,
                args.time_limit)
    text = json.dumps(doc, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
