"""Helpers for the pool-service tests: an in-process daemon, client processes, waiting.

:class:`DaemonThread` is the in-process daemon fixture (iceoryx's
RouDiEnvironment): a :class:`~poolsvc.service.server.Server` whose loop runs
in a thread of the test process, on a socket under the test's ``tmp_path``.
Client *processes* talk to it as they would to ``poolsvc serve``; the test
itself reads the daemon's state only through the protocol (STATS), never by
touching the System from the test thread.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from poolsvc import Config
from poolsvc.service import protocol as P
from poolsvc.service.server import Server
from poolsvc.service.settings import ServiceSettings
from poolsvc.storage import LIVE

from sysutil import shm_leftovers

MiB = 1 << 20
SMALL = dict(dynamic_size=64 * MiB, arena_step=1 * MiB)


class DaemonThread:
    """A daemon serving ``path`` from a thread of this process."""

    def __init__(self, path: str | Path, config: Config | None = None, **settings: Any) -> None:
        self.path = str(path)
        self.config = config or Config(**SMALL)
        settings.setdefault("log_level", "WARNING")
        self.settings = ServiceSettings(socket_path=self.path, **settings)
        self.server = Server(self.config, self.settings)
        self.server.start()
        self.thread = threading.Thread(target=self.server.serve_forever, name="poolsvc-daemon",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "daemon loop did not stop"

    def stats(self) -> dict[str, Any]:
        """The daemon's STATS document, over a fresh monitor connection."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(self.path)
            hello = P.HELLO.pack(P.MAGIC, P.VERSION, P.Role.MONITOR) + b"test-monitor"
            sock.sendall(P.frame(P.MsgType.HELLO, hello) + P.frame(P.MsgType.STATS))
            replies = read_frames(sock, 2)
        finally:
            sock.close()
        assert replies[0][0] == P.MsgType.WELCOME, replies[0]
        assert replies[1][0] == P.MsgType.OK, replies[1]
        return json.loads(replies[1][1])

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        """Poll STATS until ``predicate(stats)`` holds; returns those stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon state never satisfied the condition: "
                                     f"{json.dumps(summary(stats), indent=1)}")
            time.sleep(0.02)


@contextlib.contextmanager
def checked_daemon(path: str | Path, config: Config | None = None, **settings: Any) -> Iterator[DaemonThread]:
    """A :class:`DaemonThread` with ``baseline`` (its idle :func:`summary`) set; after
    it stops, no storage object of this process and nothing in ``/dev/shm`` is left."""
    before_storage, before_shm = LIVE["storage"], shm_leftovers()
    d = DaemonThread(path, config, **settings)
    d.baseline = summary(d.stats())
    yield d
    d.stop()
    assert LIVE["storage"] == before_storage, "daemon storage objects leaked"
    assert shm_leftovers() == before_shm


def read_frames(sock: socket.socket, count: int | None = None) -> list[tuple[int, bytes]]:
    """Read ``count`` frames (or until EOF when None) from a blocking socket."""
    buf = bytearray()
    frames: list[tuple[int, bytes]] = []
    while count is None or len(frames) < count:
        while len(buf) >= P.HEADER_SIZE:
            length, msg_type, _ = P.HEADER.unpack_from(buf)
            if len(buf) < P.HEADER_SIZE + length:
                break
            frames.append((msg_type, bytes(buf[P.HEADER_SIZE:P.HEADER_SIZE + length])))
            del buf[:P.HEADER_SIZE + length]
            if count is not None and len(frames) == count:
                return frames
        try:
            data = sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            if count is not None:
                raise EOFError(f"connection closed after {len(frames)} of {count} frames")
            return frames
        buf += data
    return frames


def summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The accounting figures a test compares before and after."""
    pools = stats["pools"]
    return {
        "dynamic_used_frames": pools["dynamic"]["used_frames"] if "dynamic" in pools else None,
        "static_used_bytes": pools["static"]["used_bytes"] if "static" in pools else None,
        "ids": stats["ids"],
        "registered_cookies": stats["registered_cookies"],
        "mapped_frames": stats["mapped_frames"],
        "contexts": stats["contexts"],
        "context_clients": sum(1 for c in stats["clients"] if c["role"] == "CONTEXT"),
        "storage_objects": stats["resources"]["storage_objects"],
        "registered_mappings": stats["resources"]["registered_mappings"],
    }


def idle(baseline: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """A predicate: the daemon's accounting equals ``baseline`` (no client holds anything)."""
    return lambda stats: summary(stats) == baseline


def spawn_client(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run a Python client script in its own process (stdout piped, text mode)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def kill_at_random_moments(procs: list[subprocess.Popen], rng: Any, spread_s: float = 0.4) -> None:
    """SIGKILL each running client at a random moment (0..spread_s apart), then reap it."""
    import signal

    deadline = time.monotonic()
    for proc in procs:
        deadline += rng.uniform(0.0, spread_s)
        time.sleep(max(0.0, deadline - time.monotonic()))
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
