"""A load worker's ledger: the buffers it holds, what each must contain, and the checks.

:class:`Ledger` is the part of a worker (:class:`~poolsvc.load.worker.Worker`
inherits it) that knows what the client holds and decides whether the
daemon kept it:

- ``live[h]`` is the :class:`Held` buffer with handle ``h``, and
  ``live_list[live[h].index] is live[h]`` (a list for uniform random picks);
- ``pages[pa] == h`` for each page address ``pa`` of each live user or
  kernel buffer ``h`` (in either pool such a buffer owns whole pages): a new
  buffer whose page is already in ``pages`` means the daemon gave one frame
  to two of this client's buffers;
- every buffer carries a pattern naming its owner (:data:`TAG`: slot,
  generation, handle), over the whole buffer (``Held.full``) or its *ends*
  (first and last 16 bytes, all of it up to 32 bytes); :meth:`Ledger._verify`
  reads it back, and a foreign tag means one frame had two owners.  The
  per-byte work is the compiled pattern kernels' (``_pattern_*`` of
  ``poolsvc._backend.core``: ext/pattern.pyx, twin poolsvc/_pure/pattern.py),
  which also take the ends of a whole batch's buffers in one call.

A failed check is a *violation* line (``violations``), never an exception;
a check that needs a view the buffer does not have counts as ``unverified``.
A private buffer of the reserved static pool has no view by design: it may
share its carve-out page with other clients' buffers, so it stays in the
daemon (docs/design.md section 2) and its owner has no bytes to check.  Such
a check counts as ``daemon_private`` (reported as "daemon-private: N, not
client-visible by design"), not as unverified and not silently: every
content check is either made, ``unverified`` or ``daemon_private``.  Those
buffers count in the daemon's accounting checks only.

Concurrency: one thread (a worker process is single-threaded).
"""
from __future__ import annotations

import os
import struct
from typing import Any

from .._backend import core
from ..constants import PAGE_SIZE
from ..errors import NotSupported

#: A buffer's owner tag: magic, client slot, generation (low 16 bits), handle.
TAG = struct.Struct("<4sHHQ")
TAG_MAGIC = b"PLDT"
#: Operation name of each buffer kind (allocated ``u``/``k``/``p``, registered ``U``/``K``).
KIND_OPS = {"u": "alloc_user", "k": "alloc_kernel", "p": "alloc_priv",
            "U": "register_user", "K": "register_kernel"}
#: Buffers up to this size get their whole pattern written and checked even when
#: batched (their ends are all of them).
WHOLE_ENDS = 32
fill_pattern = core._pattern_fill
pattern_mismatch = core._pattern_mismatch
stamp_ends = core._pattern_stamp_ends
check_ends = core._pattern_check_ends


def page_addresses(shm: Any) -> Any:
    """The physical address of each page of ``shm``, as ints: the values of
    ``shm.pages``, without building its numpy array when the buffer is one
    run (``Shm.page_run``)."""
    run = shm.page_run
    if run is not None:
        first, count = run
        return range(first, first + count * PAGE_SIZE, PAGE_SIZE)
    return shm.pages.tolist()


class Held:
    """One buffer this worker holds: the Shm and what it must contain.

    ``full``: the whole pattern was written (else its ends); ``view``: this
    process's view of it (None: none, or forgotten); ``index``: the
    buffer's place in ``Ledger.live_list``; ``region``: the registration
    area's region it lies in (-1: allocated); ``extra_refs``: references a
    batched lookup took, released by a later batch or at its free;
    ``pages``: the page addresses it claimed (``Ledger.pages``).
    """

    __slots__ = ("shm", "kind", "size", "handle", "full", "view", "region", "extra_refs",
                 "index", "pages")

    def __init__(self, shm: Any, kind: str, size: int, handle: int, region: int = -1,
                 view: Any = None) -> None:
        self.shm = shm
        self.kind = kind
        self.size = size
        self.handle = handle
        self.full = False
        self.view = view
        self.region = region
        self.extra_refs = 0
        self.index = -1
        self.pages: Any = ()


