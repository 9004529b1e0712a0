"""What the daemon hands out: shm descriptors, storage descriptors, sealed memory,
and the shadows of clients' registered objects.

Four pieces sit between the System and the wire:

- :class:`SegmentTokens` (one per connection): which storage segments of the
  connection's *own* arena the client has mapped, each under a token that is
  never reused on that connection.  A segment's descriptor is sent once, the
  first time a buffer in it is described; when the arena returns the segment
  to the OS, the next SHM_CLOSE reply names its token so the client unmaps
  it.  Only segments of the connection's own arena are ever sent: that check
  sits in :meth:`SegmentTokens.token_for`, at the one place descriptors are
  issued.
- :func:`describe`: the DESC body of an Shm, plus the descriptor to send.
- :class:`RegisteredFiles` (one per daemon): objects that clients register.
  A client sends a descriptor of its own POSIX shm object; the daemon never
  maps it (the client could shrink it under the mapping: SIGBUS).  It has
  the System register a daemon-owned shadow of the window instead, by the
  shadow's descriptor (``Context.register_fd``), and moves the bytes with
  ``pread`` / ``pwrite`` around each call that names the buffer.
- :func:`sealed_storage`: daemon-owned memory that clients map (the shm
  slots): a memfd sealed against shrinking and growing.

Memory safety against clients (docs/security.md): memory the daemon owns and
hands out is sealed; memory a client owns is only ever read and written
through its descriptor, never through a mapping, unless the client sealed it
against shrinking (:func:`cannot_shrink`: then it is registered zero-copy).

Invariants:
  ``RegisteredFiles.files[key].refs == live registrations of object key`` (all clients)
  ``== sum(shadow.refs for shadow in files[key].shadows)``, and every shadow's refs > 0;
  every window registered of object key lies inside one shadow in ``files[key].shadows``;
  every token in ``SegmentTokens.tokens`` names a storage of that connection's arena.

Arena segments come from :mod:`poolsvc.storage`, which creates them as memfds
sealed against resizing; :meth:`SegmentTokens.token_for` seals again
(:func:`seal`, idempotent) before a descriptor leaves and refuses a segment
that cannot be sealed.

Concurrency: the daemon's loop thread only.
"""
from __future__ import annotations

import fcntl
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from ..constants import PAGE_SIZE
from ..errors import BadParameters, InternalError, NotSharedMemory, OutOfMemory
from ..storage import SHM_DIR, Storage
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
        if not seal(storage.fd):
            raise InternalError(f"refusing to send storage {storage.name}: it cannot be sealed against "
                                "resizing")
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
    backing = shm.backing
    # A contiguous shm knows its (first page, count): no page array is built.
    run = shm.run
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
class _Shadow:
    """The daemon's own copy of a page-aligned window of a client object."""

    storage: Storage
    #: Offset in the client's object of the shadow's first byte (a page multiple).
    base: int
    #: Live registrations in this shadow.
    refs: int = 0

    def covers(self, offset: int, length: int) -> bool:
        return self.base <= offset and offset + length <= self.base + self.storage.size


@dataclass
class _Object:
    """One client object: the daemon's descriptor of it, its shadows, its live registrations."""

    fd: int
    shadows: list[_Shadow] = field(default_factory=list)
    refs: int = 0


@dataclass(frozen=True)
class Registration:
    """Where one registered buffer's bytes live: ``length`` bytes at ``offset`` of the
    client's object (descriptor ``fd``), shadowed at ``shadow_offset`` of ``storage``;
    ``storage`` None for a zero-copy registration of a sealed object (no shadow)."""

    key: tuple[int, int]
    fd: int
    offset: int
    length: int
    storage: Storage | None
    shadow_offset: int


#: The key of a zero-copy registration (it has no entry in RegisteredFiles).
ZERO_COPY = (-1, -1)


