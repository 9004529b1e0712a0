"""Malformed requests on raw Unix sockets, each with the reply the protocol promises.

The service client never sends a malformed frame, so this module speaks the
wire directly, with the constants of :mod:`poolsvc.service.protocol`.  Each
:class:`Case` opens its own connection, sends bytes a broken or hostile
client might send, and checks what came back:

- ``"error"``: an ERROR reply with one of the expected codes, after which the
  connection must still serve a PING (the daemon resynchronised);
- ``"hangup"``: an ERROR reply with one of the expected codes, then end of
  stream (a framing error cannot be resynchronised);
- ``"silent"``: nothing is owed (a truncated frame and a hang-up); the
  daemon must simply keep serving the others, which the runner checks.

A reply other than the promised one, or none within the timeout, is a
*violation*.  Nothing here holds memory in the daemon: every case ends its
connection, so the daemon's accounting is unchanged afterwards.

Concurrency: :class:`MalformedInjector` runs its cases on its own thread
(blocking sockets with timeouts); its counters are read by the runner after
``stop()`` joined it, or racily (for progress) before.
"""
from __future__ import annotations

import random
import socket
import threading
from dataclasses import dataclass
from typing import Callable

from ..service import protocol as P

E = P.ErrorCode
#: Seconds a case waits for a reply.
TIMEOUT = 5.0


@dataclass(frozen=True)
class Case:
    """One malformed exchange: ``make()`` gives the bytes after HELLO (or instead of it)."""

    name: str
    make: Callable[[random.Random], bytes]
    outcome: str                      # "error", "hangup" or "silent"
    codes: frozenset[int] = frozenset()
    hello: bool = True                # send a valid CONTEXT HELLO first


def _hello(role: int = P.Role.CONTEXT, magic: int = P.MAGIC, version: int = P.VERSION) -> bytes:
    return P.frame(P.MsgType.HELLO, P.HELLO.pack(magic, version, role) + b"load-malformed")


def _garbage(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))


CASES: tuple[Case, ...] = (
    Case("bad-magic", lambda r: _hello(magic=0xDEADBEEF), "hangup", frozenset({E.VERSION}), hello=False),
    Case("bad-version", lambda r: _hello(version=P.VERSION + 7), "hangup", frozenset({E.VERSION}),
         hello=False),
    Case("no-hello", lambda r: P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096)), "hangup",
         frozenset({E.PROTOCOL, E.UNKNOWN_TYPE}), hello=False),
    Case("oversized-length", lambda r: P.HEADER.pack(0x7FFFFFFF, P.MsgType.ALLOC, 0), "hangup",
         frozenset({E.PROTOCOL})),
    Case("nonzero-flags", lambda r: P.HEADER.pack(P.ALLOC.size, P.MsgType.ALLOC, 0x40)
         + P.ALLOC.pack(0, 4096), "hangup", frozenset({E.PROTOCOL})),
    Case("unknown-type", lambda r: P.frame(r.choice([0, 9, 99, 250, 0xFFFF]), b"\x00" * r.randint(0, 16)),
         "error", frozenset({E.UNKNOWN_TYPE})),
    Case("short-alloc", lambda r: P.frame(P.MsgType.ALLOC, b"\x01\x02\x03"), "error",
         frozenset({E.PROTOCOL})),
    Case("long-alloc", lambda r: P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 4096) + b"\x00" * 9), "error",
         frozenset({E.PROTOCOL})),
    Case("alloc-bad-kind", lambda r: P.frame(P.MsgType.ALLOC, P.ALLOC.pack(r.randint(3, 1000), 4096)),
         "error", frozenset({E.BAD_PARAMETERS})),
    Case("alloc-bad-size", lambda r: P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, r.choice([-1, -(1 << 62)]))),
         "error", frozenset({E.BAD_PARAMETERS, E.SIZE_OVERFLOW})),
    Case("alloc-zero", lambda r: P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 0)), "error",
         frozenset({E.OUT_OF_MEMORY})),
    Case("alloc-huge", lambda r: P.frame(P.MsgType.ALLOC, P.ALLOC.pack(0, 1 << 50)), "error",
         frozenset({E.OUT_OF_MEMORY, E.LIMIT, E.BAD_PARAMETERS, E.SIZE_OVERFLOW})),
    Case("close-unknown-cookie", lambda r: P.frame(P.MsgType.SHM_CLOSE, P.COOKIE.pack(r.getrandbits(63))),
         "error", frozenset({E.ITEM_NOT_FOUND})),
    Case("lookup-unknown-id", lambda r: P.frame(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(r.randint(1 << 40, 1 << 62))),
         "error", frozenset({E.ITEM_NOT_FOUND, E.BAD_PARAMETERS})),
    Case("register-without-fd", lambda r: P.frame(P.MsgType.REGISTER, P.REGISTER.pack(0, 0, 4096)),
         "error", frozenset({E.BAD_PARAMETERS, E.NOT_SUPPORTED})),
    Case("invoke-no-session", lambda r: P.frame(P.MsgType.INVOKE, P.SESSION.pack(r.getrandbits(40), 0, 0)
                                                 + P.COOKIE.pack(0)),
         "error", frozenset({E.ITEM_NOT_FOUND})),
    Case("batch-with-invoke", lambda r: P.frame(P.MsgType.BATCH, P.frame(P.MsgType.INVOKE, P.SESSION.pack(1, 0, 0))),
         "error", frozenset({E.UNKNOWN_TYPE, E.PROTOCOL})),
    Case("batch-truncated", lambda r: P.frame(P.MsgType.BATCH, P.HEADER.pack(64, P.MsgType.ALLOC, 0) + b"\x00" * 8),
         "error", frozenset({E.PROTOCOL})),
    Case("truncated-then-hangup", lambda r: P.HEADER.pack(64, P.MsgType.ALLOC, 0) + b"\x00" * r.randint(0, 63),
         "silent"),
    Case("garbage-before-hello", lambda r: b"\xff" * 8 + _garbage(r), "hangup",
         frozenset({E.PROTOCOL, E.VERSION, E.UNKNOWN_TYPE}), hello=False),
)


