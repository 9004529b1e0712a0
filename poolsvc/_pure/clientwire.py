"""Plain-Python twin of ``ext/clientwire.pyx``: the client's request/reply path
of one connection to the pool service, both transports.

Owns :class:`ClientSlot` (the client's end of a shm slot: publish, the
daemon's "sleeping" word, the adaptive poll-then-sleep wait, the reply area)
and :class:`ClientWire` (the outbox of pipelined frames and their reply
callbacks, call_frame / drain, the doorbell, sends with SCM_RIGHTS, receives
into one preallocated buffer with the descriptors queued, the reply framing
checks).  Same results, errors and messages as the compiled one
(docs/core.md "The client wire"); the slot's layout and the protocol's
constants are read from ``poolsvc.service.slot`` / ``protocol`` / ``channel``
at first use (those modules import the selected backend).

Concurrency: an object belongs to one thread at a time.  The slot's words
are shared with the daemon: each is read once per decision, and stores are
ordered before loads with ``slot.fence``.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections import deque
from types import ModuleType
from typing import Callable, NoReturn, Sequence

from ..errors import BadParameters, Closed, InternalError, ProtocolError

_HEADER = struct.Struct("<IHH")
_unpack_header = _HEADER.unpack_from
_pack_close = struct.Struct("<IHHQ").pack
_unpack_closed = struct.Struct("<II").unpack
_unpack_desc = struct.Struct("<QqQQQQQIIIHBB").unpack
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_mods: tuple[ModuleType, ModuleType, ModuleType] | None = None


def _bound() -> tuple[ModuleType, ModuleType, ModuleType]:
    """The protocol, slot and channel modules (imported at first use: they
    import the backend, which imports this module)."""
    global _mods
    if _mods is None:
        from ..service import channel, protocol, slot

        _mods = (protocol, slot, channel)
    return _mods


class ClientSlot:
    """The client's end of one shm slot (see ``ext/clientwire.pyx``).

    Invariant while mapped: ``seq == words[W_REQ_SEQ]`` (only this end writes it).
    """

    __slots__ = ("mm", "words", "seq", "expect", "max_spin", "waits", "slept", "probe_gap",
                 "_mapped", "_S")

    def __init__(self, fd: int, size: int, max_spin: float) -> None:
        _P, S, _C = _bound()
        self._S = S
        mm, words = S.map_client_slot(fd, size)
        self.mm = mm
        self.words = words
        self._mapped = True
        self.seq: int = words[S.W_REQ_SEQ]
        self.max_spin = max_spin
        #: Moving average of recent waits for a reply, in seconds.
        self.expect = 0.0
        #: Waits that did not find the reply at once, and those that slept.
        self.waits = 0
        self.slept = 0
        #: Waits from one probe to the next (PROBE_EVERY << k, at most MAX_PROBE_GAP).
        self.probe_gap: int = S.PROBE_EVERY

    def _check_mapped(self) -> None:
        if not self._mapped:
            raise Closed("the shm slot of this connection is closed")

    def publish(self, data: bytes | bytearray | memoryview) -> int:
        """Write request frames (at most the request area's capacity) and announce
        them; the request's sequence number (ring when :meth:`daemon_sleeping`)."""
        return self._publish(b"", data)

    def _publish(self, head: bytes | bytearray, data: bytes | bytearray | memoryview) -> int:
        """Write ``head`` then ``data`` into the request area, announce them, fence."""
        self._check_mapped()
        S = self._S
        n = len(head) + len(data)
        if n > S.SLOT_REQ_CAP:
            raise BadParameters(f"request frames of {n} bytes exceed the slot's request "
                                f"area of {S.SLOT_REQ_CAP}")
        words = self.words
        at = S.SLOT_REQ_OFF
        if head:
            self.mm[at:at + len(head)] = head
            at += len(head)
        self.mm[at:at + len(data)] = data
        words[S.W_REQ_LEN] = n
        seq = self.seq = self.seq + 1
        words[S.W_REQ_SEQ] = seq
        S.fence()
        return seq

    def daemon_sleeping(self) -> bool:
        """Whether the daemon does not poll this slot, so that a request must ring."""
        self._check_mapped()
        return bool(self.words[self._S.W_DAEMON_SLEEPING])

    def answered(self, seq: int) -> bool:
        """Whether the reply to request ``seq`` is published."""
        self._check_mapped()
        return self.words[self._S.W_REP_SEQ] == seq

    def spins(self, daemon_asleep: bool) -> float:
        """The polling window of the next wait in seconds of polling (0: sleep at once)."""
        if daemon_asleep:
            return 0.0
        max_spin = self.max_spin
        expect = self.expect
        if expect > max_spin and (self.probe_gap <= 0 or self.waits % self.probe_gap):
            return 0.0
        return min(max_spin, max(self._S.MIN_SPIN, 2 * expect))

    def wait(self, seq: int, sleep: Callable[[int], None], daemon_asleep: bool = False) -> None:
        """Return once the reply to ``seq`` is published: poll while that pays,
        else ``sleep(seq)``, which returns once it is.  The window is the
        polling's own time: a check is charged at most YIELD_CHARGE."""
        self._check_mapped()
        words = self.words
        rep_seq = self._S.W_REP_SEQ
        if words[rep_seq] == seq:
            self.expect *= 0.75
            return
        self.waits += 1
        window = self.spins(daemon_asleep)
        probe = window > 0 and self.expect > self.max_spin
        asleep = False
        spent = 0.0
        if window:
            clock = time.perf_counter
            charge = self._S.YIELD_CHARGE
            last = clock()
            polls = 0
            while words[rep_seq] != seq:
                polls += 1
                if not polls & 3:
                    now = clock()
                    spent += min(now - last, charge)
                    last = now
                    if spent > window:
                        asleep = True
                        break
                    os.sched_yield()
            if not asleep:
                spent += min(clock() - last, charge)
        else:
            asleep = True
        if probe:  # a probe pays only while probes catch their replies
            self.probe_gap = min(2 * self.probe_gap, self._S.MAX_PROBE_GAP) if asleep else self._S.PROBE_EVERY
        if asleep:
            self.slept += 1
            sleep(seq)
            if window:  # polled in vain, then slept: counts as twice the longest window
                self.expect += (2 * self.max_spin - self.expect) / 4
        elif probe:  # a probe caught its reply: waits are short again
            self.expect = spent
        else:
            self.expect += (spent - self.expect) / 4

    def set_sleeping(self, sleeping: bool) -> None:
        """Mark (then fence) or clear the client's "sleeping" word."""
        self._check_mapped()
        self.words[self._S.W_CLIENT_SLEEPING] = int(sleeping)
        if sleeping:
            self._S.fence()

    def _reply_length(self) -> int:
        """W_REP_LEN, checked against the reply area (REP_ON_SOCKET passes)."""
        self._check_mapped()
        S = self._S
        length: int = self.words[S.W_REP_LEN]
        if length != S.REP_ON_SOCKET and length > S.SLOT_REP_CAP:
            raise ProtocolError(f"daemon wrote a slot reply of {length} bytes, more than {S.SLOT_REP_CAP}")
        return length

    def reply(self) -> bytes | None:
        """The published reply frames, or None when they follow on the socket."""
        length = self._reply_length()
        if length == self._S.REP_ON_SOCKET:
            return None
        return self.mm[self._S.SLOT_REP_OFF:self._S.SLOT_REP_OFF + length]

    def close(self) -> None:
        """Unmap the slot (idempotent)."""
        self._mapped = False
        self.words.release()
        self.mm.close()


class ClientWire:
    """The request path of one connection (see ``ext/clientwire.pyx``)."""

    def __init__(self, lost: Callable[[str, type[Closed]], NoReturn], timeout_error: type[Closed],
                 fds: deque[int], spin: float = 0.0) -> None:
        P, _S, C = _bound()
        self.outbox = bytearray()
        self.pending: deque[Callable[[int, memoryview], None]] = deque()
        #: The reply callback and cookie deque of the latest post_close.
        self.close_reply: Callable[[int, memoryview], None] | None = None
        self.close_cookies: deque[int] = deque()
        self.fds = fds
        self.lost = lost
        self.timeout_error = timeout_error
        self.spin = spin
        self.wait_limit: float | None = None
        self.slot: ClientSlot | None = None
        self.fd = -1
        self.bell = -1
        self.closed = True
        self.sock: socket.socket | None = None
        #: Received bytes not framed yet; one preallocated receive buffer.
        self.buf = bytearray()
        self.rview = memoryview(bytearray(C.RECV_SIZE))
        self.rbufs = [self.rview]
        #: Slot replies not handed out yet, and the read position.
        self.sbuf = b""
        self.spos = 0
        self._anc_size = socket.CMSG_SPACE(P.MAX_FDS_PER_SEND * 4)
        self._max_in_flight = C.MAX_IN_FLIGHT
        self._doorbell_frame = bytes(P.DOORBELL_FRAME)
        self._doorbell = int(P.MsgType.DOORBELL)
        self._max_reply_frame = P.MAX_REPLY_FRAME
        self._ok = int(P.MsgType.OK)
        self._shm_close = int(P.MsgType.SHM_CLOSE)
        self._closed_size = P.CLOSED.size
        self._desc_size = P.DESC.size
        self._desc_slow_bits = int(P.DescBits.PAGES_FOLLOW | P.DescBits.NEW_SEGMENT)
        self._S = _S

    def __del__(self) -> None:
        if self.sock is not None:  # the descriptor is the channel's: never closed here
            self.sock.detach()

    def attach(self, fd: int) -> None:
        """Use the connected socket ``fd`` (the caller's to close), dropping bytes
        received on an earlier one."""
        if self.sock is not None:
            self.sock.detach()
        self.sock = socket.socket(fileno=fd) if fd >= 0 else None
        self.fd = fd
        self.closed = False
        self.buf.clear()
        self.sbuf = b""
        self.spos = 0

    def set_slot(self, slot: ClientSlot, bell: int) -> None:
        """Send requests through ``slot``; ring the eventfd ``bell`` (-1: DOORBELL frames)."""
        self.slot = slot
        self.bell = bell

    def close(self) -> None:
        """Forget the socket, slot and doorbell (their owner closes them); idempotent."""
        self.closed = True
        if self.sock is not None:
            self.sock.detach()
            self.sock = None
        self.fd = -1
        self.bell = -1
        self.slot = None
        self.sbuf = b""
        self.spos = 0

    def _lose(self, why: str, kind: type[Closed] = Closed) -> NoReturn:
        self.lost(why, kind)
        raise InternalError(f"{self.lost!r} returned instead of raising")

    # -- sending -------------------------------------------------------------------------------
    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send ``data`` on the socket, with the descriptors ``fds`` on its first byte."""
        if self.closed:
            raise Closed("connection to the pool service is closed")
        sock = self.sock
        assert sock is not None
        try:
            if fds:
                sent = socket.send_fds(sock, [data], list(fds))
                if sent < len(data):
                    sock.sendall(memoryview(data)[sent:])
            else:
                sock.sendall(data)
        except BlockingIOError:
            self._lose(f"the daemon took no data for {self.wait_limit} s", self.timeout_error)
        except OSError as exc:
            self._lose(f"send failed: {exc.strerror or exc}")

    def post(self, msg_type: int, body: bytes | bytearray | memoryview,
             on_reply: Callable[[int, memoryview], None]) -> None:
        """Queue a request without waiting; it leaves with the next call (or
        :meth:`drain`); ``on_reply(type, body)`` runs when its reply is read."""
        if len(body) > 0xFFFFFFFF or not 0 <= msg_type <= 0xFFFF:
            raise BadParameters(f"request of type {msg_type} with {len(body)} bytes cannot be framed")
        self.outbox += _HEADER.pack(len(body), msg_type, 0) + body
        self.pending.append(on_reply)
        if len(self.pending) >= self._max_in_flight:
            self.drain()

    def post_close(self, cookie: int, on_reply: Callable[[int, memoryview], None],
                   cookies: deque[int]) -> int:
        """Queue SHM_CLOSE of ``cookie``, appended to ``cookies``; the requests
        now pending (see ``ext/clientwire.pyx``)."""
        self.outbox += _pack_close(8, self._shm_close, 0, cookie)
        self.close_reply = on_reply
        self.close_cookies = cookies
        self.pending.append(on_reply)
        cookies.append(cookie)
        return len(self.pending)

    def plain_desc(self, body: bytes | bytearray | memoryview) -> tuple[int, ...] | None:
        """The fields of a plain shm descriptor ``body``, else None (see ``ext/clientwire.pyx``)."""
        if len(body) != self._desc_size:
            return None
        desc = _unpack_desc(body)
        return None if desc[12] & self._desc_slow_bits else desc

    def _ring(self) -> None:
        if self.bell < 0:
            self.send(self._doorbell_frame)
            return
        try:
            os.eventfd_write(self.bell, 1)
        except OSError as exc:  # EAGAIN: the counter is full, the daemon is awake anyway
            if exc.errno != errno.EAGAIN:
                self._lose(f"doorbell failed: {exc.strerror or exc}")

    # -- the slot ------------------------------------------------------------------------------
    def _slot_exchange(self, data: bytes | bytearray | memoryview) -> None:
        """Publish the outbox then ``data`` in the slot (the outbox is emptied), ring
        when the daemon sleeps, wait for the reply and stage it for read_frame."""
        if self.closed:
            raise Closed("connection to the pool service is closed")
        slot = self.slot
        assert slot is not None
        seq = slot._publish(self.outbox, data)
        self.outbox.clear()
        asleep = slot.daemon_sleeping()
        if asleep:
            self._ring()
        slot.wait(seq, self._slot_sleep, asleep)
        try:
            length = slot._reply_length()
        except ProtocolError as exc:
            self._lose(str(exc))
        if length != self._S.REP_ON_SOCKET:  # else the replies follow on the socket
            at = self._S.SLOT_REP_OFF
            self.sbuf = slot.mm[at:at + length]
            self.spos = 0

    def _slot_sleep(self, seq: int) -> None:
        """Sleep on the socket until the reply to ``seq`` is in the slot (DOORBELL)."""
        slot = self.slot
        assert slot is not None
        slot.set_sleeping(True)
        try:
            while not slot.answered(seq):
                self.fill()
        finally:
            if self.slot is not None:
                slot.set_sleeping(False)

    # -- receiving -----------------------------------------------------------------------------
    def _recv(self, flags: int) -> int:
        """One recvmsg into the receive buffer, its descriptors queued; the byte
        count, or -1 when nothing is there (EAGAIN)."""
        sock = self.sock
        try:
            if sock is None:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            nbytes, anc, _msg_flags, _ = sock.recvmsg_into(self.rbufs, self._anc_size, flags | _CLOEXEC)
        except BlockingIOError:
            return -1
        except OSError as exc:
            self._lose(f"receive failed: {exc.strerror or exc}")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]))
        self.buf += self.rview[:nbytes]
        return nbytes

    def fill(self) -> None:
        """Receive what the socket holds (polling up to ``spin`` seconds, then waiting
        up to the timeout); drop DOORBELL frames at the front when a slot is attached."""
        got = -1
        if self.spin > 0:
            deadline = time.perf_counter() + self.spin
            while True:
                got = self._recv(socket.MSG_DONTWAIT)
                if got >= 0 or time.perf_counter() > deadline:
                    break
                os.sched_yield()
        if got < 0:
            got = self._recv(0)
            if got < 0:
                self._lose(f"no answer from the daemon within {self.wait_limit} s", self.timeout_error)
        if got == 0:
            self._lose("the daemon closed the connection")
        if self.slot is not None:
            buf = self.buf
            doorbell = self._doorbell_frame
            while len(buf) >= 8 and buf[:8] == doorbell:
                del buf[:8]

    def read_frame(self) -> tuple[int, memoryview]:
        """The next reply ``(type, body)``: from the slot's staged reply, else the socket."""
        sbuf = self.sbuf
        if sbuf:
            pos = self.spos
            size = len(sbuf)
            if size - pos >= 8:
                length, msg_type, flags = _unpack_header(sbuf, pos)
                end = pos + 8 + length
                if not flags and end <= size:
                    if end == size:
                        self.sbuf = b""
                        self.spos = 0
                    else:
                        self.spos = end
                    return msg_type, memoryview(sbuf)[pos + 8:end]
            self._lose(f"daemon wrote a malformed reply into the slot at byte {pos}")
        buf = self.buf
        while True:
            if len(buf) >= 8:
                length, msg_type, flags = _unpack_header(buf)
                if length > self._max_reply_frame or flags:
                    self._lose(f"daemon sent a malformed header (length {length}, flags {flags:#x})")
                end = 8 + length
                if len(buf) >= end:
                    body = memoryview(bytes(buf[8:end]))
                    del buf[:end]
                    if msg_type == self._doorbell and self.slot is not None:
                        continue
                    return msg_type, body
            self.fill()

    def _answer_pending(self) -> None:
        pending = self.pending
        while pending:
            handler = pending.popleft()
            if handler is self.close_reply and handler is not None:  # a post_close
                msg_type, body = self.read_frame()
                if msg_type == self._ok and len(body) == self._closed_size and not _unpack_closed(body)[1]:
                    self.close_cookies.popleft()
                else:
                    handler(msg_type, body)
                continue
            handler(*self.read_frame())

    # -- requests ------------------------------------------------------------------------------
    def call_frame(self, frame: bytes | bytearray | memoryview, fds: Sequence[int] = (),
                   slot_ok: bool = True) -> tuple[int, memoryview]:
        """Send one framed request and return its reply ``(type, body)``, the
        replies of earlier pipelined requests handled first (see ``ext/clientwire.pyx``)."""
        outbox = self.outbox
        if slot_ok and self.slot is not None and len(outbox) + len(frame) <= self._S.SLOT_REQ_CAP:
            self._slot_exchange(frame)
        elif outbox and fds:  # descriptors ride on the first byte: send the queue first
            self.send(bytes(outbox))
            outbox.clear()
            self.send(frame, fds)
        elif outbox:
            data = bytes(outbox) + frame
            outbox.clear()
            self.send(data, fds)
        else:
            self.send(frame, fds)
        self._answer_pending()
        return self.read_frame()

    def drain(self) -> None:
        """Send queued requests and read the replies of every pipelined request."""
        outbox = self.outbox
        if outbox:
            if self.slot is not None and len(outbox) <= self._S.SLOT_REQ_CAP:
                self._slot_exchange(b"")
            else:
                data = bytes(outbox)
                outbox.clear()
                self.send(data)
        self._answer_pending()


__all__ = ["ClientSlot", "ClientWire"]