def _check_shared_memory(fd: int) -> os.stat_result:
    """fstat of a received descriptor that must be a writable POSIX shm object."""
    try:
        info = os.fstat(fd)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise BadParameters(f"received descriptor {fd} cannot be inspected: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode) or info.st_dev != _shm_device():
        raise NotSharedMemory(f"received descriptor is not a POSIX shared-memory object under "
                              f"{SHM_DIR} (file mode {info.st_mode:#o})")
    if mode != os.O_RDWR:
        raise NotSharedMemory("received descriptor is not open for reading and writing; a registered "
                              "buffer must be writable")
    return info


def _shm_device() -> int:
    return os.stat(SHM_DIR).st_dev


class RegisteredFiles:
    """The objects clients registered, bounced through daemon-owned shadows.

    A client's object can shrink under any mapping of it, and touching a
    mapped page past its end raises SIGBUS in whoever touches it.  So the
    daemon never maps a client's object: it keeps a descriptor of it and
    registers, with the System, a *shadow* of the registered window (its own
    unlinked shm object, which no client holds), by the shadow's descriptor.  The bytes move at the
    only moments the secure world may look at them: :meth:`copy_in` before a
    call that names the buffer, :meth:`copy_out` after it (``pread`` and
    ``pwrite``, which report a short object instead of faulting).

    Two registrations of one object whose windows fit one shadow share it,
    so the same bytes keep the same physical pages.  A shadow goes with the
    last registration in it; the object's descriptor with the last of the
    object's.  So what a client holds here is bounded by what it has
    registered (and counted in its quota).
    """

    def __init__(self, prefix: str = "/poolsvc") -> None:
        self.prefix = prefix
        self.files: dict[tuple[int, int], _Object] = {}

    @property
    def mapped(self) -> int:
        """Number of shadows held (for stats and leak checks)."""
        return sum(len(entry.shadows) for entry in self.files.values())

    def map(self, fd: int, offset: int, length: int) -> Registration:
        """The registration of ``[offset, offset+length)`` of the object behind ``fd``:
        where its shadow is, for the System to register by descriptor.

        Does not take a reference (call :meth:`get` once the registration
        stands) and does not close ``fd``.  NotSharedMemory for a descriptor
        that is not a writable POSIX shm object, BadParameters for a range
        outside the object, OutOfMemory when no shadow can be made.
        """
        info = _check_shared_memory(fd)
        size = info.st_size
        if length <= 0:
            raise BadParameters(f"register length {length} must be positive")
        if offset < 0 or offset + length > size:
            raise BadParameters(f"buffer [{offset:#x}, {offset + length:#x}) runs past the end of "
                                f"its object ({size:#x} bytes)")
        key = (info.st_dev, info.st_ino)
        entry = self.files.get(key)
        shadow = None
        if entry is not None:
            shadow = next((s for s in entry.shadows if s.covers(offset, length)), None)
        if shadow is None:
            base = offset - offset % PAGE_SIZE
            end = -(-(offset + length) // PAGE_SIZE) * PAGE_SIZE
            storage = Storage.create(end - base, self.prefix)
            shadow = _Shadow(storage, base)
            if entry is None:
                entry = self.files[key] = _Object(os.dup(fd))
            entry.shadows.append(shadow)
        assert entry is not None
        return Registration(key, entry.fd, offset, length, shadow.storage, offset - shadow.base)

    @staticmethod
    def copy_in(reg: Registration, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of the buffer from the client's object into its shadow.

        NotSharedMemory when the object no longer holds them (the client shrank it).
        """
        start, end = max(0, start), min(reg.length, end)
        if start >= end:
            return
        assert reg.storage is not None
        view = memoryview(reg.storage.mm)[reg.shadow_offset + start:reg.shadow_offset + end]
        try:
            got = os.preadv(reg.fd, [view], reg.offset + start)
        finally:
            view.release()
        if got != end - start:
            raise NotSharedMemory(f"registered buffer [{reg.offset + start:#x}, {reg.offset + end:#x}) "
                                  f"of its object is gone: the object was shrunk to "
                                  f"{reg.offset + start + got:#x} bytes or less")

    @staticmethod
    def copy_out(reg: Registration, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of the shadow back into the client's object (never
        past the object's current end)."""
        start, end = max(0, start), min(reg.length, end)
        try:
            end = min(end, os.fstat(reg.fd).st_size - reg.offset)
        except OSError:  # pragma: no cover - the daemon holds the descriptor
            return
        if start >= end:
            return
        assert reg.storage is not None
        view = memoryview(reg.storage.mm)[reg.shadow_offset + start:reg.shadow_offset + end]
        try:
            os.pwritev(reg.fd, [view], reg.offset + start)
        finally:
            view.release()

    def get(self, reg: Registration) -> None:
        """One more live registration: ``reg``."""
        entry = self.files[reg.key]
        entry.refs += 1
        self._shadow(entry, reg).refs += 1

    def put(self, reg: Registration) -> None:
        """Registration ``reg`` released; the last one of a shadow drops it, the last
        one of an object forgets the object."""
        entry = self.files.get(reg.key)
        if entry is None:
            raise InternalError(f"registered object {reg.key} released more often than registered")
        entry.refs -= 1
        self._shadow(entry, reg).refs -= 1
        self.forget_unused(reg)

    def forget_unused(self, reg: Registration) -> None:
        """Drop ``reg``'s shadow, and its object, if no registration uses them (after a
        release, or a registration that failed)."""
        entry = self.files.get(reg.key)
        if entry is None:
            return
        for shadow in [s for s in entry.shadows if s.refs <= 0]:
            entry.shadows.remove(shadow)
            self._close_shadow(reg.key, shadow)
        if entry.refs <= 0 and not entry.shadows:
            del self.files[reg.key]
            os.close(entry.fd)

    @staticmethod
    def _shadow(entry: _Object, reg: Registration) -> _Shadow:
        for shadow in entry.shadows:
            if shadow.storage is reg.storage:
                return shadow
        raise InternalError(f"registration of {reg.key} names a shadow its object does not have")

    @staticmethod
    def _close_shadow(key: tuple[int, int], shadow: _Shadow) -> None:
        if not shadow.storage.close():  # pragma: no cover - a view outlived every registration
            log.warning("shadow of registered object %s still exported; left to the GC", key)

    def close(self) -> None:
        """Drop everything (the System must have released every registration)."""
        for key, entry in list(self.files.items()):
            del self.files[key]
            os.close(entry.fd)
            for shadow in entry.shadows:
                self._close_shadow(key, shadow)


def sealed_storage(size: int, name: str) -> Storage:
    """A new daemon-owned object of ``size`` bytes that nobody can resize: a memfd
    sealed with ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``, mapped shared.

    A client that receives its descriptor can map and write it, but
    ``ftruncate`` fails (EPERM), so the daemon's mapping can never lose pages
    under it (no SIGBUS).  OutOfMemory when the OS refuses.
    """
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise OutOfMemory(f"cannot create a {size:#x}-byte memfd: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except OSError as exc:
        os.close(fd)
        raise OutOfMemory(f"cannot size and seal a {size:#x}-byte memfd: {exc.strerror}") from exc
    return Storage.from_fd(fd, size, name)


#: The seals of daemon-owned memory that clients map.
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def seal(fd: int) -> bool:
    """Seal the object behind ``fd`` against shrinking and growing, if the OS lets us
    (a memfd made with MFD_ALLOW_SEALING); whether it is sealed now."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        pass
    return is_sealed(fd)


def cannot_shrink(fd: int) -> bool:
    """Whether the object behind ``fd`` is sealed against shrinking (F_SEAL_SHRINK): a
    mapping of it can never lose pages, so mapping it is safe whoever else holds it."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False


def is_sealed(fd: int) -> bool:
    """Whether the object behind ``fd`` can neither shrink nor grow."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) == (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
