"""Batch framing kernels (``split_frames``, ``run_batch``): compiled against the pure twin.

Bodies are built from random frames, then damaged at random (truncated, a
length or flag byte changed, bytes appended); both backends must return the
same frames or raise the same ProtocolError, and ``run_batch`` must call the
same handlers with the same bodies, in the same order, and return the same
reply body, whatever the handlers return or raise.
"""
from __future__ import annotations

import struct
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc.errors import BadParameters, ProtocolError
from poolsvc.service import protocol as P

HEADER = struct.Struct("<IHH")

frames_st = st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=12)


def encode(frames) -> bytes:
    return b"".join(HEADER.pack(len(body), t, 0) + body for t, body in frames)


@st.composite
def bodies(draw):
    """A batch body, well-formed or damaged in one of several ways."""
    body = bytearray(encode(draw(frames_st)))
    damage = draw(st.sampled_from(["none", "truncate", "poke", "append"]))
    if damage == "truncate" and body:
        del body[draw(st.integers(0, len(body) - 1)):]
    elif damage == "poke" and body:
        body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    elif damage == "append":
        body += draw(st.binary(min_size=1, max_size=9))
    return bytes(body)


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except ProtocolError as exc:
        return ("ProtocolError", str(exc))


@given(body=bodies(), limit=st.integers(0, 14), max_frame=st.integers(0, 48))
def test_split_frames_agrees_with_the_twin(compiled, pure, body, limit, max_frame):
    got = outcome(compiled.split_frames, body, limit, max_frame)
    assert got == outcome(pure.split_frames, body, limit, max_frame)
    if got[0] == "ok":  # the frames tile the body exactly
        pos = 0
        for t, start, end in got[1]:
            assert HEADER.unpack_from(body, pos) == (end - start, t, 0)
            pos = end
        assert pos == len(body)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_split_frames_takes_any_bytes_like(core, kind):
    body = encode([(7, b"abc"), (9, b"")])
    assert core.split_frames(kind(body), 2, 10) == [(7, 8, 11), (9, 19, 19)]


def test_split_frames_errors_say_what(core):
    body = encode([(7, b"abcd")])
    with pytest.raises(ProtocolError, match="truncated header of 3 bytes"):
        core.split_frames(body + b"xyz", 5, 10)
    with pytest.raises(ProtocolError, match="announces 4 bytes, more than the limit 3"):
        core.split_frames(body, 5, 3)
    with pytest.raises(ProtocolError, match="frame 0 of type 7 announces 4 bytes but only 2 remain"):
        core.split_frames(body[:-2], 5, 10)
    with pytest.raises(ProtocolError, match="has flags 0x1"):
        core.split_frames(HEADER.pack(0, 7, 1), 5, 10)
    with pytest.raises(ProtocolError, match="more than 1 requests"):
        core.split_frames(body + body, 1, 10)
    with pytest.raises(BadParameters, match="must not be negative"):
        core.split_frames(body, -1, 10)
    assert core.split_frames(b"", 0, 0) == []


class Recorder:
    """Handlers, refusal and error callbacks that log every call and answer from a plan."""

    def __init__(self, plan):
        self.plan = plan  # per type: "echo", "reverse", "fail", "raise-base", or None (no handler)
        self.calls: list[tuple] = []

    def handlers(self):
        out = {}
        for t, action in self.plan.items():
            if action is not None:
                out[t] = self.make(action)
        return out

    def make(self, action):
        def handler(conn, body):
            assert type(body) is bytes
            self.calls.append(("run", conn, body))
            if action == "fail":
                raise ValueError(f"refused {body!r}")
            if action == "raise-base":
                raise KeyboardInterrupt
            return body if action == "echo" else bytearray(body[::-1])
        return handler

    def refuse(self, conn, t, unbatchable):
        self.calls.append(("refuse", t, unbatchable))
        return b"R" + bytes([unbatchable])

    def on_error(self, conn, t, exc):
        self.calls.append(("error", t, str(exc)))
        return memoryview(b"E" + str(exc).encode())


@given(frames=frames_st.map(lambda fs: [(t % 4, b) for t, b in fs]),
       plan=st.fixed_dictionaries({t: st.sampled_from([None, "echo", "reverse", "fail"]) for t in range(4)}),
       max_output=st.integers(-1, 200), limit=st.integers(0, 14))
def test_run_batch_agrees_with_the_twin(compiled, pure, frames, plan, max_output, limit):
    body = encode(frames)
    results = []
    for core in (compiled, pure):
        rec = Recorder(plan)
        counts: Counter[int] = Counter()
        got = outcome(core.run_batch, body, limit, 64, rec.handlers(), "conn", rec.refuse, rec.on_error,
                      max_output, counts)
        results.append((got, rec.calls, counts))
    assert results[0] == results[1]
    got, calls, counts = results[0]
    if got[0] == "ok":
        replies = pure.split_frames(got[1], len(frames), 1 << 20)
        assert len(replies) == len(frames)
        assert counts == Counter(t for t, _ in frames)
        assert {t for t, _, _ in replies} <= {P.MsgType.OK, P.MsgType.ERROR}
    else:
        assert calls == [] and not counts  # a malformed batch runs nothing


def test_run_batch_output_limit_and_base_exceptions(core):
    body = encode([(1, b"x" * 10), (1, b"y" * 10), (1, b"z")])
    rec = Recorder({1: "echo"})
    reply = core.run_batch(body, 8, 64, rec.handlers(), None, rec.refuse, rec.on_error, 12, {})
    # the first reply (8 + 10 bytes) takes the output over 12: the next two are refused
    assert [c[0] for c in rec.calls] == ["run", "refuse", "refuse"]
    assert core.split_frames(reply, 3, 64) == [(P.MsgType.OK, 8, 18), (P.MsgType.ERROR, 26, 28),
                                              (P.MsgType.ERROR, 36, 38)]
    rec = Recorder({1: "raise-base"})
    with pytest.raises(KeyboardInterrupt):
        core.run_batch(body, 8, 64, rec.handlers(), None, rec.refuse, rec.on_error, 1 << 20, {})
    with pytest.raises(BadParameters, match="counts must be a dict"):
        core.run_batch(body, 8, 64, {}, None, rec.refuse, rec.on_error, 1 << 20, [])


def test_reply_codes_are_the_protocol_ones(pure):
    from poolsvc._pure import wire

    assert (wire.REPLY_OK, wire.REPLY_ERROR) == (P.MsgType.OK, P.MsgType.ERROR)
