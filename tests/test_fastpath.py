"""The compiled ALLOC / SHM_CLOSE kernel (ext/fastpath.pyx) against its plain-Python
twin (poolsvc/_pure/fastpath.py) as the oracle.

Two in-process daemons with the same System and limits serve the same random
sequence of requests on one connection each: one through the daemon's own
handlers (the compiled ``ShmRequests``), the other through the twin's.  After
every request the replies must be the same bytes (or the errors the same type
and message), and so must the accounting (connection and process quota
figures, the context's shms, ids, segment tokens, descriptors sent) and the
System's STATS.  The sequences mix every allocation kind, sizes that grow the
arena, limits near their edges (so that refusals happen), unknown cookies,
double closes, ``shm_from_id`` references held across a close, and
registrations planted under the cookie of the next new shm: a strict secure
world then refuses that shm's REGISTER_SHM (the cookie is registered already),
a lenient one shadows the planted registration.  ``test_refused_registration``
checks that a refused REGISTER_SHM leaves nothing behind, ``test_closed_system``
the requests of a closed System, and ``test_common_path_runs_no_python`` that
the kernel's common path calls no Python function (no property of the objects
it reads either).

The same sequences also run batched: each operation's requests as one BATCH,
served by the compiled ``run_batch`` (ext/wire.pyx), which calls the compiled
kernel through its typed entries (``serve_alloc_at`` / ``serve_close_at``),
against the twin's ``run_batch`` and handlers; the reply frames and the
counts must be the same too.

The compiled twin only exists with the compiled backend; under
``POOLSVC_PUREPYTHON=1`` the daemons' own tests run the twin.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc import Config
from poolsvc._backend import core as _core
from poolsvc._backend import BACKEND
from poolsvc._pure import fastpath as pure
from poolsvc._pure import wire as pure_wire
from poolsvc.service import protocol as P
from poolsvc.service.server import Server
from poolsvc.service.settings import ServiceSettings
from poolsvc.tee.secure_params import RegisteredShm

pytestmark = pytest.mark.skipif(BACKEND != "compiled", reason="the compiled kernel against its twin")

PAGE = 4096
#: Limits near which the sequences run: a few shms, a few arena segments' worth of bytes.
MAX_SHMS = 6
MAX_BYTES = 40 * PAGE


class Daemon:
    """An in-process Server and one CONTEXT connection of it (driven by direct handler calls)."""

    def __init__(self, path: str, pool: str, twin: bool, strict: bool = False,
                 max_bytes: int = MAX_BYTES) -> None:
        config = Config(dynamic_size=16 << 20, arena_step=1 << 20, dynamic_shm=(pool == "dynamic"),
                        static_size=4 << 20, strict=strict)
        settings = ServiceSettings(socket_path=path, log_level="WARNING", max_shms_per_client=MAX_SHMS,
                                   max_bytes_per_client=max_bytes)
        self.server = Server(config, settings)
        self.server.start()
        self.twin = twin
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        srv = self.server
        srv._accept()
        self.conn = next(c for c in srv.connections.values() if c.serial == srv._serials)
        self.sock.sendall(P.frame(int(P.MsgType.HELLO), P.HELLO.pack(P.MAGIC, P.VERSION, P.Role.CONTEXT)))
        srv._on_readable(self.conn)
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 16)
        for fd in fds:
            os.close(fd)
        assert P.HEADER.unpack_from(data)[1] == int(P.MsgType.WELCOME)
        if twin:
            self.conn.shm_requests = pure.ShmRequests(srv, self.conn)

    def plant_registration(self) -> int:
        """Register in the secure world, behind the daemon's back, the cookie the next new
        shm takes; return it.  (The System's cookie counter counts by one: one cookie is
        drawn to learn the next.)  A strict secure world then refuses that shm's
        REGISTER_SHM, the cookie being registered already; a lenient one shadows the
        planted registration until the shm's is unregistered."""
        system = self.server.system
        cookie = next(system.pools.cookies) + 1
        pages = np.array([system.config.dynamic_base], dtype=np.uint64)
        system.tee.registered[cookie] = RegisteredShm(cookie, pages, 0, PAGE)
        return cookie

    def request(self, msg_type: int, body: bytes) -> tuple[str, Any]:
        """Serve one request by its handler: ("ok", reply bytes) or ("error", (type, message))."""
        srv, conn = self.server, self.conn
        try:
            if msg_type == P.MsgType.ALLOC:
                reply = pure.serve_alloc(srv, conn, body) if self.twin else srv._op_alloc(conn, body)
            elif msg_type == P.MsgType.SHM_CLOSE:
                reply = pure.serve_shm_close(srv, conn, body) if self.twin else srv._op_shm_close(conn, body)
            else:
                reply = srv._op_shm_from_id(conn, body)
        except Exception as exc:  # noqa: BLE001 - the oracle compares every error
            return "error", (type(exc).__name__, str(exc))
        return "ok", bytes(reply)

    def batch(self, requests: list[tuple[int, bytes]]) -> tuple[str, Any]:
        """Serve ``requests`` as one BATCH: ("ok", (reply frames, counts)) or ("error", ...)."""
        srv, conn = self.server, self.conn
        body = b"".join(P.frame(int(t), b) for t, b in requests)
        counts: dict[int, int] = {}
        try:
            if self.twin:
                handlers = dict(srv._batch_handlers)
                handlers[int(P.MsgType.ALLOC)] = lambda c, b: pure.serve_alloc(srv, c, b)
                handlers[int(P.MsgType.SHM_CLOSE)] = lambda c, b: pure.serve_shm_close(srv, c, b)
                reply = pure_wire.run_batch(body, srv.settings.max_batch, srv._max_frame, handlers, conn,
                                            srv._refuse_in_batch, srv._error, srv._max_output, counts)
            else:
                reply = _core.run_batch(body, srv.settings.max_batch, srv._max_frame, srv._batch_handlers,
                                        conn, srv._refuse_in_batch, srv._error, srv._max_output, counts)
        except Exception as exc:  # noqa: BLE001 - the oracle compares every error
            return "error", (type(exc).__name__, str(exc))
        return "ok", (bytes(reply), counts)

    def state(self) -> dict[str, Any]:
        """The accounting a request may change, without names that differ between daemons."""
        srv, conn = self.server, self.conn
        fds = len(srv._reply_fds)
        for fd in srv._reply_fds:
            os.close(fd)
        srv._reply_fds.clear()
        stats = srv.system.stats()
        stats.pop("pid")
        stats["contexts"] = sorted(stats["contexts"].values(), key=repr)
        stats.pop("storage")  # process-wide counters: both daemons share this process
        ctx = conn.context
        return {
            "pool_bytes": conn.pool_bytes, "allocated": conn.pinned.allocated,
            "alloc_sizes": dict(conn.alloc_sizes),
            "shms": {c: (s.id, s.size, s.registered, s.refs) for c, s in ctx.shms.items()},
            "tokens": sorted(conn.tokens.tokens.values()), "fds_sent": fds,
            "ids": srv.system.ids.ids(), "stats": stats,
        }

    def close(self) -> None:
        self.sock.close()
        self.server._on_readable(self.conn)  # EOF: the connection and its context go
        self.server.stop()
        self.server.close()


