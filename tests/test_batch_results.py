"""The client's decoding of a BATCH_REPLY: compiled ``_batch_results`` (ext/wire.pyx)
against its plain-Python twin (poolsvc/_pure/wire.py) as the oracle, and the oracle
against a planted bug.

Each example is a reply of random frames (plain DESCs, DESCs with pages or a new
segment, cookies already held, CLOSED with and without a dropped segment, ERROR
frames, odd lengths) to random request types; both implementations decode it
with the client's own Shm class, and the results (each Shm's slots), the
context's table and the fallback's calls must be the same.  The constants the
kernels read must be the protocol's.
"""
from __future__ import annotations

import importlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc import _pure
from poolsvc._pure import wire as pure_wire
from poolsvc.errors import BadParameters
from poolsvc.service import protocol as P
from poolsvc.service.objects import Shm

OK, ERROR = int(P.MsgType.OK), int(P.MsgType.ERROR)
TYPES = [int(P.MsgType.ALLOC), int(P.MsgType.SHM_CLOSE), int(P.MsgType.PING), int(P.MsgType.SHM_FROM_ID)]
SLOTS = ("context", "id", "size", "cookie", "_desc", "_pages", "_refs", "_user_view", "_views")


@pytest.fixture(scope="module")
def compiled() -> Any:
    try:
        return importlib.import_module("poolsvc._core")
    except ImportError as exc:  # pragma: no cover - depends on the build
        pytest.skip(f"compiled core not built: {exc}")


def desc_body(cookie: int, bits: int, extra: int = 0) -> bytes:
    return P.DESC.pack(cookie, cookie % 7 - 1, 4096 * (cookie % 3 + 1), 0x40000000 + cookie * 4096,
                       0x40000000 + cookie * 4096, 8192, 0, 0, 1, cookie % 5, 0x11, 0, bits) + bytes(extra)


#: One reply frame: (frame type, body), by what it stands for.
frames = st.one_of(
    st.builds(lambda c, b: (OK, desc_body(c, b)), st.integers(1, 40), st.sampled_from([0, 1, 2, 3, 4, 8, 12])),
    st.builds(lambda c: (OK, desc_body(c, 0, 8)), st.integers(1, 40)),
    st.builds(lambda d: (OK, P.CLOSED.pack(1, d)), st.sampled_from([0, 0, 3])),
    st.builds(lambda n: (OK, bytes(n)), st.integers(0, 80)),
    st.just((ERROR, P.error_body(BadParameters("refused")))),
)
replies = st.lists(st.tuples(frames, st.sampled_from(TYPES)), max_size=20)


def decode(impl: Any, items: list[tuple[tuple[int, bytes], int]], held: list[int],
           sent: int | None = None) -> Any:
    """Decode with ``impl``: (results as comparable values, the table's cookies, fallback calls)
    or the error's type and message."""
    reply = b"".join(P.frame(t, body) for (t, body), _ in items)
    kinds = [(msg_type, None) for _, msg_type in items]
    context = object()
    shms: dict[int, Any] = {c: f"held {c}" for c in held}
    calls: list[tuple[int, int, int, int]] = []

    def fallback(i: int, frame_type: int, start: int, end: int) -> Any:
        calls.append((i, frame_type, start, end))
        return ("fallback", i)
    try:
        results = impl._batch_results(reply, len(items) if sent is None else sent, P.MAX_REPLY_FRAME,
                                      kinds, context, shms, Shm, fallback)
    except Exception as exc:  # noqa: BLE001 - the oracle compares every error
        return type(exc).__name__, str(exc)
    out = []
    for r in results:
        if isinstance(r, Shm):
            assert r.context is context and shms[r.cookie] is r
            out.append(tuple(getattr(r, name) for name in SLOTS if name != "context"))
        else:
            out.append(r)
    return out, sorted(shms), calls


@given(replies, st.lists(st.integers(1, 40), max_size=5))
def test_the_kernel_agrees_with_the_twin(compiled: Any, items: Any, held: list[int]) -> None:
    assert decode(compiled, items, held) == decode(_pure, items, held)


@pytest.mark.parametrize("sent", [0, 2, 4])
def test_a_reply_with_the_wrong_frame_count_is_refused_alike(compiled: Any, sent: int) -> None:
    items = [((OK, desc_body(5, 0)), TYPES[0]), ((OK, P.CLOSED.pack(1, 0)), TYPES[1]),
             ((OK, desc_body(6, 0)), TYPES[0])]
    got = decode(compiled, items, [], sent)
    assert got == decode(_pure, items, [], sent)
    assert got[0] == "ProtocolError"


def test_a_plain_desc_makes_the_shm_the_constructor_makes() -> None:
    """The new Shm's slots are those of ``Shm(context, desc, None, None)``."""
    body = desc_body(9, 0)
    for impl in (_pure, importlib.import_module("poolsvc._backend").core):
        results, cookies, calls = decode(impl, [((OK, body), TYPES[0])], [])
        made = Shm(object(), P.DESC.unpack(body), None, None)
        assert results == [tuple(getattr(made, name) for name in SLOTS if name != "context")]
        assert cookies == [9] and calls == []


def test_the_constants_are_the_protocols() -> None:
    assert (pure_wire.PING, pure_wire.SHM_CLOSE) == (int(P.MsgType.PING), int(P.MsgType.SHM_CLOSE))
    assert (pure_wire.REPLY_OK, pure_wire.REPLY_ERROR) == (OK, ERROR)
    assert pure_wire._DESC.format == P.DESC.format and pure_wire._CLOSED.format == P.CLOSED.format
    assert pure_wire._DESC_EXTRAS == int(P.DescBits.PAGES_FOLLOW) | int(P.DescBits.NEW_SEGMENT)


class _DroppedIsPlain:
    """A planted bug: a CLOSED that dropped a segment is taken as a plain one (None)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_pure, name)

    @staticmethod
    def _batch_results(reply: Any, sent: int, max_frame: int, kinds: Any, context: Any, shms: Any,
                       shm_type: Any, fallback: Any) -> list[Any]:
        def plain_close(i: int, frame_type: int, start: int, end: int) -> Any:
            if frame_type == OK and kinds[i][0] == int(P.MsgType.SHM_CLOSE) and end - start == 8:
                return None
            return fallback(i, frame_type, start, end)
        return _pure._batch_results(reply, sent, max_frame, kinds, context, shms, shm_type, plain_close)


def test_the_oracle_catches_a_planted_bug() -> None:
    items = [((OK, P.CLOSED.pack(1, 3)), int(P.MsgType.SHM_CLOSE))]
    assert decode(_DroppedIsPlain(), items, []) != decode(_pure, items, [])
    items = [((OK, P.CLOSED.pack(1, 0)), int(P.MsgType.SHM_CLOSE))]
    assert decode(_DroppedIsPlain(), items, []) == decode(_pure, items, [])
