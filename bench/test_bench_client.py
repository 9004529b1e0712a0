"""The client's own CPU per ALLOC and per CLOSE, without a daemon, against a floor.

A service :class:`~poolsvc.service.objects.Context` runs over
:class:`CannedChannel`, a :class:`~poolsvc.service.channel.Channel` whose
slot exchange answers from replies built once (no daemon, no system call, no
wait; its socket pair and slot are tests/offlinechannel.py's): what is timed
is the client library's part of a request, encoding the request, reading the
reply frames, decoding each DESC into a ``Shm``, ``view()`` and
``close()``, single and in BATCHes of :data:`BATCH`.  That is the CPU a
``poolsvc load`` client spends per operation beside the daemon's (with 8
clients and the daemon on 2 CPUs, it bounds the throughput as much as the
daemon does).

The floor is the struct work alone, per operation: pack the request frame
and unpack its reply (``DESC`` or ``CLOSED``), the least any Python client
does.  ``test_client_ratios`` interleaves the client paths and the floor
round by round and reports the medians of the per-round ratios
(``extra_info`` and stdout with ``-s``); single figures on a shared 2-core
machine deserve scepticism, read the ratios.  In smoke mode
(``--benchmark-disable``) every path runs once and its results are checked.

Concurrency: single-threaded.
"""
from __future__ import annotations

import mmap
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from poolsvc.constants import ShmFlags
from poolsvc.service import channel as C
from poolsvc.service import protocol as P
from poolsvc.service.objects import Context, Shm

TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if TESTS not in sys.path:  # the test helpers, after everything else (nothing of bench/ is shadowed)
    sys.path.append(TESTS)
from offlinechannel import OfflineChannel  # noqa: E402  (tests/offlinechannel.py)

#: Operations per BATCH request, as in the pool service's benchmarks.
BATCH = 256
PAGE = 4096
#: The storage segment every canned descriptor points into.
TOKEN = 7
BASE_PA = 0x8000_0000
_OK = int(P.MsgType.OK)
_FLAGS = int(ShmFlags.DYNAMIC | ShmFlags.POOL)  # what alloc_user_buf gives
_BITS = int(P.DescBits.CONTIGUOUS | P.DescBits.REGISTERED)


def _frame(msg_type: int, body: bytes) -> bytes:
    return P.HEADER.pack(len(body), msg_type, 0) + body


def _desc(i: int) -> bytes:
    """The DESC of buffer ``i``: one page at ``i * PAGE`` of the segment, cookie and id ``i + 1``."""
    return P.DESC.pack(i + 1, i + 1, PAGE, BASE_PA + i * PAGE, BASE_PA + i * PAGE, i * PAGE, 0, 0, 1,
                       TOKEN, _FLAGS, int(P.Backing.ARENA), _BITS)


ALLOC_REPLY = _frame(_OK, _desc(0))
CLOSE_REPLY = _frame(_OK, P.CLOSED.pack(1, 0))
BATCH_ALLOC_REPLY = _frame(int(P.MsgType.BATCH_REPLY),
                           b"".join(_frame(_OK, _desc(i)) for i in range(BATCH)))
BATCH_CLOSE_REPLY = _frame(int(P.MsgType.BATCH_REPLY), CLOSE_REPLY * BATCH)
#: Bytes of a whole SHM_CLOSE request frame.
CLOSE_FRAME = P.HEADER_SIZE + P.COOKIE.size
_ALLOC_TYPE = P.HEADER.pack(0, int(P.MsgType.ALLOC), 0)[4:6]
_CLOSE_TYPE = P.HEADER.pack(0, int(P.MsgType.SHM_CLOSE), 0)[4:6]