class Ledger:
    """What a worker holds and the checks on it (state set by the worker's constructor)."""

    slot: int
    gen: int
    dynamic: bool
    live: dict[int, Held]
    live_list: list[Held]
    pages: dict[int, int]
    free_regions: list[int]
    violations: list[str]
    unverified: int
    #: content checks of static-pool private buffers, which stay in the daemon by design
    daemon_private: int = 0

    def violate(self, text: str) -> None:
        """Record a violation, naming this client."""
        self.violations.append(f"client {self.slot}.{self.gen} (pid {os.getpid()}): {text}")

    # -- patterns --------------------------------------------------------------------------------
    # A buffer's pattern is its owner's 16-byte tag repeated from byte 0, cut at its
    # size.  Single operations write and check all of it, batched ones its ends.
    def _tag(self, handle: int) -> bytes:
        return TAG.pack(TAG_MAGIC, self.slot, self.gen & 0xFFFF, handle)

    @property
    def tag_prefix(self) -> bytes:
        """The first 8 bytes of every tag of this worker (magic, slot, generation): the
        pattern kernels' ``prefix``, the handle completing each tag."""
        return self._tag(0)[:8]

    def _pattern(self, held: Held) -> bytes:
        tag = self._tag(held.handle)
        size = held.size
        return tag * (size >> 4) if not size & 15 else (tag * (size // 16 + 1))[:size]

    def _write(self, held: Held, full: bool) -> None:
        view = held.view
        if view is None:
            return
        if full or held.size <= WHOLE_ENDS:
            fill_pattern(view, self._tag(held.handle))
            held.full = True
        else:
            stamp_ends([view], self.tag_prefix, [held.handle])

    def _verify(self, held: Held, what: str) -> None:
        """Read the pattern back through this process's view; a violation if it changed."""
        view = held.view
        if view is None:
            if self.daemon_private_buffer(held):
                self.daemon_private += 1
            else:
                self.unverified += 1
            return
        if held.full:
            ok = pattern_mismatch(view, self._tag(held.handle)) < 0
        else:
            ok = not check_ends([view], self.tag_prefix, [held.handle])
        if not ok:
            self._changed(held, what)

    def _changed(self, held: Held, what: str) -> None:
        """The violation of a buffer whose pattern changed (``held.view`` still open)."""
        self.violate(f"{what}: buffer {held.handle} ({KIND_OPS[held.kind]}, {held.size} bytes, "
                     f"cookie {held.shm.cookie:#x}) changed under its owner: "
                     f"{self._whose(bytes(held.view[:16]))}")

    def daemon_private_buffer(self, held: Held) -> bool:
        """True for a private buffer of the static pool: no view for its owner, by design."""
        return not self.dynamic and held.kind == "p"

    def _whose(self, head: bytes) -> str:
        magic, slot, gen, handle = TAG.unpack(head)
        if magic != TAG_MAGIC:
            return f"first bytes are {head.hex()}"
        return (f"it now starts with the tag of client {slot}.{gen} buffer {handle} "
                "(one frame, two owners)")

    # -- holding -----------------------------------------------------------------------------------
    def _claim_pages(self, held: Held, shm: Any) -> None:
        """Note ``shm``'s pages as ``held``'s; a violation for each one a live buffer has."""
        handle = held.handle
        run = shm.page_run
        # one page (the common case): a 1-tuple, no range to build
        held.pages = pages = (run[0],) if run is not None and run[1] == 1 else page_addresses(shm)
        owner = self.pages
        owner_get = owner.get
        for pa in pages:
            other = owner_get(pa)
            if other is not None:
                self.violate(f"page {pa:#x} of new buffer {handle} already belongs to this "
                             f"client's live buffer {other}")
            owner[pa] = handle

    def _enlist(self, held: Held) -> None:
        """Add ``held`` to the live set."""
        self.live[held.handle] = held
        held.index = len(self.live_list)
        self.live_list.append(held)

    def _hold(self, shm: Any, kind: str, size: int, handle: int, region: int = -1,
              full: bool = True) -> Held:
        """Take a new buffer into the ledger: claim its pages, write its pattern
        (``full``: all of it, else its ends; a registered one was written before)."""
        held = Held(shm, kind, size, handle, region)
        if kind in "UK":  # registered: the pattern was written into our area before
            held.full = True
            held.view = shm.view()
        else:
            try:
                held.view = shm.view()
            except NotSupported:  # a private buffer of the static pool
                held.view = None
            if kind != "p":
                self._claim_pages(held, shm)
            self._write(held, full)
        self._enlist(held)
        return held

    def _unlist(self, held: Held) -> None:
        """Drop ``held`` from ``live`` and ``live_list`` (if it is there)."""
        if self.live.pop(held.handle, None) is held:
            live_list = self.live_list
            last = live_list.pop()
            if last is not held:
                live_list[held.index] = last
                last.index = held.index

    def _forget(self, held: Held, pages: bool = True) -> None:
        """Drop ``held`` from the live set; ``pages``: its pages too (else the caller
        gives them up with :meth:`_give_pages`, as a batch does at its free's turn)."""
        self._unlist(held)
        if pages:
            self._give_pages(held)
        if held.view is not None:
            held.view.release()
            held.view = None
        if held.region >= 0:
            self.free_regions.append(held.region)

    def _give_pages(self, held: Held) -> None:
        """Forget that ``held``'s pages are this client's (those still mapped to it)."""
        handle = held.handle
        owner = self.pages
        for pa in held.pages:
            if owner.get(pa) == handle:
                del owner[pa]