def _read_frame(sock: socket.socket, buf: bytearray) -> tuple[int, bytes] | None:
    """One frame from a blocking socket (None at end of stream)."""
    while True:
        if len(buf) >= P.HEADER_SIZE:
            length, msg_type, _ = P.HEADER.unpack_from(buf)
            if len(buf) >= P.HEADER_SIZE + length:
                body = bytes(buf[P.HEADER_SIZE:P.HEADER_SIZE + length])
                del buf[:P.HEADER_SIZE + length]
                return msg_type, body
        try:
            data = sock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            return None
        buf += data


def _code(msg_type: int, body: bytes) -> int | None:
    """The error code of an ERROR frame, or of the first ERROR inside a BATCH_REPLY."""
    if msg_type == P.MsgType.ERROR and len(body) >= P.ERROR.size:
        return P.ERROR.unpack_from(body)[0]
    if msg_type == P.MsgType.BATCH_REPLY:
        for sub_type, sub in P.iter_frames(body, P.DEFAULT_MAX_BATCH, P.MAX_REPLY_FRAME):
            if sub_type == P.MsgType.ERROR:
                return P.ERROR.unpack_from(sub)[0]
    return None


def run_case(path: str, case: Case, rng: random.Random, timeout: float = TIMEOUT) -> str | None:
    """Send one malformed exchange; None when the daemon answered as promised, else why not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    buf = bytearray()
    try:
        try:
            sock.connect(path)
            if case.hello:
                sock.sendall(_hello())
                reply = _read_frame(sock, buf)
                if reply is None or reply[0] != P.MsgType.WELCOME:
                    return f"{case.name}: valid HELLO answered with {reply and P.type_name(reply[0])}"
            sock.sendall(case.make(rng))
            if case.outcome == "silent":
                return None
            reply = _read_frame(sock, buf)
        except socket.timeout:
            return f"{case.name}: no reply within {timeout} s"
        except OSError as exc:
            if case.outcome == "hangup":
                return None  # the daemon may hang up before reading everything we sent
            return f"{case.name}: {exc.strerror or exc}"
        if reply is None:
            return f"{case.name}: the daemon hung up without the ERROR reply it owes"
        code = _code(*reply)
        if code is None or code not in case.codes:
            names = "/".join(sorted(E(c).name for c in case.codes))
            return (f"{case.name}: expected ERROR {names}, got {P.type_name(reply[0])}"
                    f"{'' if code is None else ' code ' + str(code)}")
        try:
            if case.outcome == "error":
                sock.sendall(P.frame(P.MsgType.PING, b"still-there"))
                pong = _read_frame(sock, buf)
                if pong is None or pong[0] != P.MsgType.OK or pong[1] != b"still-there":
                    got = pong and P.type_name(pong[0])
                    return f"{case.name}: connection unusable after the ERROR (PING got {got})"
            else:
                if _read_frame(sock, buf) is not None:
                    return f"{case.name}: the daemon kept the connection after a framing error"
        except socket.timeout:
            return f"{case.name}: {'PING' if case.outcome == 'error' else 'hang-up'} not seen within {timeout} s"
        except OSError as exc:
            return f"{case.name}: {exc.strerror or exc} after the ERROR"
        return None
    finally:
        sock.close()


class MalformedInjector:
    """A thread sending malformed exchanges at ``rate`` per second (Poisson arrivals)."""

    def __init__(self, path: str, rate: float, seed: int, cases: tuple[Case, ...] = CASES) -> None:
        self.path = path
        self.rate = rate
        self.rng = random.Random(f"malformed/{seed}")
        self.cases = cases
        self.sent = 0
        self.by_case: dict[str, int] = {}
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolsvc-load-malformed", daemon=True)

    def start(self) -> None:
        if self.rate > 0:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.rng.expovariate(self.rate)):
            case = self.rng.choice(self.cases)
            why = run_case(self.path, case, self.rng)
            self.sent += 1
            self.by_case[case.name] = self.by_case.get(case.name, 0) + 1
            if why is not None:
                self.violations.append(f"malformed request {why}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * TIMEOUT + 5)