# An operation: ("alloc", kind, size) | ("close", pick) | ("close_unknown", cookie) |
# ("from_id", pick) (one more reference, which a later close drops) | ("bad_body", body) |
# ("plant",) (a registration under the next shm's cookie: Daemon.plant_registration).
small = st.one_of(st.sampled_from([1, 15, 16, 17, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE]), st.integers(1, 2 * PAGE))
sizes = st.one_of(small, small, small, st.integers(1, 24 * PAGE), st.integers(-2, 0),
                  st.sampled_from([MAX_BYTES - PAGE, MAX_BYTES, MAX_BYTES + 1, 2 ** 62]))
kinds = st.sampled_from([0, 0, 1, 2, 2, 3])
alloc = st.tuples(st.just("alloc"), kinds, sizes)
ops = st.lists(st.one_of(
    alloc, alloc, alloc,
    st.tuples(st.just("close"), st.integers(0, 50)),
    st.tuples(st.just("close_unknown"), st.integers(0, 2 ** 64 - 1)),
    st.tuples(st.just("from_id"), st.integers(0, 50)),
    st.tuples(st.just("bad_body"), st.sampled_from([b"", b"\0" * 7, b"\0" * 13])),
    st.tuples(st.just("plant")),
), min_size=10, max_size=80)


