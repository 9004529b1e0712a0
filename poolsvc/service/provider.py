"""What the daemon hands out: shm descriptors, storage descriptors, client mappings.

Three pieces sit between the System and the wire:

- :class:`SegmentTokens` (one per connection): which storage segments of the
  connection's *own* arena the client has mapped, each under a token that is
  never reused on that connection.  A segment's descriptor is sent once, the
  first time a buffer in it is described; when the arena returns the segment
  to the OS, the next SHM_CLOSE reply names its token so the client unmaps
  it.  Only segments of the connection's own arena are ever sent: that check
  sits in :meth:`SegmentTokens.token_for`, at the one place descriptors are
  issued.
- :func:`describe`: the DESC body of an Shm, plus the descriptor to send.
- :class:`RegisteredFiles` (one per daemon): the daemon's mappings of
  objects that clients register.  A client sends a descriptor of its own
  POSIX shm object; the daemon maps the whole object shared, so that the
  mapping appears in its ``/proc/self/maps`` as ``/dev/shm/...`` and the
  System's ordinary ``register_*_buf`` path finds it.  The System may tie
  the frames of one registration to the mapping another registration made
  (same object, same pages, same physical addresses), so every mapping of an
  object stays until the last registration of that object, from any client,
  is released.

Invariants:
  ``RegisteredFiles.files[key].refs == live registrations of object key`` (all clients);
  every token in ``SegmentTokens.tokens`` names a storage of that connection's arena.

Concurrency: the daemon's loop thread only.
"""
from __future__ import annotations

import logging
import mmap
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from ..constants import PAGE_SIZE
from ..errors import BadParameters, InternalError, NotSharedMemory
from ..storage import Storage
from .protocol import DESC, NO_PADDR, Backing, DescBits

log = logging.getLogger("poolsvc.service")


class SegmentTokens:
    """The storage segments one client has mapped, by token."""

    __slots__ = ("arena", "tokens", "next_token")

    def __init__(self, arena: Any) -> None:
        self.arena = arena
        self.tokens: dict[Storage, int] = {}
        self.next_token = 1

    def token_for(self, storage: Storage) -> tuple[int, int]:
        """``(token, fd)`` for a segment; ``fd`` is a fresh duplicate to send, or -1.

        Raises InternalError if ``storage`` is not a live segment of this
        connection's arena (an isolation bug; nothing is sent).
        """
        token = self.tokens.get(storage)
        if token is not None:
            return token, -1
        if storage.fd < 0 or not any(seg.storage is storage for seg in self.arena.segments):
            raise InternalError(f"refusing to send storage {storage.name}: not a live segment of "
                                "this client's arena")
        token = self.next_token
        self.next_token += 1
        self.tokens[storage] = token
        # A duplicate: the segment may be dropped (and its fd number reused)
        # before the reply carrying it leaves the daemon.
        return token, os.dup(storage.fd)

    def dropped(self, storage: Storage) -> int:
        """The token of ``storage`` if the arena has closed it (and forget it), else 0."""
        if storage.fd >= 0:
            return 0
        return self.tokens.pop(storage, 0)

    def clear(self) -> None:
        self.tokens.clear()


_CONTIGUOUS = int(DescBits.CONTIGUOUS)
_REGISTERED = int(DescBits.REGISTERED)
_NEW_SEGMENT = int(DescBits.NEW_SEGMENT)
_PAGES_FOLLOW = int(DescBits.PAGES_FOLLOW)
_ARENA, _STATIC, _USER = int(Backing.ARENA), int(Backing.STATIC), int(Backing.USER)
_pack_desc = DESC.pack


