"""Framing of batched requests (BATCH / BATCH_REPLY bodies): the plain-Python twin.

Owns: splitting a batch body into frames (every header checked before any
frame is returned or run) and running a batch's frames through per-type
handlers into one reply body.  The policy (what a frame means, which types
may be batched, the error bodies) belongs to the caller: ``run_batch`` only
walks frames, calls back, and frames the replies.  Compiled twin:
``ext/wire.pyx``; contract: ``docs/core.md`` (section "wire").

A frame is an 8-byte header, ``u32 length, u16 type, u16 flags`` (little
endian), then ``length`` body bytes (docs/protocol.md).
"""
from __future__ import annotations

import operator
import struct
from typing import Any, Callable

from ..errors import BadParameters, ProtocolError

_HEADER = struct.Struct("<IHH")
HEADER_SIZE = 8
#: Reply frame types (the wire protocol's MsgType.OK and MsgType.ERROR).
REPLY_OK, REPLY_ERROR = 3, 4


def _limits(limit: Any, max_frame: Any) -> tuple[int, int]:
    """``limit`` and ``max_frame`` as ints (``__index__``: TypeError otherwise, as the
    compiled twin's conversion), BadParameters if either is negative."""
    lim, mf = operator.index(limit), operator.index(max_frame)
    if lim < 0 or mf < 0:
        raise BadParameters(f"limit {limit!r} and max_frame {max_frame!r} must not be negative")
    return lim, mf


def split_frames(body: Any, limit: int, max_frame: int) -> list[tuple[int, int, int]]:
    """``(type, start, end)`` of each frame's body in a batch body.

    ``body``: any bytes-like object.  ``limit``: the most frames allowed;
    ``max_frame``: the largest body a frame may announce.  Every header is
    checked before anything is returned.  Raises ProtocolError for a
    truncated header or body, an oversized frame, non-zero flags, or more
    than ``limit`` frames.
    """
    limit, max_frame = _limits(limit, max_frame)
    with memoryview(body) as view:
        data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        frames: list[tuple[int, int, int]] = []
        pos, end = 0, len(data)
        while pos < end:
            if end - pos < HEADER_SIZE:
                raise ProtocolError(f"batch ends with a truncated header of {end - pos} bytes")
            length, msg_type, flags = _HEADER.unpack_from(data, pos)
            if length > max_frame:
                raise ProtocolError(f"frame of type {msg_type} announces {length} bytes, "
                                    f"more than the limit {max_frame}")
            if flags:
                raise ProtocolError(f"frame of type {msg_type} has flags {flags:#x}; "
                                    "the protocol defines none")
            pos += HEADER_SIZE
            if end - pos < length:
                raise ProtocolError(f"batch frame {len(frames)} of type {msg_type} announces "
                                    f"{length} bytes but only {end - pos} remain")
            if len(frames) >= limit:
                raise ProtocolError(f"batch holds more than {limit} requests")
            frames.append((msg_type, pos, pos + length))
            pos += length
        return frames


def run_batch(body: Any, limit: int, max_frame: int,
              handlers: dict[int, Callable[[Any, bytes], Any]], conn: Any,
              refuse: Callable[[Any, int, bool], Any],
              on_error: Callable[[Any, int, Exception], Any],
              max_output: int, counts: dict[int, int]) -> bytes:
    """Run every frame of a batch body; the reply body (one reply frame per request).

    The body is split first (``split_frames``: a malformed batch runs
    nothing).  Then, in order, each frame of type ``t``:
      - ``handlers[t](conn, body_bytes)`` when ``t`` has a handler and the
        reply so far is at most ``max_output`` bytes; its return value (bytes)
        becomes an OK reply frame, or, if it raises an Exception ``exc``,
        ``on_error(conn, t, exc)`` becomes an ERROR reply frame;
      - otherwise ``refuse(conn, t, t not in handlers)`` becomes an ERROR frame
        (no handler: the type may not be batched; else the output limit).
    ``counts[t]`` grows by one per frame, run or refused (``counts``: a dict or
    a subclass such as Counter, updated with dict's own get and set).  Returns
    the concatenated reply frames.  Raises what ``split_frames`` raises, and
    whatever BaseException (not Exception) a callback raises.  The arguments are
    checked first, in the compiled twin's order: ``handlers`` exactly a dict
    (TypeError), ``limit`` and ``max_frame`` ints (TypeError) not negative
    (BadParameters), ``max_output`` an int (TypeError), ``counts`` a dict
    (BadParameters).
    """
    if type(handlers) is not dict:
        raise TypeError(f"Argument 'handlers' has incorrect type (expected dict, "
                        f"got {type(handlers).__name__})")
    limit, max_frame = _limits(limit, max_frame)
    max_output = operator.index(max_output)
    if not isinstance(counts, dict):
        raise BadParameters(f"counts must be a dict, got {type(counts).__name__}")
    frames = split_frames(body, limit, max_frame)
    with memoryview(body) as view:
        data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        parts: list[bytes] = []
        size = 0
        for msg_type, start, end in frames:
            handler = handlers.get(msg_type)
            if handler is not None and size <= max_output:
                try:
                    reply = bytes(handler(conn, bytes(data[start:end])))
                    code = REPLY_OK
                except Exception as exc:
                    reply = bytes(on_error(conn, msg_type, exc))
                    code = REPLY_ERROR
            else:
                reply = bytes(refuse(conn, msg_type, handler is None))
                code = REPLY_ERROR
            parts.append(_HEADER.pack(len(reply), code, 0))
            parts.append(reply)
            size += HEADER_SIZE + len(reply)
            dict.__setitem__(counts, msg_type, dict.get(counts, msg_type, 0) + 1)
        return b"".join(parts)
