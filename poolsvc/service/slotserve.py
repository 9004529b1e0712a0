"""The daemon's side of the shm slot: create it, serve requests from it, park it.

The slot's layout, the fence and the header both ends check are in
:mod:`.slot`; this module is the daemon's end.

Shm slots (protocol version 2): a connection may ask for a shared-memory
request/reply slot (``protocol`` documents the layout).  Nothing read from a
slot is trusted: sequence, length and every frame are checked, and the
request bytes are copied out before they are parsed.  A request is served by
the slot kernel (``core.serve_slot``: ext/slotserve.pyx, twin
poolsvc/_pure/slotserve.py) while its frames are PING, ALLOC and SHM_CLOSE,
and by the Python frame loop here (:meth:`SlotServing._slot_frames`) from
the first frame the kernel hands over (docs/core.md, "The daemon's slot
requests").

Polled and parked slots (:class:`SlotSet`).  The loop polls only the slots
that had a request recently; the others are *parked*: their
``daemon_sleeping`` word is 1, so their client rings the doorbell (its
eventfd, or a DOORBELL frame on its socket) after publishing a request, and
the ring puts the slot back among the polled ones.  The loop's work per turn
therefore grows with the clients that are active, not with those connected.
The rule that makes a lost wake-up impossible, for every slot, is the
Dekker handshake of ``protocol``:

- parking: set ``daemon_sleeping`` = 1, fence, read ``req_seq`` once more;
  a request that can be served now keeps the slot polled;
- the client: publish ``req_seq``, fence, read ``daemon_sleeping``; ring if 1;
- unparking (a ring, a drained socket, the end of a BATCH): the slot joins
  the polled set, then ``daemon_sleeping`` = 0.

Of "publish, fence, read the mark" and "mark, fence, read the sequence" one
side always sees the other: the daemon serves the request, or the client
rings.  A slot is parked when it has had no request for ``PARK_AFTER``
polling windows (``shm_spin_us``) and for ``PARK_AFTER`` times the mean gap
between one polled slot's requests lately (:func:`quiet_after`), and every
polled slot is parked before the loop blocks in epoll.  A slot whose request cannot be served now (its
client has more than ``max_output`` unread on the socket, or a BATCH of
its is being served in slices) is parked like an idle one and unparked when
that ends.  A client that rings at will only puts its own slot into the
polled set, from which it is parked again.

Turns.  At most ``SlotSet.cap`` slots (``max_polled_slots``) are polled, and
half as many while more than that wait (``SlotSet.limit``).
A ring, or the end of what kept a slot from being served, while every place
is taken queues the slot in ``_waiting`` (:meth:`SlotServing._admit`), a
:class:`~.connection.WaitQueue` of two lanes: slots whose last place was a
brief visit, and the others (a new slot starts parked while any waits, and
queues there).  While the bound is halved, the loop keeps one extra place,
EXTRA_TURN long, for the first slot of the brief lane
(:meth:`SlotServing._give_extra_place`).
While slots wait, a slot polled for ``slot_turn_us`` (and for
``slot_turn_requests`` requests, or TURN_STRETCH times as long; shorter while so
many wait that a round of turns would last over ``slot_round_us``), or one that
made no request for the TURN_STRETCH-th part of ``slot_turn_us``, is parked for the
next waiting one (:meth:`SlotServing._take_turns`, right after a
serving turn, so that the slot holds no request and its client's next one
rings); a slot found with a request after the mark keeps its place for a
later try, or, a whole turn late, joins the queue (its client saw the slot
polled: no ring comes).  While slots wait the loop neither parks idle slots
nor sleeps: the turns alone give places up.  Few clients then run many requests each with warm caches, instead
of every client one request per CPU turn (docs/protocol.md, "Turns").

The slot is a sealed memfd (:func:`~.provider.sealed_storage`): the client
maps it read-write but cannot shrink it under the daemon's mapping.

Concurrency: the daemon's loop thread only; the client process writes its
own line of the slot at any moment (see ``protocol``, "The shm slot").
"""
from __future__ import annotations

import array
import os
import select
import time
from functools import partial
from operator import attrgetter
from typing import Any, Callable