def run_both(tmp_path: Any, pool: str, sequence: list[tuple[Any, ...]], batched: bool = False,
             strict: bool = False) -> None:
    """Run ``sequence`` on both daemons (their secure worlds ``strict`` or not), each
    operation's requests one by one or (``batched``) as one BATCH; compare after each."""
    compiled = Daemon(str(tmp_path / "c.sock"), pool, twin=False, strict=strict)
    twin = Daemon(str(tmp_path / "t.sock"), pool, twin=True, strict=strict)
    try:
        issued: list[int] = []  # cookies handed out, closed or not (so closes repeat)
        ids: list[int] = []
        for op in sequence:
            if op[0] == "plant":
                assert compiled.plant_registration() == twin.plant_registration()
                assert compiled.state() == twin.state(), op
                continue
            if op[0] == "alloc":
                requests = [(P.MsgType.ALLOC, P.ALLOC.pack(op[1], op[2]))]
            elif op[0] == "close":
                cookie = issued[op[1] % len(issued)] if issued else 0x1000
                requests = [(P.MsgType.SHM_CLOSE, P.COOKIE.pack(cookie))]
            elif op[0] == "close_unknown":
                requests = [(P.MsgType.SHM_CLOSE, P.COOKIE.pack(op[1]))]
            elif op[0] == "from_id":
                shm_id = ids[op[1] % len(ids)] if ids else 1
                requests = [(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(shm_id))]
            else:
                requests = [(P.MsgType.ALLOC, op[1]), (P.MsgType.SHM_CLOSE, op[1])]
            if batched:
                got = compiled.batch(requests)
                assert got == twin.batch(requests), op
                assert compiled.state() == twin.state(), op
                if got[0] == "ok":
                    for sub_type, start, end in P.split_frames(got[1][0], len(requests), 1 << 20):
                        if sub_type == P.MsgType.OK and end - start >= P.DESC.size:
                            cookie, shm_id = P.DESC.unpack_from(got[1][0], start)[:2]
                            issued.append(cookie)
                            if shm_id > 0:
                                ids.append(shm_id)
                continue
            for msg_type, body in requests:
                got = compiled.request(msg_type, body)
                want = twin.request(msg_type, body)
                assert got == want, (op, msg_type)
                assert compiled.state() == twin.state(), (op, msg_type)
                if got[0] == "ok" and msg_type in (P.MsgType.ALLOC, P.MsgType.SHM_FROM_ID):
                    cookie, shm_id = P.DESC.unpack_from(got[1])[:2]
                    issued.append(cookie)
                    if shm_id > 0:
                        ids.append(shm_id)
    finally:
        compiled.close()
        twin.close()


@pytest.mark.parametrize("pool", ["dynamic", "static"])
@given(sequence=ops, strict=st.booleans())
def test_compiled_matches_twin(tmp_path_factory: Any, pool: str, sequence: list[tuple[Any, ...]],
                               strict: bool) -> None:
    run_both(tmp_path_factory.mktemp("fastpath"), pool, sequence, strict=strict)


