"""The daemon a load run starts: ``poolsvc serve`` in a subprocess, and its end.

:class:`LoadDaemon` writes the run's service config (unless the run names a
config file), starts ``poolsvc serve`` on a socket in the run's work
directory, waits until it answers, and at the end stops it with SIGTERM and
says what it left behind (socket, /dev/shm objects, exit status).  Its
stderr goes to ``daemon.log`` in the work directory.

Concurrency: used by the runner's thread only.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from ..errors import Closed, PoolsvcError
from . import invariants

#: Seconds the daemon gets to start, and to stop on SIGTERM.
DAEMON_START = 20.0
DAEMON_STOP = 15.0


def tail(path: str, limit: int = 1500) -> str:
    """The last ``limit`` characters of a text file ("" if it cannot be read)."""
    try:
        with open(path, errors="replace") as fh:
            text = fh.read()
    except OSError:
        return ""
    return text[-limit:].strip()


class LoadDaemon:
    """``poolsvc serve`` for one run in ``workdir``: with ``config_path``, or a config
    of ``dynamic_size`` (no dynamic shm with ``no_dynamic``) that serves ``clients``
    client processes."""

    def __init__(self, workdir: str, *, config_path: str | None, dynamic_size: str,
                 no_dynamic: bool, clients: int) -> None:
        self.workdir = workdir
        self.config_path = config_path
        self.dynamic_size = dynamic_size
        self.no_dynamic = no_dynamic
        self.clients = clients
        self.path = os.path.join(workdir, "poolsvc.sock")
        self.log = os.path.join(workdir, "daemon.log")
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def places(self) -> int:
        """The daemon's ``max_clients`` and ``max_monitors``: a client process may hold
        two connections of either role (a CONTEXT per context, the MONITOR of its
        ``connect()``), and the runner's monitor and malformed requests need a few more."""
        return max(256, 2 * self.clients + 64)

    def write_config(self) -> str:
        """The config file the daemon runs with: the run's, or one written to the work directory."""
        if self.config_path:
            return self.config_path
        cfg = os.path.join(self.workdir, "service.toml")
        lines = [f'dynamic_size = "{self.dynamic_size}"', 'arena_step = "4MiB"']
        if self.no_dynamic:
            lines.append("dynamic_shm = false")
        lines += ["", "[service]", 'log_level = "WARNING"',
                  f"max_clients = {self.places()}", f"max_monitors = {self.places()}"]
        with open(cfg, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return cfg

    def start(self) -> str:
        """Start the daemon; its socket path once it answers (PoolsvcError if it does not)."""
        path = self.path
        with open(self.log, "w") as log:
            self.proc = proc = subprocess.Popen(
                [sys.executable, "-m", "poolsvc.cli", "serve", "--config", self.write_config(),
                 "--socket", path, "--log-level", "warning"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, close_fds=True)
        deadline = time.monotonic() + DAEMON_START
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PoolsvcError(f"poolsvc serve exited with status {proc.returncode} at "
                                   f"start: {tail(self.log)}")
            if os.path.exists(path):
                try:
                    import poolsvc

                    poolsvc.connect(path, name="load-probe", spin_us=0, timeout=5).close()
                    return path
                except Closed:
                    pass
            time.sleep(0.05)
        raise PoolsvcError(f"poolsvc serve did not open {path} within {DAEMON_START} s")

    def stop(self) -> tuple[dict[str, Any], list[str]]:
        """SIGTERM the daemon; its exit status and what it left behind, and the
        violations that makes."""
        out: dict[str, Any] = {}
        problems: list[str] = []
        proc = self.proc
        if proc is None:
            return out, problems
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DAEMON_STOP)
            except subprocess.TimeoutExpired:
                problems.append(f"the daemon did not stop within {DAEMON_STOP} s of SIGTERM")
                proc.kill()
                proc.wait()
        out["exit_status"] = proc.returncode
        if proc.returncode != 0:
            problems.append(f"the daemon exited with status {proc.returncode}: {tail(self.log)}")
        if os.path.exists(self.path):
            problems.append(f"the daemon left its socket {self.path} behind")
        left = sorted(n for n, pid in invariants.shm_objects().items() if pid == proc.pid)
        out["dev_shm_left"] = left
        if left:
            problems.append(f"the daemon left /dev/shm objects after it stopped: {', '.join(left)}")
        return out, problems
