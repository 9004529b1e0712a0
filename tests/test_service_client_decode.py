"""The client's reply decoding, on scripted replies (no daemon): DESC -> Shm, BATCH_REPLY -> results.

A :class:`~poolsvc.service.objects.Context` runs over :class:`Scripted`, a
Channel on the selected backend's wire and a slot of its own
(tests/offlinechannel.py), whose exchanges record each request and publish
the next reply of a script, so
that descriptors the daemon rarely sends (scattered pages, no paddr, flags
the embedded System does not give) and the batch's bookkeeping (closes
answered here, errors in between) are checked exactly.
The same bodies run on both backends (the frame splitter is a compiled
kernel with a pure-Python twin).
"""
from __future__ import annotations

import mmap
from collections import deque
from typing import Any

import numpy as np
import pytest
from offlinechannel import OfflineChannel

from poolsvc.constants import ShmFlags
from poolsvc.errors import Closed, ItemNotFound, OutOfMemory
from poolsvc.service import channel as C
from poolsvc.service import protocol as P
from poolsvc.service import slot as S
from poolsvc.service.objects import Context

OK, ERROR, BATCH_REPLY = int(P.MsgType.OK), int(P.MsgType.ERROR), int(P.MsgType.BATCH_REPLY)
TOKEN = 3
PAGE = 4096


def frame(msg_type: int, body: bytes) -> bytes:
    return P.HEADER.pack(len(body), msg_type, 0) + body


def desc(cookie: int, *, size: int = PAGE, first: int = 0x10000, paddr: int | None = 0x10000,
         seg_offset: int = 0, offset: int = 0, npages: int = 1,
         flags: int = int(ShmFlags.DYNAMIC | ShmFlags.POOL),
         backing: P.Backing = P.Backing.ARENA, bits: int = 3, pages: list[int] | None = None) -> bytes:
    body = P.DESC.pack(cookie, cookie, size, first, P.NO_PADDR if paddr is None else paddr, seg_offset,
                       0, offset, npages, TOKEN, flags, int(backing),
                       bits | (P.DescBits.PAGES_FOLLOW if pages else 0))
    return body + (np.array(pages, dtype=np.uint64).tobytes() if pages else b"")


CLOSED = frame(OK, P.CLOSED.pack(1, 0))


class Scripted(OfflineChannel):
    """A Channel whose slot exchanges are answered from ``script``, in order: before
    each exchange the next reply is published in the slot (the wire then finds it
    at once), and each request published is recorded in ``sent``."""

    def __init__(self) -> None:
        super().__init__("scripted", {TOKEN: mmap.mmap(-1, 16 * PAGE)}, 64)
        self.script: deque[bytes] = deque()
        self.sent: list[bytes] = []

    def _exchange(self, run: Any) -> Any:
        self.publish(self.script.popleft())
        slot = self.slot
        result = run()
        self.sent.append(bytes(slot.mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + slot.words[S.W_REQ_LEN]]))
        return result

    def call_frame(self, frame: bytes, fds: Any = (), slot_ok: bool = True) -> Any:
        return self._exchange(lambda: super(Scripted, self).call_frame(frame, fds, slot_ok))

    def drain(self) -> None:
        if self.outbox:
            self._exchange(super().drain)
        else:
            super().drain()


@pytest.fixture()
def ctx():
    channel = Scripted()
    context = Context(type("Dialer", (), {"open": lambda self, role, name: channel})(), "t")
    yield context
    assert not channel.script


def test_alloc_decodes_a_descriptor(ctx):
    ch = ctx._channel
    ch.script.append(frame(OK, desc(5, size=100, first=0x20000, paddr=0x20040, seg_offset=PAGE,
                                     offset=0x40)))
    shm = ctx.alloc_user_buf(100)
    assert ch.sent == [C.pack_alloc_frame(C.ALLOC_BODY, C.ALLOC, 0, C.ALLOC_USER, 100)]
    assert (shm.cookie, shm.id, shm.size, shm.offset, shm.paddr) == (5, 5, 100, 0x40, 0x20040)
    assert shm.flags == ShmFlags.DYNAMIC | ShmFlags.POOL and isinstance(shm.flags, ShmFlags)
    assert shm.registered and shm.page_run == (0x20000, 1) and list(shm.pages) == [0x20000]
    assert len(shm) == 100 and ctx.shms == {5: shm}
    view = shm.view()
    view[:3] = b"abc"
    assert ch.segments[TOKEN][PAGE:PAGE + 3] == b"abc" and len(view) == 100
    shm.close()  # pipelined: rides with the next request
    assert shm.closed and ctx.shms == {} and ch.close_cookies == deque([5])
    with pytest.raises(ValueError):
        view[0]  # released with the Shm
    with pytest.raises(Closed):
        shm.view()
    ch.script.append(CLOSED)
    ctx.flush()
    assert ch.sent[-1] == C.pack_close_frame(C.COOKIE_BODY, C.SHM_CLOSE, 0, 5)


def test_scattered_descriptor_carries_its_pages(ctx):
    pages = [0x50000, 0x30000, 0x90000]
    ctx._channel.script.append(frame(OK, desc(9, size=3 * PAGE, paddr=None, npages=3, bits=0,
                                              flags=int(ShmFlags.PRIV | ShmFlags.POOL), pages=pages)))
    shm = ctx.alloc_priv_buf(3 * PAGE)
    assert shm.paddr is None and shm.page_run is None and not shm.registered
    assert shm.pages.tolist() == pages and not shm.pages.flags.writeable
    assert shm.flags == ShmFlags.PRIV | ShmFlags.POOL and shm.id == 9
    assert repr(shm).startswith("<remote Shm id=9") and "scattered" in repr(shm)


def test_batch_results_in_order_with_closes_answered_here(ctx):
    ch = ctx._channel
    ch.script.append(frame(BATCH_REPLY, frame(OK, desc(1)) + frame(OK, desc(2, seg_offset=PAGE))))
    b = ctx.batch()
    b.alloc_user_buf(PAGE)
    b.alloc_kernel_buf(PAGE)
    one, two = b.run()
    assert (one.cookie, two.cookie) == (1, 2) and ctx.shms == {1: one, 2: two}
    # close one twice (the second finds it released), close two, a bad size, an alloc that fails
    b = ctx.batch()
    b.close(one)
    b.close(one)
    b.close(two)
    b.alloc_user_buf(0)
    b.alloc_user_buf(PAGE)
    one.close()  # before the batch runs: its queued closes send nothing
    error = P.error_body(ItemNotFound("no room"))
    ch.script.append(CLOSED)  # the pipelined close of one.close()
    ch.script[-1] += frame(BATCH_REPLY, CLOSED + frame(ERROR, error))
    results = b.run()
    assert results[:3] == [None, None, None] and isinstance(results[3], OutOfMemory)
    assert isinstance(results[4], ItemNotFound) and ctx.shms == {}
    sent_batch = ch.sent[-1][P.HEADER_SIZE + P.COOKIE.size:]  # after the pipelined close
    frames = P.split_frames(sent_batch[P.HEADER_SIZE:], 64, P.MAX_REPLY_FRAME)
    assert [t for t, _, _ in frames] == [C.SHM_CLOSE, C.ALLOC]  # only two's close and the alloc left