from .._backend import core
from ..errors import ProtocolError
from . import protocol as P
from . import slot as S
from .connection import CLOSING, READY, Connection, ServerParts, SlotSet, WaitQueue
from .provider import sealed_storage

#: A doorbell is edge-triggered: every write by the client is one event, and the
#: daemon never reads the counter (one system call fewer per ring).  The counter
#: would saturate after 2**64 - 2 rings; the client treats EAGAIN as "awake".
_BELL_EVENTS = select.EPOLLIN | select.EPOLLET
_HEADER_SIZE = P.HEADER_SIZE
_unpack_header = P.HEADER.unpack_from
_pack_header = P.HEADER.pack
_ERROR, _BATCH = int(P.MsgType.ERROR), int(P.MsgType.BATCH)
_W_REQ_SEQ, _W_CLIENT_SLEEPING = S.W_REQ_SEQ, S.W_CLIENT_SLEEPING
_W_REP_SEQ, _W_REP_LEN, _W_DAEMON_SLEEPING = S.W_REP_SEQ, S.W_REP_LEN, S.W_DAEMON_SLEEPING
_REP_OFF, _REP_CAP = S.SLOT_REP_OFF, S.SLOT_REP_CAP
_fence_acquire, _fence_release = S.fence_lock.acquire, S.fence_lock.release
_polled_at = attrgetter("polled_at")
_served_at = attrgetter("served_at")
#: Polling windows (``shm_spin_us``) without a request after which a slot is parked,
#: and as many mean gaps between one polled slot's requests (:func:`quiet_after`).
PARK_AFTER = 4
#: A turn short of its ``slot_turn_requests`` lasts at most this many times
#: ``slot_turn_us``.  A turn costs a sleep, a wake-up and a process warming its
#: caches again, paid once per turn: a client that spends long on each request
#: gets a longer turn to pay it over.  A slot with no request for
#: ``slot_turn_us / TURN_STRETCH`` while others wait gives its place up at once:
#: its client is not spending long on a request but idle, and an idle client
#: holds no place for the others' (nor its own start-up's) sake.
TURN_STRETCH = 4
#: The shortest turn a bound on the round (``slot_round_us``) makes, in seconds:
#: below it a turn would cost more in sleeps and wake-ups than it serves.
MIN_TURN = 1e-3
#: How long a slot keeps the extra place (:meth:`SlotServing._give_extra_place`),
#: in seconds: a brief visit's request or two take a fraction of it; a busy client
#: gets that much, counts as busy again, and queues in the full lane.
EXTRA_TURN = 1e-3


def quiet_after(park_after: float, polled: int, requests: int, seconds: float) -> float:
    """Seconds without a request after which a polled slot counts as idle: the
    longer of ``park_after`` (PARK_AFTER polling windows) and PARK_AFTER times
    the mean gap between one slot's requests while ``polled`` slots made
    ``requests`` in the last ``seconds``.  With more clients than CPUs a client
    waits its turn for a CPU between two requests; that gap grows with the
    clients, and a slot parked for it would make every request ring and sleep."""
    if requests <= 0 or seconds <= 0:
        return park_after
    return max(park_after, PARK_AFTER * polled * seconds / requests)


