"""Plain-Python reference of ``ext/slotserve.pyx``: the daemon's end of one shm
slot request, served end to end when every frame in it is one the kernel owns.

:func:`serve_slot` makes the slot's checks (the sequence must be the next
one, the length must fit the request area), copies the request out of the
shared mapping, runs its frames (each header checked, the ``max_output``
rule) while each is one it owns (PING, and ALLOC and SHM_CLOSE of the
connection's ``ShmRequests``, each by the daemon's own handler), and writes
the reply area, ``rep_len``, ``rep_seq``, fences, reads ``client_sleeping``
and rings the doorbell (:func:`ring_doorbell`: a non-blocking send when
nothing is queued on the socket).  :func:`ready_slots` is the loop's polling
scan, :func:`serve_ready` its turn over the ready slots.  Anything else (BATCH, another type, a bad
frame, replies over ``max_output``, descriptors to send, replies that do
not fit the reply area) is handed over to the daemon's Python frame loop
(``SlotServing._slot_frames``) at the frame where it stopped, with the
replies so far.  Contract: docs/core.md, "The daemon's slot requests".

Concurrency: the daemon's loop thread only; the client process writes its
line of the slot at any moment (each word is read once per decision).
"""
from __future__ import annotations

import socket
import time
from typing import Any

from ..errors import ProtocolError
from .fastpath import ShmRequests, serve_alloc, serve_shm_close

_MSG_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def _bind() -> dict[str, Any]:
    """The daemon's names this twin uses (imported on first use: they import the backend)."""
    from ..service import protocol as P
    from ..service import slot as S
    from ..service.connection import READY
    from ..service.handlers import Handlers

    return {"S": S, "READY": READY, "header": P.HEADER, "doorbell": P.DOORBELL_FRAME,
            "OK": int(P.MsgType.OK), "ERROR": int(P.MsgType.ERROR),
            "owners": {int(P.MsgType.PING): Handlers._op_ping, int(P.MsgType.ALLOC): serve_alloc,
                       int(P.MsgType.SHM_CLOSE): serve_shm_close},
            "PING": int(P.MsgType.PING)}


_names: dict[str, Any] = {}


def _owned(handler: Any, msg_type: int, server: Any, conn: Any) -> bool:
    """Whether the kernel serves a frame of ``msg_type`` whose handler is ``handler``: the
    daemon's own (bound to ``server``), and for ALLOC and SHM_CLOSE with this twin's
    ShmRequests."""
    fn = _names["owners"].get(msg_type)
    if fn is None or getattr(handler, "__self__", None) is not server \
            or getattr(handler, "__func__", None) is not fn:
        return False
    return msg_type == _names["PING"] or type(conn.shm_requests) is ShmRequests


def serve_slot(server: Any, conn: Any, bells: list[Any] | None) -> bool | tuple[bytes, int, bytearray]:
    """Serve the request published in ``conn``'s slot, if a new one is: False if there
    is nothing to serve now, True once served (or refused as a violation), else
    ``(data, pos, out)`` for ``SlotServing._slot_frames`` (see ext/slotserve.pyx)."""
    if not _names:
        _names.update(_bind())
    S = _names["S"]
    words = conn.words
    if words is None or conn.state != _names["READY"] or conn.batch is not None:
        return False
    seq = words[S.W_REQ_SEQ]
    expected = conn.seq + 1
    if seq != expected:
        if seq == conn.seq:
            return False
        server._violation(conn, ProtocolError(f"slot request sequence {seq}, expected {expected}"))
        server._flush(conn)
        return True
    max_output = server._max_output
    if conn.out_bytes > max_output:
        return False  # the client must read its socket first
    length = words[S.W_REQ_LEN]
    header = _names["header"]
    if not header.size <= length <= S.SLOT_REQ_CAP:
        server._violation(conn, ProtocolError(
            f"slot request length {length} is outside {header.size}..{S.SLOT_REQ_CAP}"))
        server._flush(conn)
        return True
    data = conn.slot.mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + length]  # a copy: the client may scribble
    conn.seq = seq
    max_frame = server._max_frame
    out = bytearray()
    pos = 0
    while pos < length:
        if length - pos < header.size:
            return data, pos, out
        blen, msg_type, flags = header.unpack_from(data, pos)
        handler = conn.handlers.get(msg_type)
        if blen > max_frame or flags or length - pos - header.size < blen or len(out) > max_output \
                or not _owned(handler, msg_type, server, conn):
            return data, pos, out
        start = pos + header.size
        pos = start + blen
        t0 = time.perf_counter_ns()
        conn.requests += 1
        held = len(server._reply_fds)
        try:
            reply, reply_type = handler(conn, data[start:pos]), _names["OK"]
        except Exception as exc:
            reply, reply_type = server._failed(conn, msg_type, exc, held), _names["ERROR"]
        server.metrics.record(msg_type, time.perf_counter_ns() - t0)
        frame = header.pack(len(reply), reply_type, 0) + reply
        out += frame
        if len(out) > S.SLOT_REP_CAP:  # too long for the slot: the Python loop queues it
            return data, pos, out
        if conn.state != _names["READY"]:
            return data, length, out  # no further frame runs
    if server._reply_fds or conn.slot is None or conn.words is None:
        return data, pos, out  # descriptors go on the socket first
    n = len(out)
    conn.slot.mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + n] = out
    words[S.W_REP_LEN] = n
    words[S.W_REP_SEQ] = seq
    S.fence()
    if words[S.W_CLIENT_SLEEPING]:
        if conn.out:
            server._queue(conn, _names["doorbell"])
        elif bells is not None:
            bells.append(conn)
        else:
            ring_doorbell(server, conn)
    if conn.out:
        server._flush(conn)
    return True


def ring_doorbell(server: Any, conn: Any) -> None:
    """Send the DOORBELL frame to ``conn``'s client: one non-blocking send when nothing
    is queued on its socket; what is not sent that way is queued and written as any reply."""
    if not _names:
        _names.update(_bind())
    doorbell = _names["doorbell"]
    sent = 0
    if not conn.out:
        try:
            sent = conn.sock.send(doorbell, _MSG_FLAGS)
        except OSError:
            sent = 0
        if sent == len(doorbell):
            return
    server._queue(conn, doorbell[sent:])
    server._write(conn)


def ready_slots(polled: dict[Any, None]) -> list[Any]:
    """The connections of ``polled`` (keys: connections with a mapped slot) whose slot's
    ``req_seq`` differs from ``conn.seq``, in ``polled``'s order."""
    if not _names:
        _names.update(_bind())
    w_req_seq = _names["S"].W_REQ_SEQ
    return [conn for conn in polled if conn.words[w_req_seq] != conn.seq]


def serve_ready(server: Any, polled: dict[Any, None], bells: list[Any], now: float) -> int:
    """The loop's turn over the polled slots: serve each one :func:`ready_slots` gives
    (:func:`serve_slot`, and ``server._slot_frames`` for the rest of a request handed
    over), and set ``conn.served_at = now`` for each one served.  How many were."""
    served = 0
    for conn in ready_slots(polled):
        done = serve_slot(server, conn, bells)
        if done is False:
            continue
        if done is not True:
            data, pos, out = done
            server._slot_frames(conn, data, pos, out, conn.seq)
        served += 1
        conn.served_at = now
    return served


__all__ = ["ready_slots", "ring_doorbell", "serve_ready", "serve_slot"]