@pytest.mark.parametrize("pool", ["dynamic", "static"])
@given(sequence=ops, strict=st.booleans())
def test_compiled_matches_twin_batched(tmp_path_factory: Any, pool: str,
                                       sequence: list[tuple[Any, ...]], strict: bool) -> None:
    """The same in BATCHes: run_batch's typed entries into the kernel against the twin."""
    run_both(tmp_path_factory.mktemp("fastpath"), pool, sequence, batched=True, strict=strict)


@pytest.mark.parametrize("pool", ["dynamic", "static"])
@pytest.mark.parametrize("batched", [False, True])
def test_fill_to_the_limits_and_empty(tmp_path: Any, pool: str, batched: bool) -> None:
    """Every kind up to max_shms_per_client, then the byte quota, then every close."""
    sequence: list[tuple[Any, ...]] = [("alloc", k % 3, PAGE * (k + 1)) for k in range(MAX_SHMS + 2)]
    sequence += [("alloc", 0, MAX_BYTES), ("alloc", 2, MAX_BYTES + 1)]
    sequence += [("from_id", 0), ("close", 0), ("close", 0)]
    sequence += [("close", k) for k in range(MAX_SHMS + 2)]
    run_both(tmp_path, pool, sequence, batched)


def test_handlers_are_the_kernel() -> None:
    """The daemon's ALLOC and SHM_CLOSE handlers are the compiled kernel itself (no Python frame)."""
    from poolsvc._core import serve_alloc, serve_shm_close

    assert Server._op_alloc is serve_alloc
    assert Server._op_shm_close is serve_shm_close


def test_refused_unregistration(tmp_path: Any) -> None:
    """A refused UNREGISTER_SHM (the cookie unknown to the secure world) is logged and the
    buffer freed all the same, alike in both (as System.release does it)."""
    compiled = Daemon(str(tmp_path / "c.sock"), "dynamic", twin=False)
    twin = Daemon(str(tmp_path / "t.sock"), "dynamic", twin=True)
    try:
        replies = []
        for d in (compiled, twin):
            kind, reply = d.request(P.MsgType.ALLOC, P.ALLOC.pack(P.AllocKind.USER, PAGE))
            assert kind == "ok"
            cookie = P.DESC.unpack_from(reply)[0]
            del d.server.system.tee.registered[cookie]
            closed = d.request(P.MsgType.SHM_CLOSE, P.COOKIE.pack(cookie))
            replies.append((reply, closed, d.state()))
        assert replies[0] == replies[1]
        assert replies[0][1] == ("ok", P.CLOSED.pack(1, 0))
        assert not replies[0][2]["shms"] and replies[0][2]["allocated"] == 0
    finally:
        compiled.close()
        twin.close()


@pytest.mark.parametrize("kind", [P.AllocKind.USER, P.AllocKind.KERNEL])
@pytest.mark.parametrize("npages", [1, 512])
@pytest.mark.parametrize("batched", [False, True])
def test_refused_registration(tmp_path: Any, kind: int, npages: int, batched: bool) -> None:
    """A REGISTER_SHM the secure world refuses (strict: the new shm's cookie is registered
    already) fails the ALLOC alike in both, with one list page (the kernel's own call) or
    more (``Driver.register_run``), and leaves nothing behind: the run back in its segment,
    the reserved id (USER) given back, no shm, no accounting."""
    compiled = Daemon(str(tmp_path / "c.sock"), "dynamic", twin=False, strict=True, max_bytes=0)
    twin = Daemon(str(tmp_path / "t.sock"), "dynamic", twin=True, strict=True, max_bytes=0)
    body = P.ALLOC.pack(kind, npages * PAGE)

    def alloc(d: Daemon) -> tuple[str, Any]:
        return d.batch([(P.MsgType.ALLOC, body)]) if batched else d.request(P.MsgType.ALLOC, body)

    try:
        seen = []
        for d in (compiled, twin):
            kept = d.request(P.MsgType.ALLOC, P.ALLOC.pack(P.AllocKind.USER, PAGE))  # a live shm beside
            warm = d.request(P.MsgType.ALLOC, body)  # the arena holds a segment with room for the run
            assert kept[0] == warm[0] == "ok"
            d.request(P.MsgType.SHM_CLOSE, P.COOKIE.pack(P.DESC.unpack_from(warm[1])[0]))
            d.state()  # the segment descriptors sent so far (state() counts those since the last)
            before = d.state()
            planted = d.plant_registration()
            refused = alloc(d)
            del d.server.system.tee.registered[planted]
            after = d.state()
            assert after == before  # nothing kept of the refused request
            seen.append((refused, after, alloc(d), d.state()))
        assert seen[0] == seen[1]
        refused, _, again, _ = seen[0]
        if batched:
            assert refused[0] == "ok" and refused[1][1] == {int(P.MsgType.ALLOC): 1}
            sub_type, start, _ = P.split_frames(refused[1][0], 1, 1 << 20)[0]
            assert sub_type == P.MsgType.ERROR and b"registration refused (EINVAL)" in refused[1][0][start:]
            assert again[0] == "ok" and P.split_frames(again[1][0], 1, 1 << 20)[0][0] == P.MsgType.OK
        else:
            assert refused[0] == "error" and refused[1][0] == "BadParameters"
            assert refused[1][1].startswith("registration refused (EINVAL)")
            assert again[0] == "ok"
    finally:
        compiled.close()
        twin.close()


