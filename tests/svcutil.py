"""Helpers for the pool-service tests: in-process and subprocess daemons, raw and
library clients, client processes, waiting.

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
        return stats_of(self.path)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        """Poll STATS until ``predicate(stats)`` holds; returns those stats."""
        return wait_for_stats(self.path, predicate, timeout)


class DaemonProcess:
    """``python -m poolsvc serve`` in its own process (for tests where a daemon
    that dies must not take the test process with it)."""

    def __init__(self, path: str | Path, config: str = 'dynamic_size = "64MiB"\narena_step = "1MiB"\n',
                 service: str = "", preexec_fn: Callable[[], None] | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.path = str(path)
        conf = Path(self.path).with_suffix(".toml")
        conf.write_text(config + "[service]\n" + service)
        env = dict(os.environ)
        env.update(extra_env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc", "serve", "--config", str(conf),
                                      "--socket", self.path, "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env, preexec_fn=preexec_fn)
        deadline = time.monotonic() + 60
        while True:  # until it answers (the socket file exists a moment before it listens)
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("daemon never answered on its socket")
            try:
                stats_of(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self) -> dict[str, Any]:
        return stats_of(self.path)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        return wait_for_stats(self.path, predicate, timeout)

    def rss_kib(self) -> int:
        """The daemon's resident set (VmRSS), in KiB."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> str:
        """SIGTERM, wait, and return what the daemon wrote to stderr; it must exit 0."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, (self.proc.returncode, err)
        return err


def stats_of(path: str) -> dict[str, Any]:
    """A daemon's STATS document, over a fresh monitor connection."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
        hello = P.HELLO.pack(P.MAGIC, P.VERSION, P.Role.MONITOR) + b"test-monitor"
        sock.sendall(P.frame(P.MsgType.HELLO, hello) + P.frame(P.MsgType.STATS))
        replies = read_frames(sock, 2)
    finally:
        sock.close()
    assert replies[0][0] == P.MsgType.WELCOME, replies[0]
    assert replies[1][0] == P.MsgType.OK, replies[1]
    return json.loads(replies[1][1])


def wait_for_stats(path: str, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 20.0) -> dict[str, Any]:
    """Poll STATS until ``predicate(stats)`` holds; returns those stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = stats_of(path)
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon state never satisfied the condition: "
                                 f"{json.dumps(summary(stats), indent=1)}")
        time.sleep(0.02)


class RawClient:
    """A client speaking the wire protocol by hand (frames and descriptors), for
    tests that do what the client library never would."""

    def __init__(self, path: str, role: P.Role = P.Role.CONTEXT, features: int = 0,
                 name: bytes = b"raw") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.buf = bytearray()
        self.fds: list[int] = []
        if features:
            hello = P.HELLO2.pack(P.MAGIC, P.VERSION_2, role, features) + name
        else:
            hello = P.HELLO.pack(P.MAGIC, P.VERSION, role) + name
        try:
            self.send(P.frame(P.MsgType.HELLO, hello))
        except BrokenPipeError:
            pass  # refused at accept: the daemon's answer may wait in the socket all the same
        self.welcome = self.recv()

    def send(self, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        if fds:
            socket.send_fds(self.sock, [data[:1]], list(fds))
            data = data[1:]
        self.sock.sendall(data)

    def recv(self) -> tuple[int, bytes]:
        """The next frame (descriptors that came with it are appended to ``fds``)."""
        while True:
            if len(self.buf) >= P.HEADER_SIZE:
                length, msg_type, _ = P.HEADER.unpack_from(self.buf)
                if len(self.buf) >= P.HEADER_SIZE + length:
                    body = bytes(self.buf[P.HEADER_SIZE:P.HEADER_SIZE + length])
                    del self.buf[:P.HEADER_SIZE + length]
                    return msg_type, body
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 16)
            if not data:
                raise EOFError("daemon hung up")
            self.fds.extend(fds)
            self.buf += data

    def call(self, msg_type: int, body: bytes = b"", fds: list[int] = ()) -> tuple[int, bytes]:  # type: ignore[assignment]
        self.send(P.frame(msg_type, body), fds)
        return self.recv()

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


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


def requests_after_pauses(client: Any, pauses: list[float]) -> None:
    """On ``client`` (a ``connect()`` handle), one request after each pause of
    ``pauses`` seconds (spent polling the clock, not asleep): PING and 4 KiB
    alloc + close in turn, each checked; the context is flushed at the end."""
    ctx = client.open_context()
    for i, pause in enumerate(pauses):
        end = time.perf_counter() + pause
        while time.perf_counter() < end:
            pass
        if i % 2:
            assert client.ping(b"%d" % i) == b"%d" % i
        else:
            ctx.alloc_user_buf(4096).close()
    ctx.flush()
