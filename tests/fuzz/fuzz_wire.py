#!/usr/bin/env python3
"""Coverage-guided fuzzing of the batch framing (``ext/wire.pyx``: ``split_frames``,
``run_batch``, against its twin ``poolsvc/_pure/wire.py``).

Run: ``python tests/fuzz/fuzz_wire.py [libFuzzer flags] [corpus dirs]``
(docs/fuzzing.md).  Seed corpus: ``tests/fuzz/corpus/wire/``.

Input layout (little-endian), :func:`encode` writes it::

    u16 limit, u32 max_frame, u32 max_output, u8 view, then the BATCH body

``view`` (mod 4) picks how the body is passed: bytes, bytearray, a
memoryview at a non-zero offset, or a memoryview of format ``H`` (when the
length is even).

Each input checks, compiled against pure: ``split_frames`` (the frames, or
the same error class and message), and ``run_batch`` with a fixed set of
handlers (an echo, one returning a bytearray, one raising ValueError, no
handler for the other types): the reply body, the ``counts`` dict, and the
sequence of callbacks with their arguments.  Any exception other than a
PoolsvcError escaping either is a finding, as is a reply body that
``split_frames`` cannot read back as one frame per request.
"""
from __future__ import annotations

import struct

import fuzzlib
from fuzzlib import Finding, agree, outcome

with fuzzlib.instrumented():
    from poolsvc import _core as compiled
    from poolsvc import _pure as pure
    from poolsvc.service import protocol as P

HEAD = struct.Struct("<HIIB")
#: Types with a handler: 8 echoes (reversed), 16 answers a bytearray, 18 raises.
ECHO, BYTEARRAY, RAISES = 8, 16, 18


def encode(body: bytes, limit: int = 64, max_frame: int = 1 << 16, max_output: int = 1 << 16,
           view: int = 0) -> bytes:
    """One input (the layout of the module docstring)."""
    return HEAD.pack(limit, max_frame, max_output, view) + body


def decode(data: bytes) -> tuple[int, int, int, int, bytes]:
    """``(limit, max_frame, max_output, view, body)`` of an input (a short head zero-padded)."""
    head = data[:HEAD.size]
    limit, max_frame, max_output, view = HEAD.unpack(head + bytes(HEAD.size - len(head)))
    return limit, max_frame, max_output, view % 4, data[HEAD.size:]


def _as_view(body: bytes, view: int):
    if view == 1:
        return bytearray(body)
    if view == 2:
        return memoryview(b"\xa5" + body)[1:]
    if view == 3 and len(body) % 2 == 0:
        return memoryview(body).cast("H")
    return body


class _Conn:
    """The ``conn`` run_batch passes to every callback; it records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []


def _handlers() -> dict:
    def echo(conn, body):
        conn.calls.append(("handler", ECHO, body))
        return body[::-1]

    def as_bytearray(conn, body):
        conn.calls.append(("handler", BYTEARRAY, body))
        return bytearray(struct.pack("<I", len(body)))

    def raises(conn, body):
        conn.calls.append(("handler", RAISES, body))
        raise ValueError(f"refused {body[:8].hex()}")

    return {ECHO: echo, BYTEARRAY: as_bytearray, RAISES: raises}


def _refuse(conn, msg_type, no_handler):
    conn.calls.append(("refuse", msg_type, no_handler))
    return struct.pack("<HB", msg_type, no_handler)


def _on_error(conn, msg_type, exc):
    conn.calls.append(("on_error", msg_type, type(exc).__name__, str(exc)))
    return f"{msg_type}:{exc}".encode()


def _run_batch(mod, body, limit, max_frame, max_output):
    conn = _Conn()
    counts = {ECHO: 5}
    reply = outcome(f"{mod.__name__} run_batch", mod.run_batch, body, limit, max_frame, _handlers(), conn,
                    _refuse, _on_error, max_output, counts)
    return reply, counts, conn.calls


def test_one_input(data: bytes) -> None:
    limit, max_frame, max_output, view, raw = decode(data)
    frames = agree("split_frames",
                   outcome("compiled split_frames", compiled.split_frames, _as_view(raw, view), limit, max_frame),
                   outcome("pure split_frames", pure.split_frames, _as_view(raw, view), limit, max_frame))
    c_reply, c_counts, c_calls = _run_batch(compiled, _as_view(raw, view), limit, max_frame, max_output)
    p_reply, p_counts, p_calls = _run_batch(pure, _as_view(raw, view), limit, max_frame, max_output)
    agree("run_batch", c_reply, p_reply)
    agree("run_batch: counts", ("ok", c_counts), ("ok", p_counts))
    agree("run_batch: callbacks", ("ok", c_calls), ("ok", p_calls))
    if frames[0] != c_reply[0]:
        raise Finding(f"split_frames gave {frames[:2]!r:.200} but run_batch {c_reply[:2]!r:.200}")
    if c_reply[0] == "ok":
        nframes = len(frames[1][1])
        replies = outcome("split_frames of the reply", compiled.split_frames, c_reply[1], nframes, 1 << 32)
        if replies[0] != "ok" or len(replies[1][1]) != nframes:
            raise Finding(f"the reply to {nframes} frames reads back as {replies!r:.300}")


def seeds() -> dict[str, bytes]:
    """Valid BATCH bodies made with the project's own encoders (``protocol.frame``)."""
    alloc = P.frame(P.MsgType.ALLOC, P.ALLOC.pack(P.AllocKind.USER, 8192))
    close = P.frame(P.MsgType.SHM_CLOSE, P.COOKIE.pack(7))
    ping = P.frame(P.MsgType.PING, b"ping")
    from_id = P.frame(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(3))
    return {
        "empty": encode(b""),
        "ping": encode(ping),
        "mixed": encode(ping + alloc + close + from_id + P.frame(P.MsgType.STATS), view=2),
        "output-limit": encode(ping * 6, max_output=20, view=1),
        "at-limit": encode(ping * 4, limit=4, view=3),
    }


if __name__ == "__main__":
    fuzzlib.run(test_one_input)
