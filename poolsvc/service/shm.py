"""The service client's Shm: a shared-memory object held through the daemon.

:class:`Shm` mirrors the embedded ``poolsvc.Shm`` (docs/design.md section 9):
``id``, ``size``, ``offset``, ``flags``, ``pages``, ``paddr``, ``cookie``,
``registered``; ``view()`` (also ``.buf``), ``len()``, ``close()`` and
``with``.  Its bytes are a zero-copy window on the context's storage segment
(mapped from the descriptor the daemon sent) or on the caller's own
registered object.  Closing is pipelined through the owning Context.

Concurrency: as its Context (one thread at a time).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..constants import PAGE_SIZE, ShmFlags
from ..errors import Closed, NotSupported
from . import protocol as P
from .channel import Handle

if TYPE_CHECKING:
    from .context import Context

_REGISTERED = int(P.DescBits.REGISTERED)
_ARENA = int(P.Backing.ARENA)
_USER = int(P.Backing.USER)
#: ShmFlags values by int (building an IntFlag costs microseconds).
_FLAGS: dict[int, ShmFlags] = {}


class Shm(Handle):
    """A shared-memory object held through the daemon (the embedded Shm's API).

    Attributes: ``id``, ``size``, ``offset``, ``flags``, ``pages`` (numpy
    uint64), ``paddr``, ``cookie``, ``registered``; ``view()``, ``buf``,
    ``len()`` and ``close()``.
    """

    __slots__ = ("context", "id", "size", "offset", "flags", "cookie", "paddr", "registered",
                 "_first", "_npages", "_pages", "_refs", "_backing", "_token", "_seg_offset",
                 "_user_view", "_views", "__weakref__")

    def __init__(self, context: "Context", desc: tuple, pages: np.ndarray | None,
                 user_view: memoryview | None) -> None:
        (cookie, shm_id, size, first, paddr, seg_offset, _seg_bytes, offset, npages, token, flags,
         backing, bits) = desc
        self.context = context
        self.cookie = cookie
        self.id = shm_id
        self.size = size
        self.offset = offset
        known = _FLAGS.get(flags)
        self.flags = known if known is not None else _FLAGS.setdefault(flags, ShmFlags(flags))
        self.paddr = None if paddr == P.NO_PADDR else paddr
        self.registered = bool(bits & _REGISTERED)
        self._first = first
        self._npages = npages
        self._pages = pages
        self._refs = 1
        self._backing = backing
        self._token = token
        self._seg_offset = seg_offset
        self._user_view = user_view
        self._views: list[memoryview] = []

    @property
    def pages(self) -> np.ndarray:
        """Physical address of each 4 KiB page (numpy uint64, read-only)."""
        if self._pages is None:
            pages = np.arange(self._first, self._first + self._npages * PAGE_SIZE, PAGE_SIZE,
                              dtype=np.uint64)
            pages.flags.writeable = False
            self._pages = pages
        return self._pages

    @property
    def page_run(self) -> tuple[int, int] | None:
        """``(PA of the first page, page count)`` when the pages are physically
        consecutive, else None (read ``pages`` then); builds no array."""
        return None if self.paddr is None else (self._first, self._npages)

    @property
    def closed(self) -> bool:
        return self._refs <= 0

    def _check(self) -> None:
        if self._refs <= 0:
            raise Closed(f"shm (id {self.id}, cookie {self.cookie:#x}) is released")

    def __len__(self) -> int:
        """The buffer's size in bytes (``size``)."""
        return self.size

    def view(self) -> memoryview:
        """A writable zero-copy memoryview of the buffer (released when the Shm is).

        NotSupported for a buffer of the reserved static pool: the carve-out is
        one object shared by every client, so its descriptor is never sent.
        """
        self._check()
        if self._backing == _ARENA:
            mm = self.context._channel.segments.get(self._token)
            if mm is None:
                raise Closed(f"storage segment {self._token} of shm {self.cookie:#x} is not mapped")
            base = memoryview(mm)
            view = base[self._seg_offset:self._seg_offset + self.size]
            base.release()
        elif self._backing == _USER:
            assert self._user_view is not None
            view = self._user_view[:]
        else:
            raise NotSupported("the reserved static carve-out is shared by every client of the "
                               "daemon, so its descriptor is never sent: view() of a static-pool "
                               "buffer is not available through the pool service")
        self._views.append(view)
        return view

    @property
    def buf(self) -> memoryview:
        """The same as :meth:`view` (the name ``multiprocessing.shared_memory`` uses)."""
        return self.view()

    def close(self) -> None:
        """Drop one reference; the last one frees the memory (pipelined: no round trip).

        Closing a released Shm does nothing (like ``SharedMemory.close()``).
        """
        refs = self._refs - 1
        if refs < 0:
            return
        self.context._channel.check_process()
        self._refs = refs
        if refs == 0:
            self._release_local()
        self.context._post_close(self)

    def _release_local(self) -> None:
        self._refs = 0
        if self._views:
            for view in self._views:
                try:
                    view.release()
                except BufferError:
                    pass
            self._views.clear()
        if self._user_view is not None:
            try:
                self._user_view.release()
            except BufferError:
                pass
        self.context.shms.pop(self.cookie, None)

    def __repr__(self) -> str:
        state = "released" if self.closed else f"refs={self._refs}"
        paddr = f"{self.paddr:#x}" if self.paddr is not None else "scattered"
        return (f"<remote Shm id={self.id} size={self.size:#x} offset={self.offset:#x} "
                f"flags={self.flags!r} pages={self._npages} paddr={paddr} {state}>")