class Bell:
    """The epoll tag of a connection's eventfd doorbell."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn


class SlotServing(ServerParts):
    """Creating, serving and dropping the shm slots of version-2 connections."""

    def _make_slot(self, conn: Connection, bell: bool) -> None:
        """Create the connection's slot, and its eventfd doorbell if asked for.

        The descriptors go with WELCOME: the slot, then the eventfd.  A client
        wakes a sleeping daemon by writing to the eventfd rather than by a
        DOORBELL frame on the socket: a socket write wakes its reader with the
        "sync" hint, which tells the scheduler to run the daemon on the
        client's CPU; with two spinning parties on one CPU each hand-off then
        waits for a yield.  An eventfd wake-up carries no such hint, so the
        daemon resumes on its own (idle) CPU.
        """
        storage = sealed_storage(S.SLOT_BYTES, "poolsvc-slot")  # the client cannot resize it
        efd = fd = -1
        try:
            words = S.words_of(storage.mm)
            words[:6] = array.array("Q", S.slot_header())
            words[_W_DAEMON_SLEEPING] = 1  # parked until it is served (SlotSet.append)
            fd = os.dup(storage.fd)
            if bell:
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._ep_register(efd, _BELL_EVENTS, Bell(conn))
                bell_fd = os.dup(efd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if efd >= 0:
                self._ep_unregister(efd)
                os.close(efd)
            storage.close()
            raise
        conn.slot, conn.words, conn.seq, conn.bell = storage, words, 0, efd
        self._reply_fds.append(fd)
        if efd >= 0:
            self._reply_fds.append(bell_fd)

    def _drop_slot(self, conn: Connection) -> None:
        """Stop serving a connection's slot and unmap it (idempotent)."""
        if conn.bell >= 0:
            self._ep_unregister(conn.bell)
            os.close(conn.bell)
            conn.bell = -1
        if conn.slot is None:
            return
        self._waiting.discard(conn)
        if conn is self._guest:
            self._guest = None
        try:
            self._slots.remove(conn)
        except ValueError:
            pass
        if conn.words is not None:
            conn.words.release()
            conn.words = None
        conn.slot.close()
        conn.slot = None

    def _init_slots(self) -> None:
        """The slot state of a new daemon: no slot served, no doorbell pending."""
        self._slots = SlotSet(self.settings.polled_slots())
        #: Connections whose clients the loop rings once every ready slot is served.
        self._bells: list[Connection] = []
        #: The slot kernel, its doorbell and the loop's turn over the ready slots
        #: (``core.serve_slot`` / ``core.ring_doorbell`` / ``core.serve_ready``).
        self._slot_kernel: Callable[..., Any] = core.serve_slot
        self._ring: Callable[[Any, Connection], None] = core.ring_doorbell
        self._serve_ready: Callable[[Any, dict[Connection, None], list[Connection], float], int] = \
            core.serve_ready
        #: Parked slots waiting for a polled place (their clients rang), in two lanes.
        self._waiting = WaitQueue()
        self._turn = self.settings.slot_turn_us / 1e6
        self._turn_requests = self.settings.slot_turn_requests
        #: Seconds without a request after which a polled slot gives its place up
        #: while others wait (of the setting, not of a turn the round bound shortened).
        self._quiet = self._turn / TURN_STRETCH
        self._round = self.settings.slot_round_us / 1e6
        self._guest = None
        self._turn_at = 0.0

    def _serve_slot(self, conn: Connection) -> bool:
        """Run the request in ``conn``'s slot if a new one is published; True if one was.

        Nothing in the slot is trusted: the sequence must be the next one,
        the length must fit the request area, the bytes are copied out before
        they are parsed, and every frame is checked as on the socket.  A bad
        field is a protocol violation (ERROR on the socket, then hang-up).
        The slot kernel (``core.serve_slot``: ext/slotserve.pyx, twin
        poolsvc/_pure/slotserve.py) makes those checks and serves the
        requests it owns; it hands the rest of a request (from the first
        frame it does not serve) to :meth:`_slot_frames`.  The loop serves
        its ready slots the same way, in one call (``core.serve_ready``).
        """
        done = self._slot_kernel(self, conn, self._bells if self._defer_writes else None)
        if done is True or done is False:
            return done
        data, pos, out = done
        self._slot_frames(conn, data, pos, out, conn.seq)
        return True

    def _slot_frames(self, conn: Connection, data: bytes, pos: int, out: bytearray, seq: int) -> None:
        """Run the frames of slot request ``seq`` from ``pos`` on and publish the replies
        (``out`` holds those of the frames before ``pos``); a BATCH of more than a slice
        is served in slices, and the rest of the request runs when it is done."""
        length = len(data)
        max_frame = self._max_frame
        max_output = self._max_output
        request = self._request
        while pos < length:
            if length - pos < _HEADER_SIZE:
                self._violation(conn, ProtocolError(f"slot request ends with a truncated header of "
                                                    f"{length - pos} bytes"))
                self._flush(conn)
                return
            blen, msg_type, flags = _unpack_header(data, pos)
            if blen > max_frame or flags or length - pos - _HEADER_SIZE < blen:
                self._violation(conn, ProtocolError(
                    f"slot frame of type {msg_type} announces {blen} bytes with flags {flags:#x}; "
                    f"{length - pos - _HEADER_SIZE} remain (limit {max_frame})"))
                self._flush(conn)
                return
            start = pos + _HEADER_SIZE
            pos = start + blen
            if len(out) > max_output:
                exc = P.LimitExceeded(f"slot replies exceed {max_output} bytes (max_output); "
                                      "request not run")
                body = self._error(conn, msg_type, exc)
                out += _pack_header(len(body), _ERROR, 0) + body
                continue
            if msg_type == _BATCH and self._start_batch(
                    conn, data[start:pos], partial(self._slot_batch_done, data, pos, out, seq)):
                return
            out += request(conn, msg_type, data[start:pos])
            if conn.state != READY:
                break
        words = conn.words
        if words is None:  # dropped meanwhile (a violation)
            if conn.out or conn.state == CLOSING:
                self._flush(conn)
            return
        assert conn.slot is not None  # words and slot go together
        mm = conn.slot.mm
        if self._reply_fds:  # descriptors travel on the socket, ahead of the reply
            self._queue(conn, P.DOORBELL_FRAME)
        n = len(out)
        if n <= _REP_CAP:
            mm[_REP_OFF:_REP_OFF + n] = out
            words[_W_REP_LEN] = n
        else:
            self._queue(conn, bytes(out))
            words[_W_REP_LEN] = S.REP_ON_SOCKET
        words[_W_REP_SEQ] = seq
        _fence_acquire()  # fence(), inlined
        _fence_release()
        if words[_W_CLIENT_SLEEPING]:
            self._queue(conn, P.DOORBELL_FRAME)
        if conn.out or conn.state == CLOSING:
            self._flush(conn)

    def _slot_batch_done(self, data: bytes, pos: int, out: bytearray, seq: int, conn: Connection,
                         reply: bytes) -> None:
        """A BATCH of slot request ``seq`` is done: add its reply, run the frames after it."""
        out += reply
        self._slot_frames(conn, data, pos, out, seq)

    def _servable(self, conn: Connection) -> bool:
        """Whether ``conn``'s slot holds a request the loop would serve now (a client
        over ``max_output`` waits until it has read its socket)."""
        words = conn.words
        return (words is not None and words[_W_REQ_SEQ] != conn.seq and conn.state == READY
                and conn.batch is None and conn.out_bytes <= self._max_output)

    def _unpoll(self, conns: list[Connection]) -> None:
        """Take ``conns`` (polled members) out of the polled set, mark each "daemon
        sleeping", note whether its place was a brief visit (``conn.brief``), fence."""
        polled, note_visit = self._slots.polled, WaitQueue.note_visit
        for conn in conns:
            del polled[conn]
            conn.words[_W_DAEMON_SLEEPING] = 1  # type: ignore[index]
            note_visit(conn)
            if conn is self._guest:
                self._guest = None
        _fence_acquire()  # fence(), inlined
        _fence_release()

    def _park(self, conns: list[Connection]) -> bool:
        """Stop polling ``conns`` (polled members): mark each "daemon sleeping", fence,
        look once more; a slot with a servable request stays polled.  True if one did."""
        self._unpoll(conns)
        kept = False
        for conn in conns:
            if self._servable(conn):
                self._unpark(conn)
                kept = True
        return kept

    def _park_idle(self, since: float) -> None:
        """Park the polled slots that had no request since ``since`` (perf_counter)."""
        idle = [conn for conn in self._slots.polled if conn.served_at < since]
        if idle:
            self._park(idle)

    def _unpark(self, conn: Connection) -> None:
        """Poll ``conn``'s parked slot again now."""
        slots = self._slots
        if conn in slots.members and conn not in slots.polled:
            slots.poll(conn)

    def _admit(self, conn: Connection) -> None:
        """``conn``'s parked slot may hold a request (its client rang, or it can be
        served again): poll it, or queue it while ``max_polled_slots`` are polled."""
        slots = self._slots
        if conn not in slots.members or conn in slots.polled:
            return
        waiting = self._waiting
        if slots.cap and (waiting or len(slots.polled) >= slots.limit(0)):
            waiting.add(conn)  # behind the others of its lane
            self._give_extra_place(time.perf_counter())
        else:
            self._unpark(conn)

    def _give_extra_place(self, now: float) -> None:
        """Poll the first slot of the brief lane in the extra place, if the loop keeps
        one (``SlotSet.extra``: while the bound is halved) and it is free; the slot
        gives it up EXTRA_TURN after ``now`` (the loop's next look is no later)."""
        slots, waiting = self._slots, self._waiting
        if (self._guest is None and waiting.brief and slots.extra(len(waiting))
                and len(slots.polled) <= slots.limit(len(waiting))):
            guest = waiting.pop_brief()
            assert guest is not None
            self._unpark(guest)
            self._guest = guest
            self.metrics.slot_extra_places += 1
            self._turn_at = min(self._turn_at, now + EXTRA_TURN)

    def _take_turns(self, now: float) -> float:
        """Give the places of the slots whose turn has ended (``slot_turn_us`` and
        ``slot_turn_requests`` requests, or TURN_STRETCH times ``slot_turn_us``;
        shorter while so many wait that a round of turns would pass
        ``slot_round_us``, down to MIN_TURN; or no request for the
        TURN_STRETCH-th part of ``slot_turn_us``), oldest first and as many as wait,
        to the waiting slots (the lanes in turn); fill free places too, and the
        extra place (which ends EXTRA_TURN after its start).  When to look
        again (perf_counter seconds).

        The loop calls it right after serving, when a slot just answered holds
        no request: its client's next one sees the mark and rings, and its
        client sleeps at once instead of polling a parked slot.  A slot found
        with a request after the mark keeps its place until a later call, unless
        its turn ended a whole turn ago: then it waits like a rung slot (its
        client polls in vain, then sleeps until the reply's DOORBELL)."""
        polled, waiting = self._slots.polled, self._waiting
        limit = self._slots.limit(len(waiting))
        turn, longest = self._turn, TURN_STRETCH * self._turn
        if waiting and limit and self._round:
            # A queued slot waits about len(waiting) / limit turns: while so many wait
            # that a round of turns would pass slot_round_us, turns are that much shorter.
            longest = min(longest, max(MIN_TURN, self._round * limit / len(waiting)))
            turn = min(turn, longest)
        if waiting:
            ended = now - turn
            stretched = now - longest
            quiet = now - self._quiet
            enough = self._turn_requests
            guest, extra_ended = self._guest, now - EXTRA_TURN
            out = sorted((conn for conn in polled if conn.served_at <= quiet or conn.polled_at <= ended and (
                conn.requests - conn.turn_from >= enough or conn.polled_at <= stretched)
                or conn is guest and conn.polled_at <= extra_ended),
                key=_polled_at)[:len(waiting)]
            if out:
                self._unpoll(out)
                overdue = ended - turn
                for conn in out:  # published before the mark: its client does not ring
                    if not self._servable(conn):
                        self.metrics.slot_turns += 1
                    elif conn.polled_at <= overdue:
                        waiting.add(conn)
                        self.metrics.slot_turns += 1
                    else:
                        polled[conn] = None  # keeps its place (and its polled_at) for now
                        conn.words[_W_DAEMON_SLEEPING] = 0  # type: ignore[index]
                        if conn is guest:
                            self._guest = guest
        unpark = self._unpark
        room = limit + (self._guest is not None and self._slots.extra(len(waiting)))  # and the extra place
        while waiting and (not limit or len(polled) < room):
            unpark(waiting.pop())
        self._give_extra_place(now)
        next_end = min(map(_polled_at, polled), default=now) + turn
        if waiting and polled:  # or when the quietest polled slot would count as quiet
            next_end = min(next_end, min(map(_served_at, polled)) + self._quiet)
        if self._guest is not None:  # or when the extra place's turn ends
            next_end = min(next_end, self._guest.polled_at + EXTRA_TURN)
        return next_end if next_end > now else now + turn / 16  # a turn short of its requests

    def _sleep(self, poll: Callable[[float], list[tuple[int, int]]]) -> list[tuple[int, int]] | None:
        """Park every polled slot and block in epoll; None if a slot request came in
        while parking (serve it instead of sleeping).  Slots stay parked after the
        wake-up: the ones whose clients ring are polled again."""
        polled = self._slots.polled
        if polled and self._park(list(polled)):
            return None
        return poll(1.0)


__all__ = ["EXTRA_TURN", "MIN_TURN", "PARK_AFTER", "TURN_STRETCH", "Bell", "SlotServing", "quiet_after"]
