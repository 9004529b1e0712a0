"""Tests of the load run's fork server (poolsvc/load/forkserver.py) and of the daemon config
a load run writes (poolsvc/load/daemon.py).

The fork server forks real workers here, against an in-process daemon: a worker
announces itself, is SIGKILLed or told to stop, and its handle reports how it ended;
a forked worker holds none of its siblings' pipes; a worker that cannot start exits
with a status and a traceback.  The config test checks the connection limits a run
of many clients gets, through the daemon's own config loader.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from poolsvc.load.daemon import LoadDaemon
from poolsvc.load.forkserver import ForkServer, Forked
from poolsvc.load.mix import LoadSpec
from poolsvc.service import settings as service_settings

from svcutil import DaemonThread


def _worker_spec(socket_path: str, slot: int) -> str:
    spec = LoadSpec()
    return json.dumps({"socket": socket_path, "slot": slot, "gen": 0, "seed": spec.seed,
                       "mix": spec.mix, "sizes": spec.sizes, "batch": spec.batch,
                       "max_live": spec.max_live, "exhaust": False, "deadline": time.time() + 60,
                       "ops": 0, "tick": 0.25, "start": "wait", "transport": None})


def _line(proc: Forked, timeout: float = 30.0) -> dict:
    """The worker's next report line (waits for it up to ``timeout``)."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        assert time.monotonic() < deadline, f"no line from worker {proc.pid}: {data!r}"
        chunk = os.read(proc.stdout.fileno(), 1)
        assert chunk, f"worker {proc.pid} closed stdout: {data!r}"
        data += chunk
    return json.loads(data)


def _pipes(pid: int) -> set[str]:
    """The pipes process ``pid`` holds, as ``pipe:[inode]`` links."""
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return {link for link in links if link.startswith("pipe:")}


def test_forked_workers_run_end_and_report_their_status(tmp_path):
    daemon = DaemonThread(tmp_path / "d.sock")
    forks = ForkServer()
    procs: list[Forked] = []
    try:
        with open(tmp_path / "a.err", "w") as err_a, open(tmp_path / "b.err", "w") as err_b:
            a = forks.spawn(_worker_spec(daemon.path, 0), stdin_pipe=True, stderr=err_a)
            procs.append(a)
            b = forks.spawn(_worker_spec(daemon.path, 1), stdin_pipe=True, stderr=err_b)
            procs.append(b)
        assert _line(a)["k"] == "ready" and _line(b)["k"] == "ready"
        assert a.poll() is None and b.poll() is None
        # b holds none of a's pipes (nor the fork server's other descriptors)
        a_pipes = {f"pipe:[{os.fstat(fd).st_ino}]" for fd in (a.stdout.fileno(), a.status_fd)}
        assert not a_pipes & _pipes(b.pid)
        a.kill()
        assert a.wait(30) == -signal.SIGKILL
        a.kill()  # reaped: no signal goes to a pid that may be someone else's now
        assert a.poll() == -signal.SIGKILL
        assert b.stdin is not None
        b.stdin.close()  # no "go" line: the worker frees nothing, hangs up and reports
        assert _line(b)["k"] == "exit"
        assert b.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            proc.close()
        forks.close()
        daemon.stop()
    assert forks.proc.returncode == 0


def test_a_worker_that_cannot_start_exits_with_a_traceback(tmp_path):
    forks = ForkServer()
    try:
        with open(tmp_path / "w.err", "w") as err:
            proc = forks.spawn(json.dumps({"slot": 0}), stdin_pipe=False, stderr=err)
        assert proc.stdin is None
        assert proc.wait(30) == 1
        proc.close()
        with pytest.raises(OSError, match="status pipe is closed"):
            Forked(proc.pid, None, proc.stdout, -1).wait(0)
    finally:
        forks.close()
    assert "KeyError" in (tmp_path / "w.err").read_text()


@pytest.mark.parametrize("clients", [4, 256, 1024])
def test_the_daemon_of_a_run_serves_a_monitor_and_a_context_per_client(tmp_path, clients):
    daemon = LoadDaemon(str(tmp_path), config_path=None, dynamic_size="64MiB", no_dynamic=False,
                        clients=clients)
    _, limits = service_settings.load(daemon.write_config())
    # every client process may hold one connection of each role, the runner more
    assert limits.max_clients >= clients + 16
    assert limits.max_monitors >= clients + 16
