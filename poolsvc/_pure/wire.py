"""Framing of batched requests (BATCH / BATCH_REPLY bodies): the plain-Python twin.

Owns: splitting a batch body into frames (every header checked before any
frame is returned or run), running a batch's frames through per-type
handlers into one reply body, and, at the client's end, the results of a
BATCH_REPLY (``_batch_results``: the new Shm objects of plain DESC replies,
None for plain CLOSED ones, a callback for the rest).  The policy (what a frame means, which types
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


#: Message types and sizes the client's end reads (protocol.MsgType.PING, SHM_CLOSE; the
#: DESC and CLOSED bodies; DescBits.PAGES_FOLLOW | NEW_SEGMENT).
PING, SHM_CLOSE = 8, 18
_DESC = struct.Struct("<QqQQQQQIIIHBB")
_DESC_EXTRAS = 8 | 4
_CLOSED = struct.Struct("<II")


def _batch_results(reply: Any, sent: int, max_frame: int, kinds: list[tuple[int, Any]], context: Any,
                   shms: dict[int, Any], shm_type: Any, fallback: Callable[[int, int, int, int], Any]) -> list[Any]:
    """The results of a BATCH_REPLY body to ``sent`` requests (``Batch.run``'s decoding).

    ``reply`` is split as ``split_frames(reply, sent, max_frame)`` does (its
    errors), and must hold ``sent`` frames (ProtocolError otherwise).  Frame
    ``i`` answers a request of type ``kinds[i][0]``; its result is:
      - a new ``shm_type(context, desc, None, None)`` for an OK frame of exactly
        a DESC whose bits name no pages and no new segment and whose cookie is
        not in ``shms``, to a request that is not SHM_CLOSE or PING (``desc``
        the DESC tuple), and ``shms[cookie]`` is it;
      - None for an OK frame of a CLOSED that dropped no segment, to SHM_CLOSE;
      - otherwise ``fallback(i, frame_type, start, end)``.
    """
    frames = split_frames(reply, sent, max_frame)
    if len(frames) != sent:
        raise ProtocolError(f"BATCH_REPLY holds {len(frames)} replies for {sent} requests")
    if len(kinds) < sent:
        raise BadParameters(f"{len(kinds)} request types for {sent} replies")
    results: list[Any] = []
    for i, (frame_type, start, end) in enumerate(frames):
        msg_type = kinds[i][0]
        if frame_type == REPLY_OK:
            if msg_type == SHM_CLOSE:
                if end - start == _CLOSED.size and _CLOSED.unpack_from(reply, start)[1] == 0:
                    results.append(None)
                    continue
            elif msg_type != PING and end - start == _DESC.size:
                desc = _DESC.unpack_from(reply, start)
                if not desc[12] & _DESC_EXTRAS and desc[0] not in shms:
                    shm = shms[desc[0]] = shm_type(context, desc, None, None)
                    results.append(shm)
                    continue
        results.append(fallback(i, frame_type, start, end))
    return results