class CannedChannel(OfflineChannel):
    """A Channel answered from canned replies, in process.

    ALLOC gets buffer 0's DESC; each SHM_CLOSE the CLOSED of a last
    reference; a BATCH of ALLOCs buffers 0..BATCH-1, a BATCH of SHM_CLOSEs
    as many CLOSEDs.  Every buffer lies in one anonymous mapping, the
    context's storage segment :data:`TOKEN`.  The replies are published in
    a slot of its own before each exchange: the client's encoding, the wire,
    the reply framing and decoding run as they do against a daemon.
    """

    def __init__(self) -> None:
        super().__init__("canned", {TOKEN: mmap.mmap(-1, BATCH * PAGE)}, 4096)
        self.exchanges = 0

    def _stage(self, data: bytes) -> None:
        """Publish the replies to ``data`` in the slot before it is sent (the wire then
        finds them at once): pipelined closes, then one ALLOC or BATCH (or nothing)."""
        self.exchanges += 1
        at = 0
        while data[at + 4:at + 6] == _CLOSE_TYPE:
            at += CLOSE_FRAME
        last = data[at + 4:at + 6]
        reply = (b"" if at == len(data) else ALLOC_REPLY if last == _ALLOC_TYPE else
                 BATCH_ALLOC_REPLY if data[at + 12:at + 14] == _ALLOC_TYPE else BATCH_CLOSE_REPLY)
        self.publish(CLOSE_REPLY * (at // CLOSE_FRAME) + reply if at else reply)

    def call_frame(self, frame: bytes, fds: Any = (), slot_ok: bool = True) -> tuple[int, memoryview]:
        self._stage(bytes(self.outbox) + frame)
        return super().call_frame(frame, fds, slot_ok)

    def drain(self) -> None:
        if self.outbox:
            self._stage(bytes(self.outbox))
        super().drain()


class _CannedDialer:
    def open(self, role: Any, name: str) -> CannedChannel:
        return CannedChannel()


@pytest.fixture()
def ctx():
    context = Context(_CannedDialer(), "bench")  # type: ignore[arg-type]
    yield context
    context.flush()
    assert context.shms == {} and not context._channel.pending and not context.deferred_errors


# -- the paths, one call each ---------------------------------------------------------------------------
def batched_pair(ctx: Context) -> list[Any]:
    """BATCH allocs, a view of each, then a BATCH closing them: 2 x BATCH operations."""
    b = ctx.batch()
    alloc = b.alloc_user_buf
    for _ in range(BATCH):
        alloc(PAGE)
    shms = b.run()
    for shm in shms:
        shm.view()
    b = ctx.batch()
    close = b.close
    for shm in shms:
        close(shm)
    return shms + b.run()


def single_pair(ctx: Context) -> Shm:
    """``alloc_user_buf``, ``view()``, ``close()`` (pipelined with the next request): 2 operations."""
    shm = ctx.alloc_user_buf(PAGE)
    shm.view()
    shm.close()
    return shm


_pack_alloc, _pack_close = C.pack_alloc_frame, C.pack_close_frame
_unpack_desc, _unpack_closed = P.DESC.unpack_from, P.CLOSED.unpack_from
_DESC_AT = [P.HEADER_SIZE + i * (P.HEADER_SIZE + P.DESC.size) + P.HEADER_SIZE for i in range(BATCH)]


def floor_pairs(_ctx: Any = None) -> int:
    """The struct work of BATCH alloc + close pairs: pack each request frame, unpack
    each reply (DESC, CLOSED); 2 x BATCH operations."""
    n = 0
    reply, closed = BATCH_ALLOC_REPLY, CLOSE_REPLY
    for at in _DESC_AT:
        _pack_alloc(C.ALLOC_BODY, C.ALLOC, 0, C.ALLOC_USER, PAGE)
        cookie = _unpack_desc(reply, at)[0]
        _pack_close(C.COOKIE_BODY, C.SHM_CLOSE, 0, cookie)
        n += _unpack_closed(closed, P.HEADER_SIZE)[0]
    return n


def _record(benchmark: Any, ops: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["ns_per_op"] = round(stats.stats.median / ops * 1e9, 1)
    benchmark.extra_info["ops_per_call"] = ops


# -- pytest-benchmark figures ----------------------------------------------------------------------------
def test_client_batched(benchmark, ctx):
    benchmark.extra_info["what"] = (f"client side of {BATCH} x alloc_user_buf(4096) + view() in one "
                                    f"BATCH, then {BATCH} closes in another (canned replies)")
    out = benchmark(batched_pair, ctx)
    _record(benchmark, 2 * BATCH)
    shms, closed = out[:BATCH], out[BATCH:]
    assert [shm.cookie for shm in shms] == list(range(1, BATCH + 1))
    assert all(shm.closed and shm.size == PAGE and shm.page_run == (BASE_PA + i * PAGE, 1)
               for i, shm in enumerate(shms))
    assert closed == [None] * BATCH


def test_client_single(benchmark, ctx):
    benchmark.extra_info["what"] = ("client side of alloc_user_buf(4096) + view() + close() "
                                    "(the close pipelined with the next request; canned replies)")
    shm = benchmark(single_pair, ctx)
    _record(benchmark, 2)
    assert shm.closed and shm.cookie == 1 and shm.paddr == BASE_PA and shm.flags == _FLAGS


def test_client_floor(benchmark):
    benchmark.extra_info["what"] = (f"floor: pack an ALLOC and a SHM_CLOSE frame, unpack a DESC and "
                                    f"a CLOSED, x {BATCH}")
    assert benchmark(floor_pairs) == BATCH
    _record(benchmark, 2 * BATCH)


def _per_op_ns(fn: Callable[[Any], Any], arg: Any, calls: int, ops: int) -> float:
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(calls):
        fn(arg)
    return (clock() - t0) / (calls * ops)


def test_client_ratios(benchmark, ctx, smoke):
    """Medians of per-round ratios of each client path to the floor, measured interleaved."""
    rounds = 3 if smoke else 31
    rows: dict[str, list[float]] = {"batched": [], "single": [], "floor": []}
    for _ in range(rounds):
        rows["floor"].append(_per_op_ns(floor_pairs, None, 4, 2 * BATCH))
        rows["batched"].append(_per_op_ns(batched_pair, ctx, 4, 2 * BATCH))
        rows["single"].append(_per_op_ns(single_pair, ctx, 4 * BATCH, 2))
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = {k: statistics.median(a / f for a, f in zip(rows[k], rows["floor"]))
             for k in ("batched", "single")}
    for k in ("batched", "single", "floor"):
        benchmark.extra_info[f"{k}_ns_per_op"] = round(med[k], 1)
    for k, r in ratio.items():
        benchmark.extra_info[f"{k}_over_floor"] = round(r, 2)
    benchmark.extra_info["figures"] = True  # bench/results.py lists them, not the timed call
    print(f"\nclient CPU per operation (ns): batched {med['batched']:.0f}, single {med['single']:.0f}, "
          f"floor {med['floor']:.0f}; over the floor: batched {ratio['batched']:.1f}x, "
          f"single {ratio['single']:.1f}x")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(v > 0 for v in med.values())  # timing judgements belong to the reader, not to CI