def describe(shm: Any, tokens: SegmentTokens | None) -> tuple[bytes, int]:
    """The DESC body (plus page array when scattered) of ``shm``, and an fd to send or -1.

    On the hot path of every ALLOC: plain ints, no enum arithmetic.
    """
    backing = shm._backing
    # A contiguous shm knows its (first page, count): no page array is built.
    run = shm._run
    segment = getattr(backing, "segment", None)
    if run is not None and segment is not None and tokens is not None:
        token = tokens.tokens.get(segment.storage)
        if token is not None:  # the usual case: an arena run in a segment the client maps
            body = _pack_desc(shm.cookie, shm.id, shm.size, run[0], shm.paddr,
                              backing.index * PAGE_SIZE + shm.offset, 0, shm.offset, run[1], token,
                              shm.flags, _ARENA,  # (an IntFlag packs as its int)
                              (_REGISTERED | _CONTIGUOUS) if shm.registered else _CONTIGUOUS)
            return body, -1
    paddr = shm.paddr
    pages = None if run is not None and paddr is not None else shm.pages
    bits = _REGISTERED if shm.registered else 0
    fd = -1
    token = seg_offset = seg_bytes = 0
    if segment is not None:
        kind = _ARENA
        if tokens is None:
            raise InternalError("an arena-backed shm described without the client's segment table")
        token, fd = tokens.token_for(segment.storage)
        seg_offset = backing.index * PAGE_SIZE + shm.offset
        if fd >= 0:
            bits |= _NEW_SEGMENT
            seg_bytes = segment.storage.size
    elif hasattr(backing, "length"):
        kind = _STATIC
    else:
        kind = _USER
    flags = int(shm.flags)
    if pages is None:
        assert run is not None
        body = _pack_desc(shm.cookie, shm.id, shm.size, run[0], paddr, seg_offset, seg_bytes,
                          shm.offset, run[1], token, flags, kind, bits | _CONTIGUOUS)
        return body, fd
    if paddr is not None:
        body = _pack_desc(shm.cookie, shm.id, shm.size, int(pages[0]), paddr, seg_offset, seg_bytes,
                          shm.offset, len(pages), token, flags, kind, bits | _CONTIGUOUS)
        return body, fd
    body = _pack_desc(shm.cookie, shm.id, shm.size, int(pages[0]), NO_PADDR, seg_offset, seg_bytes,
                      shm.offset, len(pages), token, flags, kind, bits | _PAGES_FOLLOW)
    return body + pages.tobytes(), fd


@dataclass
class _ObjectMappings:
    """The daemon's mappings of one client object, and its live registrations."""

    mappings: list[mmap.mmap] = field(default_factory=list)
    refs: int = 0


class RegisteredFiles:
    """The daemon's shared mappings of objects clients registered, by (st_dev, st_ino)."""

    def __init__(self) -> None:
        self.files: dict[tuple[int, int], _ObjectMappings] = {}

    @property
    def mapped(self) -> int:
        """Number of mappings held (for stats and leak checks)."""
        return sum(len(entry.mappings) for entry in self.files.values())

    def map(self, fd: int, offset: int, length: int) -> tuple[tuple[int, int], memoryview]:
        """Map the object behind ``fd``; ``(key, view of [offset, offset+length))``.

        Does not take a reference (call :meth:`get` once the registration
        stands) and does not close ``fd``.  NotSharedMemory for a descriptor
        that is not a writable regular file, BadParameters for a range outside
        the object.
        """
        try:
            info = os.fstat(fd)
        except OSError as exc:
            raise BadParameters(f"received descriptor {fd} cannot be inspected: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise NotSharedMemory(f"received descriptor is not a shared-memory object "
                                  f"(file mode {info.st_mode:#o})")
        size = info.st_size
        if length <= 0:
            raise BadParameters(f"register length {length} must be positive")
        if offset + length > size:
            raise BadParameters(f"buffer [{offset:#x}, {offset + length:#x}) runs past the end of "
                                f"its object ({size:#x} bytes)")
        key = (info.st_dev, info.st_ino)
        entry = self.files.get(key)
        mm = None
        if entry is not None:
            for candidate in entry.mappings:
                if len(candidate) >= offset + length:
                    mm = candidate
                    break
        if mm is None:
            try:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except PermissionError as exc:
                raise NotSharedMemory("received descriptor is not open for writing; a registered "
                                      "buffer must be writable") from exc
            except (OSError, ValueError) as exc:
                raise NotSharedMemory(f"cannot map the received object of {size:#x} bytes: {exc}") from exc
            if entry is None:
                entry = self.files[key] = _ObjectMappings()
            entry.mappings.append(mm)
        return key, memoryview(mm)[offset:offset + length]

    def get(self, key: tuple[int, int]) -> None:
        """One more live registration of object ``key``."""
        self.files[key].refs += 1

    def put(self, key: tuple[int, int]) -> None:
        """One registration of ``key`` released; the last one unmaps the object."""
        entry = self.files.get(key)
        if entry is None:
            raise InternalError(f"registered object {key} released more often than registered")
        entry.refs -= 1
        if entry.refs <= 0:
            self._unmap(key, entry)

    def forget_unused(self, key: tuple[int, int]) -> None:
        """Unmap ``key`` if no registration uses it (after a failed registration)."""
        entry = self.files.get(key)
        if entry is not None and entry.refs <= 0:
            self._unmap(key, entry)

    def _unmap(self, key: tuple[int, int], entry: _ObjectMappings) -> None:
        del self.files[key]
        for mm in entry.mappings:
            try:
                mm.close()
            except BufferError:  # pragma: no cover - a view outlived every registration
                log.warning("mapping of registered object %s still exported; left to the GC", key)

    def close(self) -> None:
        """Unmap everything (the System must have released every registration)."""
        for key, entry in list(self.files.items()):
            self._unmap(key, entry)