@pytest.mark.parametrize("pool", ["dynamic", "static"])
def test_closed_system(tmp_path: Any, pool: str) -> None:
    """Once the System is closed (its contexts first), ALLOC and SHM_CLOSE are refused alike:
    the kernel's one check, the context's flag, stands for the System's."""
    compiled = Daemon(str(tmp_path / "c.sock"), pool, twin=False)
    twin = Daemon(str(tmp_path / "t.sock"), pool, twin=True)
    try:
        seen = []
        for d in (compiled, twin):
            kind, reply = d.request(P.MsgType.ALLOC, P.ALLOC.pack(P.AllocKind.USER, PAGE))
            assert kind == "ok"
            d.server.system.close()
            assert d.conn.context.closed
            seen.append([d.request(P.MsgType.ALLOC, P.ALLOC.pack(k, PAGE)) for k in P.AllocKind] +
                        [d.request(P.MsgType.SHM_CLOSE, reply[:P.COOKIE.size])])
        assert seen[0] == seen[1]
        assert all(got[0] == "error" and got[1][0] == "Closed" for got in seen[0][:-1]), seen[0]
        assert seen[0][-1][0] == "error" and seen[0][-1][1][0] == "ItemNotFound"
    finally:
        compiled.close()
        twin.close()


@pytest.mark.parametrize("pool", ["dynamic", "static"])
@pytest.mark.parametrize("kind", list(P.AllocKind))
def test_common_path_runs_no_python(tmp_path: Any, pool: str, kind: int) -> None:
    """An ALLOC and its SHM_CLOSE, their segment mapped already, run no Python function
    (no property of the objects the kernel reads either): the profiler sees no frame.  The
    close of a static pool's private buffer (carve-out storage) is Handlers._close_shm's."""
    d = Daemon(str(tmp_path / "c.sock"), pool, twin=False)
    try:
        srv, conn, body = d.server, d.conn, P.ALLOC.pack(kind, PAGE)
        srv._op_shm_close(conn, srv._op_alloc(conn, body)[:P.COOKIE.size])  # the segment mapped
        frames: list[str] = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                frames.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

        sys.setprofile(profile)
        try:
            reply = srv._op_alloc(conn, body)
            in_alloc = len(frames)
            closed = srv._op_shm_close(conn, reply[:P.COOKIE.size])
        finally:
            sys.setprofile(None)
        assert in_alloc == 0, frames
        if pool == "static" and kind == P.AllocKind.PRIV:
            assert frames and frames[0].endswith("handlers.py:_close_shm"), frames
        else:
            assert frames == [], frames
        assert P.CLOSED.unpack(closed) == (1, 0) and not conn.context.shms
    finally:
        d.close()
