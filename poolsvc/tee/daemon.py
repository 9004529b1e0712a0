"""A TEE daemon: the simulated secure world of a System, served over a Unix socket.

This module owns the daemon's server loop, its wire protocol and a small
client.  ``poolsvc tee`` runs it; a user's own daemon embeds it with its own
trusted apps (``examples/my_tee_daemon.py``).

Protocol (version 1): newline-delimited JSON over a Unix stream socket, one
request, one answer, in order.  Every answer has ``"ok"``; a failure adds
``"error"`` (the poolsvc exception's class name), ``"message"`` and, for
secure-world refusals, ``"code"`` and ``"origin"``.

===============  ===================================  ======================================
op               request fields                       answer fields
===============  ===================================  ======================================
hello            --                                   version, caps, apps [{uuid, name}]
open_session     uuid, params?, login?                session, values, sizes, data
invoke           session, func, params?               values, sizes, data
cancel           session                              --
close_session    session                              --
call             arg (hex ``struct optee_msg_arg``)   arg (hex, ret and outputs), smc
stats            --                                   the System's stats, secure-world state
===============  ===================================  ======================================

Parameters (up to 4): ``null``; ``{"value": [a, b], "dir": "in"|"out"|"inout"}``;
``{"data": base64, "dir": "in"|"inout"}`` or ``{"size": n, "dir": "out"}`` for
a temporary memref (the daemon's side is private memory, so it travels
through a pool bounce buffer, as libteec does without REG_MEM); a memref
``{"null": true, "size": n, "dir": ...}`` is a NULL memref.  Answers give per
parameter ``values`` ([a, b] or null), ``sizes`` (int or null) and ``data``
(base64 of the first ``size`` output bytes, or null).

Each connection gets its own Context; closing the connection closes its
sessions and frees its memory, as closing ``/dev/tee0`` does.  The raw
``call`` op reaches the secure world directly: it exists to drive the
validation path from other tools and languages; ``smc`` is the SMC-level
result (0 OK; 5 EBADCMD for a command the secure world does not serve, the
message then coming back as sent).

``cancel`` sends a CANCEL for one of the connection's sessions
(``Session.cancel``, TEE_IOC_CANCEL), also while an ``invoke`` of that
session runs: the app sees the request when it checks for cancellation
(``WaitApp`` answers TEE_ERROR_CANCEL).  Its answer, like every answer,
comes in request order, so after the answer of the invoke it cancelled.

Concurrency: requests from all connections are served one at a time, in
order (the System is single-threaded), by the loop thread, except that an
``invoke`` runs in a worker thread while the loop keeps reading: a
``cancel`` is served at once (the one request that may run beside a call),
and everything else that touches the System (other requests, new
connections, closed ones) waits in ``_backlog`` until the worker is done.
The worker's answer reaches the loop through a socket pair.  ``stop()``
may be called from a signal handler; the loop then cancels a running
invoke and waits for it.
"""
from __future__ import annotations

import base64
import collections
import errno
import json
import os
import selectors
import socket
import threading
from typing import Any, Callable

from ..errors import BadParameters, PoolsvcError, ProtocolError, TeeError
from .params import TempMemref, Value

PROTOCOL_VERSION = 1
#: Longest request line accepted (bytes); a longer one closes the connection.
MAX_LINE = 64 << 20


