#!/usr/bin/env python3
"""Coverage-guided fuzzing of the service protocol's decoders
(``poolsvc/service/protocol.py``).

Run: ``python tests/fuzz/fuzz_protocol.py [libFuzzer flags] [corpus dirs]``
(docs/fuzzing.md).  Seed corpus: ``tests/fuzz/corpus/protocol/``.

Input layout (little-endian), :func:`encode` writes it::

    u16 pos, u32 max_frame, u16 limit, then the wire bytes

Each input checks, on the wire bytes:

- ``parse_header(buf, pos, max_frame)``: the header's ``(length, type)`` or
  a ProtocolError, nothing else;
- ``iter_frames(buf, limit, max_frame)``: the frames both kernels'
  ``split_frames`` give (compiled and pure), or the same error;
- ``error_from_body(buf)``: returns (never raises) a PoolsvcError, and
  ``error_body`` of it decodes to the same class, message, TEE code and extra;
- ``decode_name(buf[:limit])``: a str or a ProtocolError; an accepted name
  encodes back to the same bytes (``encode_name``);
- ``type_name`` of the header's type: a str.
"""
from __future__ import annotations

import struct

import fuzzlib
from fuzzlib import Finding, agree, outcome

with fuzzlib.instrumented():
    from poolsvc import _core as compiled
    from poolsvc import _pure as pure
    from poolsvc import errors
    from poolsvc.service import protocol as P

HEAD = struct.Struct("<HIH")


def encode(wire: bytes, pos: int = 0, max_frame: int = P.DEFAULT_MAX_FRAME, limit: int = 64) -> bytes:
    """One input (the layout of the module docstring)."""
    return HEAD.pack(pos, max_frame, limit) + wire


def decode(data: bytes) -> tuple[int, int, int, bytes]:
    """``(pos, max_frame, limit, wire bytes)`` of an input."""
    head = data[:HEAD.size]
    pos, max_frame, limit = HEAD.unpack(head + bytes(HEAD.size - len(head)))
    return pos, max_frame, limit, data[HEAD.size:]


def _check_header(wire: bytes, pos: int, max_frame: int) -> None:
    header = outcome("parse_header", P.parse_header, wire, pos, max_frame)
    if header[0] != "ok":
        if header[1] != "ProtocolError":
            raise Finding(f"parse_header raised {header[1]}: {header[2]}")
        return
    length, msg_type, flags = P.HEADER.unpack_from(wire, pos)
    if header[1] != ("tuple", [length, msg_type]) or length > max_frame or flags:
        raise Finding(f"parse_header accepts {header[1]} from the header {(length, msg_type, flags)}")
    if not isinstance(P.type_name(msg_type), str):
        raise Finding(f"type_name({msg_type}) is not a str")


def _frames(body: bytes, limit: int, max_frame: int) -> list[tuple[int, bytes]]:
    return [(t, bytes(b)) for t, b in P.iter_frames(body, limit, max_frame)]


def _split(split_frames, body: bytes, limit: int, max_frame: int) -> list[tuple[int, bytes]]:
    return [(t, body[start:end]) for t, start, end in split_frames(body, limit, max_frame)]


def _check_frames(wire: bytes, limit: int, max_frame: int) -> None:
    frames = outcome("iter_frames", _frames, wire, limit, max_frame)
    for mod in (compiled, pure):
        agree(f"iter_frames and {mod.__name__}.split_frames", frames,
              outcome(f"{mod.__name__} split_frames", _split, mod.split_frames, wire, limit, max_frame))


def _check_error_body(wire: bytes) -> None:
    try:
        exc = P.error_from_body(wire)
    except Exception as raised:
        raise Finding(f"error_from_body raised {type(raised).__name__}: {raised}") from raised
    if not isinstance(exc, errors.PoolsvcError):
        raise Finding(f"error_from_body gave {exc!r}, not a PoolsvcError")
    again = outcome("error_from_body(error_body(...))", lambda: P.error_from_body(P.error_body(exc)))
    back = again[1] if again[0] == "ok" else None
    if type(back) is not type(exc):
        raise Finding(f"{exc!r} travels back as {again!r}")
    if len(str(exc).encode("utf-8", "replace")) <= P.MAX_MESSAGE and str(back) != str(exc):
        raise Finding(f"the message of {exc!r} travels back as {str(back)!r}")
    for attr in ("needed", "code", "origin"):
        if getattr(back, attr, None) != getattr(exc, attr, None):
            raise Finding(f"{attr} of {exc!r} travels back as {getattr(back, attr, None)!r}")


def _check_name(raw: bytes) -> None:
    name = outcome("decode_name", P.decode_name, raw)
    if name[0] != "ok":
        if name[1] != "ProtocolError":
            raise Finding(f"decode_name raised {name[1]}: {name[2]}")
        return
    if outcome("encode_name", P.encode_name, name[1]) != ("ok", raw):
        raise Finding(f"the name {name[1]!r} does not encode back to {raw!r}")


def test_one_input(data: bytes) -> None:
    pos, max_frame, limit, wire = decode(data)
    _check_header(wire, pos, max_frame)
    _check_frames(wire, limit, max_frame)
    _check_error_body(wire)
    _check_name(wire[:limit])


def seeds() -> dict[str, bytes]:
    """Wire bytes made with the project's encoders (``frame``, ``error_body``, the body structs)."""
    hello = P.HELLO2.pack(P.MAGIC, P.VERSION_2, P.Role.CONTEXT, P.Feature.SHM_SLOT) + P.encode_name("fuzz")
    batch = (P.frame(P.MsgType.PING, b"ping") + P.frame(P.MsgType.ALLOC, P.ALLOC.pack(P.AllocKind.USER, 4096))
             + P.frame(P.MsgType.SHM_CLOSE, P.COOKIE.pack(5)))
    return {
        "hello": encode(P.frame(P.MsgType.HELLO, hello)),
        "batch": encode(batch, pos=len(P.frame(P.MsgType.PING, b"ping")), limit=3),
        "error-short-buffer": encode(P.error_body(errors.ShortBuffer("output needs 64 bytes", 64))),
        "error-tee": encode(P.error_body(errors.TeeError("refused by the app", 0xFFFF0006, 4))),
        "error-limit": encode(P.error_body(P.LimitExceeded("client holds 9 of 8 ids"))),
        "name": encode("poolsvc-клиент".encode(), limit=64),
    }


if __name__ == "__main__":
    fuzzlib.run(test_one_input)
