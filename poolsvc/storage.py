"""Storage objects: the OS calls behind poolsvc's memory, in one small module.

Everything that calls ``memfd_create``, ``mmap`` or ``ftruncate`` lives here;
allocator and pool logic never does.  A :class:`Storage` is one anonymous
shared-memory object (a memfd), mapped shared and pre-faulted:

- mode ``0600``, named ``{prefix}-{pid}-{random}`` for ``/proc/<pid>/maps``
  readers, but with no name in any file system: it lives only as open
  descriptors and mappings, which the kernel frees when the last one goes
  (a SIGKILL at any moment leaves nothing in ``/dev/shm``);
- sealed against shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW``), so
  a process it is shared with (a client of the pool service receives its
  arena's descriptors) can write it but never truncate it under a mapping;
- the descriptor is kept open so that it can be passed to another process
  with ``SCM_RIGHTS`` (the pool service does), and closed by :meth:`close`.

:func:`cleanup_stale` removes ``/dev/shm`` objects named after a dead pid
with poolsvc's prefix, which a process killed while creating a POSIX shm
object of that name leaves (every System runs it on start, as iceoryx's
RouDi removes what a crashed predecessor left).

Concurrency: not thread-safe; each Storage belongs to one owner.
Counters: ``LIVE`` holds the number of open Storage objects and their
descriptors; tests assert it balanced.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
from collections import Counter

import posix_ipc

from .errors import OutOfMemory, PoolsvcError

SHM_DIR = "/dev/shm"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

#: Open storage objects and descriptors of this process, for leak checks.
LIVE: Counter[str] = Counter()


class Storage:
    """One mapped POSIX shared-memory object.

    Attributes: ``size`` (bytes), ``fd`` (open descriptor, or -1 after close),
    ``mm`` (the shared ``mmap``), ``name`` (the unlinked name, for diagnostics).
    """

    __slots__ = ("name", "size", "fd", "mm", "__weakref__")

    def __init__(self, name: str, fd: int, size: int, mm: mmap.mmap) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.mm = mm
        LIVE["storage"] += 1
        LIVE["fd"] += 1

    @classmethod
    def create(cls, size: int, prefix: str = "/poolsvc") -> "Storage":
        """Create, seal, map (pre-faulted) a new anonymous object of ``size`` bytes.

        The object is a memfd sealed against shrinking and growing, so that a
        process it is shared with can write it but never resize it under a
        mapping (no SIGBUS).  Raises OutOfMemory when the OS refuses the object
        or the mapping.
        """
        if size <= 0 or size % mmap.PAGESIZE:
            raise PoolsvcError(f"storage size {size:#x} is not a positive multiple of the page size")
        name = f"{prefix.lstrip('/')}-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise OutOfMemory(f"cannot create a {size:#x}-byte memory object: {exc.strerror}") from exc
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise OutOfMemory(f"cannot size, seal and map a {size:#x}-byte memory object: {exc}") from exc
        return cls(name, fd, size, mm)

    @classmethod
    def from_fd(cls, fd: int, size: int, name: str = "<fd>") -> "Storage":
        """Map an object received as a descriptor (takes ownership of ``fd``)."""
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise OutOfMemory(f"cannot map a received {size:#x}-byte object: {exc}") from exc
        return cls(name, fd, size, mm)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> bool:
        """Unmap and close; idempotent.

        Returns False when the mapping is still exported (a memoryview or numpy
        array of it is alive): the descriptor is closed anyway and the mapping
        goes when the last view goes; the object was unlinked long ago.
        """
        if self.fd < 0:
            return True
        clean = True
        try:
            self.mm.close()
        except BufferError:
            clean = False
        os.close(self.fd)
        self.fd = -1
        LIVE["storage"] -= 1
        LIVE["fd"] -= 1
        return clean

    def __repr__(self) -> str:
        return f"<Storage {self.name} size={self.size:#x} fd={self.fd}>"


_STALE = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-[0-9a-f]{32}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = "/poolsvc") -> list[str]:
    """Unlink objects named ``{prefix}-{pid}-...`` whose creator pid is dead.

    Returns the names removed.  Objects of live processes are left alone.
    """
    removed: list[str] = []
    want = prefix.lstrip("/")
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry)
        if not match or match.group("prefix") != want:
            continue
        if _pid_alive(int(match.group("pid"))):
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + entry)
            removed.append("/" + entry)
        except posix_ipc.Error:
            pass
    return removed