def _param(spec: Any) -> Any:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise BadParameters(f"parameter {spec!r} is not an object or null")
    direction = spec.get("dir", "in")
    if "value" in spec:
        a, b = (list(spec["value"]) + [0, 0])[:2]
        return Value(a, b, direction)
    if spec.get("null"):
        return TempMemref(None, direction, int(spec.get("size", 0)))
    if "data" in spec:
        try:
            data = bytearray(base64.b64decode(spec["data"], validate=True))
        except (ValueError, TypeError):
            raise BadParameters("memref data is not valid base64") from None
        return TempMemref(data, direction)
    if "size" in spec:
        size = spec["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_LINE:
            raise BadParameters(f"memref size {size!r}")
        return TempMemref(bytearray(size), direction)
    raise BadParameters(f"parameter {spec!r} has no value, data, size or null")


def _params(specs: Any) -> list[Any]:
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise BadParameters("params must be a list")
    return [_param(s) for s in specs]


def _outputs(params: list[Any], result: Any) -> dict[str, Any]:
    data: list[str | None] = []
    for p, size in zip(params, result.sizes):
        if isinstance(p, TempMemref) and p.buffer is not None and size is not None:
            data.append(base64.b64encode(bytes(p.buffer[:min(size, len(p.buffer))])).decode())
        else:
            data.append(None)
    return {"values": [list(v) if v else None for v in result.values], "sizes": result.sizes,
            "data": data}


class _Connection:
    def __init__(self, sock: socket.socket, ctx: Any) -> None:
        self.sock = sock
        self.ctx = ctx
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        #: one slot per request, in request order: [answer], or [None] while it is pending
        self.answers: collections.deque[list[Any]] = collections.deque()
        self.closed = False


def _op_of(line: bytes) -> Any:
    """The ``op`` of a request line, or None when it is not a well-formed request."""
    try:
        request = json.loads(line)
    except ValueError:
        return None
    return request.get("op") if isinstance(request, dict) else None


class TeeDaemon:
    """Serves a System's secure world on a Unix socket (see the module docs for the protocol).

    ``TeeDaemon(system, socket_path)``; ``serve_forever(ready=None)`` runs
    until :meth:`stop`; ``ready`` is called once the socket listens.  A stale
    socket file left by a crashed predecessor is removed; a live one gives
    BadParameters.
    """

    def __init__(self, system: Any, socket_path: str) -> None:
        self.system = system
        self.path = socket_path
        self._stop = False
        self._conns: dict[int, _Connection] = {}
        self._sel: selectors.BaseSelector | None = None  # made by serve_forever
        self._listener: socket.socket | None = None
        #: the thread running an invoke (None when the System is free), and its request
        self._worker: threading.Thread | None = None
        self._worker_call: tuple[_Connection, Any] | None = None
        #: System work that waits for the worker, in arrival order
        self._backlog: collections.deque[Callable[[], None]] = collections.deque()
        #: (connection, slot, answer) of a finished worker; the worker writes a byte to _wake
        self._finished: list[tuple[_Connection, list[Any], dict[str, Any]]] = []
        self._wake: tuple[socket.socket, socket.socket] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def _selector(self) -> selectors.BaseSelector:
        """The loop's selector; only used while serve_forever runs (after _listen made it)."""
        assert self._sel is not None, "TeeDaemon selector used outside serve_forever"
        return self._sel

    def _listen(self) -> None:
        self._sel = sel = selectors.DefaultSelector()
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # nobody listens: a crashed predecessor's socket
            else:
                raise BadParameters(f"a daemon already listens on {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise BadParameters(f"cannot listen on {self.path}: {exc.strerror}") from None
        self._listener = sock
        sel.register(sock, selectors.EVENT_READ, None)
        self._wake = socket.socketpair()
        self._wake[0].setblocking(False)
        sel.register(self._wake[0], selectors.EVENT_READ, "wake")

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stop = True

    def serve_forever(self, ready: Any = None, poll: float = 0.2) -> None:
        """Listen, call ``ready()``, serve until stop(); then close every connection."""
        try:
            self._listen()
            if ready is not None:
                ready()
            while not self._stop:
                for key, events in self._selector().select(timeout=poll):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._worker_done()
                    else:
                        self._service(key.data, events)
        finally:
            self._stop_worker()
            for conn in list(self._conns.values()):
                self._drop(conn)
            while self._backlog:
                self._backlog.popleft()()
            if self._wake is not None:
                for end in self._wake:
                    end.close()
                self._wake = None
            if self._sel is not None:
                self._sel.close()
                self._sel = None
            if self._listener is not None:
                self._listener.close()
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass

    # -- connections -------------------------------------------------------------------------
    def _system_work(self, work: Callable[[], None]) -> None:
        """Run ``work`` (it uses the System) now, or after the running invoke."""
        if self._worker is not None:
            self._backlog.append(work)
        else:
            work()

    def _accept(self) -> None:
        try:
            assert self._listener is not None, "accept() without a listening socket"
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = _Connection(sock, None)
        self._conns[sock.fileno()] = conn
        self._selector().register(sock, selectors.EVENT_READ, conn)

        def open_context() -> None:
            if not conn.closed:
                conn.ctx = self.system.open_context(f"tee-client-{sock.fileno()}")
        self._system_work(open_context)

    def _drop(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.sock.fileno(), None)
        try:
            self._selector().unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

        def close_context() -> None:
            if conn.ctx is not None:
                conn.ctx.close()
        self._system_work(close_context)

    def _service(self, conn: _Connection, events: int) -> None:
        if events & selectors.EVENT_READ:
            try:
                chunk = conn.sock.recv(1 << 20)
            except BlockingIOError:
                chunk = None
            except OSError:
                chunk = b""
            if chunk == b"":
                self._drop(conn)
                return
            if chunk:
                conn.inbuf += chunk
                while b"\n" in conn.inbuf:
                    line, _, rest = conn.inbuf.partition(b"\n")
                    conn.inbuf = bytearray(rest)
                    self._request(conn, bytes(line))
                if len(conn.inbuf) > MAX_LINE:
                    self._drop(conn)
                    return
        self._flush(conn)

    def _request(self, conn: _Connection, line: bytes) -> None:
        """Serve one request line in its turn; its answer takes the next slot."""
        slot: list[Any] = [None]
        conn.answers.append(slot)
        if _op_of(line) == "cancel":   # served at once, also beside a running invoke
            slot[0] = self.handle(conn.ctx, line)
        else:
            self._system_work(lambda: self._run(conn, line, slot))

    def _run(self, conn: _Connection, line: bytes, slot: list[Any]) -> None:
        """Serve a request that uses the System (the System is free): an invoke in a worker."""
        if conn.closed:     # (the daemon stopped, or the client left, before its turn)
            return
        if _op_of(line) != "invoke":
            slot[0] = self.handle(conn.ctx, line)
            self._flush(conn)
            return

        def work() -> None:
            answer = self.handle(conn.ctx, line)
            self._finished.append((conn, slot, answer))
            wake = self._wake
            if wake is not None:
                wake[1].send(b"x")

        self._worker_call = (conn, json.loads(line).get("session"))
        self._worker = threading.Thread(target=work, name="tee-invoke", daemon=True)
        self._worker.start()

    def _worker_done(self) -> None:
        """The worker's answer is in: deliver it, then the System work that waited for it."""
        assert self._wake is not None
        try:
            self._wake[0].recv(64)
        except BlockingIOError:
            pass
        if self._worker is None or not self._finished:
            return
        self._worker.join()
        self._worker = self._worker_call = None
        conn, slot, answer = self._finished.pop()
        slot[0] = answer
        self._flush(conn)
        while self._backlog and self._worker is None:
            self._backlog.popleft()()

    def _stop_worker(self) -> None:
        """Cancel the running invoke (if any) and wait for it."""
        worker, call = self._worker, self._worker_call
        if worker is None or call is None:
            return
        conn, session_id = call
        session = conn.ctx.sessions.get(session_id) if conn.ctx is not None else None
        if session is not None:
            try:
                session.cancel()
            except PoolsvcError:
                pass
        worker.join()
        self._worker = self._worker_call = None
        self._finished.clear()

    def _flush(self, conn: _Connection) -> None:
        """Answers ready in request order go out; the rest wait for the one before them."""
        if conn.closed:
            return
        while conn.answers and conn.answers[0][0] is not None:
            conn.outbuf += json.dumps(conn.answers.popleft()[0]).encode() + b"\n"
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._drop(conn)
                return
        self._selector().modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0),
                                conn)

    # -- requests ---------------------------------------------------------------------------------
    def handle(self, ctx: Any, line: bytes) -> dict[str, Any]:
        """Serve one request line for context ``ctx``; never raises for a bad request."""
        try:
            try:
                request = json.loads(line)
            except ValueError as exc:
                raise ProtocolError(f"request is not JSON: {exc}") from None
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ProtocolError("request must be an object with an 'op' string")
            op = request["op"]
            method = getattr(self, f"_op_{op}", None)
            if method is None:
                raise ProtocolError(f"unknown op {op!r}")
            answer = method(ctx, request)
            answer["ok"] = True
            return answer
        except TeeError as exc:
            return {"ok": False, "error": "TeeError", "message": str(exc), "code": exc.code,
                    "origin": exc.origin, **_outputs_or_empty(exc)}
        except PoolsvcError as exc:
            return {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        except (TypeError, ValueError, KeyError) as exc:
            return {"ok": False, "error": "BadParameters", "message": f"malformed request: {exc!r}"}

    def _op_hello(self, ctx: Any, req: dict) -> dict:
        tee = self.system.tee
        return {"version": PROTOCOL_VERSION, "caps": int(tee.caps), "pool": self.system.pool,
                "apps": [{"uuid": str(u), "name": getattr(cls, "NAME", cls.__name__)}
                         for u, cls in tee.apps.items()]}

    def _op_open_session(self, ctx: Any, req: dict) -> dict:
        params = _params(req.get("params"))
        session = ctx.open_session(req["uuid"], params, int(req.get("login", 0)))
        return {"session": session.id, **_outputs(params, session.open_result)}

    def _session(self, ctx: Any, req: dict) -> Any:
        session = None if ctx is None else ctx.sessions.get(req.get("session"))
        if session is None:
            raise BadParameters(f"session {req.get('session')!r} is not open on this connection")
        return session

    def _op_invoke(self, ctx: Any, req: dict) -> dict:
        session = self._session(ctx, req)
        params = _params(req.get("params"))
        try:
            result = session.invoke(req["func"], params)
        except TeeError as exc:
            exc.params = params  # type: ignore[attr-defined]
            raise
        return _outputs(params, result)

    def _op_cancel(self, ctx: Any, req: dict) -> dict:
        self._session(ctx, req).cancel()
        return {}

    def _op_close_session(self, ctx: Any, req: dict) -> dict:
        self._session(ctx, req).close()
        return {}

    def _op_call(self, ctx: Any, req: dict) -> dict:
        try:
            arg = bytes.fromhex(req["arg"])
        except (ValueError, TypeError):
            raise BadParameters("arg is not hex") from None
        rc, out = self.system.tee.call_smc(arg)
        return {"arg": out.hex(), "smc": rc}

    def _op_stats(self, ctx: Any, req: dict) -> dict:
        stats = self.system.stats()
        tee = self.system.tee
        stats["tee"] = {"sessions": len(tee.sessions), "registered": len(tee.registered),
                        "rpc_shms": len(tee.rpc_shms), "calls": tee.stats.calls,
                        "errors": {hex(k): v for k, v in tee.stats.errors.items()}}
        return {"stats": stats}


def _outputs_or_empty(exc: TeeError) -> dict[str, Any]:
    params = getattr(exc, "params", None)
    result = getattr(exc, "result", None)
    if params is None or result is None:
        return {}
    return _outputs(params, result)


class TeeClient:
    """A client of a running TEE daemon: ``TeeClient(socket_path)``.

    Methods return the answer's fields; a failed request raises TeeError
    (secure-world refusals: ``code``, ``origin``, ``answer``) or
    ProtocolError for anything else.

    Concurrency: any thread may send a request while another waits for an
    answer (so :meth:`cancel` can reach a running :meth:`invoke`): requests
    are numbered as they are sent, and whichever thread reads an answer
    files it under its number (the daemon answers in request order).
    """

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except OSError as exc:
            self.sock.close()
            raise ProtocolError(f"cannot connect to {socket_path}: "
                                f"{errno.errorcode.get(exc.errno or 0, exc)}") from None
        self._file = self.sock.makefile("rb")
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._sent = 0      # requests sent (the next one's number)
        self._read = 0      # answers read (the next one's number)
        self._answers: dict[int, dict[str, Any]] = {}

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its answer (raises on ``ok: false``)."""
        data = json.dumps({"op": op, **fields}).encode() + b"\n"
        with self._send_lock:
            number = self._sent
            self.sock.sendall(data)
            self._sent += 1
        answer = self._answer(number)
        if not answer.get("ok"):
            if "code" in answer:
                exc = TeeError(answer["message"], answer["code"], answer["origin"])
                exc.answer = answer  # type: ignore[attr-defined]
                raise exc
            raise ProtocolError(f"{answer.get('error')}: {answer.get('message')}")
        return answer

    def _answer(self, number: int) -> dict[str, Any]:
        """The answer to request ``number``, reading (and filing) answers until it comes."""
        while True:
            with self._read_lock:
                if number in self._answers:
                    return self._answers.pop(number)
                line = self._file.readline()
                if not line:
                    raise ProtocolError("the daemon closed the connection")
                self._answers[self._read] = json.loads(line)
                self._read += 1

    def hello(self) -> dict[str, Any]:
        return self.request("hello")

    def open_session(self, uuid: Any, params: list[Any] | None = None) -> int:
        return self.request("open_session", uuid=str(uuid), params=params or [])["session"]

    def invoke(self, session: int, func: int, params: list[Any] | None = None) -> dict[str, Any]:
        return self.request("invoke", session=session, func=func, params=params or [])

    def cancel(self, session: int) -> None:
        """CANCEL for ``session``; any thread, also while an invoke of it runs."""
        self.request("cancel", session=session)

    def close_session(self, session: int) -> None:
        self.request("close_session", session=session)

    def call(self, arg: bytes) -> bytes:
        return self.call_smc(arg)[1]

    def call_smc(self, arg: bytes) -> tuple[int, bytes]:
        """The raw message ``arg`` answered: ``(SMC-level result, message bytes)``."""
        reply = self.request("call", arg=arg.hex())
        return reply["smc"], bytes.fromhex(reply["arg"])

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> "TeeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def memref_in(data: bytes) -> dict[str, Any]:
    """A protocol parameter: input bytes."""
    return {"data": base64.b64encode(data).decode(), "dir": "in"}


def memref_out(size: int) -> dict[str, Any]:
    """A protocol parameter: an output buffer of ``size`` bytes."""
    return {"size": size, "dir": "out"}


def value(a: int = 0, b: int = 0, direction: str = "in") -> dict[str, Any]:
    """A protocol parameter: a value."""
    return {"value": [a, b], "dir": direction}


__all__ = ["PROTOCOL_VERSION", "TeeClient", "TeeDaemon", "memref_in", "memref_out", "value"]
