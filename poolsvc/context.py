"""A client context of the embedded System, as opening ``/dev/tee0`` gives one.

:class:`Context` offers the constructors of the Linux TEE subsystem
(docs/design.md section 4), each of which sets exactly its flags:

=====================  ====================  =========================================
constructor            flags                 notes
=====================  ====================  =========================================
alloc_user_buf         DYNAMIC | POOL        page-aligned; id (lowest free from 1)
alloc_kernel_buf       DYNAMIC | POOL        page-aligned; no id (-1)
alloc_priv_buf         PRIV | POOL           16-byte aligned; never registered
register_user_buf      USER_MAPPED | DYNAMIC any alignment, must be writable; id
register_kernel_buf    DYNAMIC               any alignment; no id
=====================  ====================  =========================================

An allocation served by the reserved static pool clears DYNAMIC.  The memory
comes from the System's pools (``poolsvc/pools.py``) and user-memory registry
(``poolsvc/usermem.py``); the context owns its shms (by cookie), its sessions
and its arena (the storage of its pool buffers: dynamic-pool runs, and the
static pool's user and kernel buffers).

Concurrency: a Context belongs to its System's thread.
"""
from __future__ import annotations

from typing import Any, Sequence

from .api import SIZE_LIMIT, check_shm_id, check_size
from .constants import PAGE_SIZE, ShmFlags
from .errors import Closed, ItemNotFound
from .memory import Arena
from .shm import Shm
from .tee.session import Session, close_context_sessions

#: Alignment of alloc_priv_buf (2 * sizeof(long) on 64-bit).
PRIV_ALIGN = 16

# The flags each constructor sets (section 4), computed once: enum arithmetic is
# slow enough to show on the allocation path.
POOL_DYNAMIC = ShmFlags.DYNAMIC | ShmFlags.POOL
POOL_STATIC = ShmFlags.POOL
POOL_PRIV = ShmFlags.PRIV | ShmFlags.POOL
USER_MAPPED = ShmFlags.USER_MAPPED | ShmFlags.DYNAMIC
KERNEL_REG = ShmFlags.DYNAMIC


class Context:
    """A client context, as opening ``/dev/tee0`` gives one.

    Closing it releases everything it holds (its shms, whatever their
    reference counts, and its storage).
    """

    def __init__(self, system: Any, cid: int, name: str = "") -> None:
        self.system = system
        self.cid = cid
        self.name = name or f"ctx{cid}"
        self.shms: dict[int, Shm] = {}  # by cookie
        config = system.config
        # the static pool's user and kernel buffers live in the arena too: a context can
        # never hold more of them than the carve-out, so its arena grows by no more
        step = config.arena_step
        if not system.pools.dynamic_pool and system.pools.static is not None:
            step = min(step, config.static_size)
        self.arena = Arena(system.memory, step, config.shm_prefix, owner=self, frames=system.dynamic)
        # the compiled halves of Arena.take / Arena.give, for the allocation hot path
        self.take_pages = self.arena.pages.take
        self.give_pages = self.arena.pages.give
        # the pool's allocators, bound once for the allocation hot path
        pools = system.pools
        self._dynamic_pool = pools.dynamic_pool
        self._alloc_dynamic = pools.alloc_dynamic
        self._alloc_static = pools.alloc_static
        self.closed = False
        self.sessions: dict[int, Session] = {}

    def _check(self) -> None:
        if self.closed:
            raise Closed(f"context {self.name} is closed")
        self.system.check()

    # -- allocation ------------------------------------------------------------------
    def alloc_user_buf(self, size: int) -> Shm:
        """Allocate a buffer user space can map; it gets an id (DYNAMIC | POOL)."""
        return self._alloc(size, PAGE_SIZE, POOL_DYNAMIC, with_id=True)

    def alloc_kernel_buf(self, size: int) -> Shm:
        """Allocate a driver buffer shared with the TEE; no id (DYNAMIC | POOL)."""
        return self._alloc(size, PAGE_SIZE, POOL_DYNAMIC, with_id=False)

    def alloc_priv_buf(self, size: int) -> Shm:
        """Allocate a driver-private buffer, never registered (PRIV | POOL)."""
        return self._alloc(size, PRIV_ALIGN, POOL_PRIV, with_id=False)

    def _alloc(self, size: int, align: int, flags: ShmFlags, with_id: bool) -> Shm:
        system = self.system
        if self.closed or system.closed:
            self._check()  # raises Closed
        if type(size) is not int or not 0 < size < SIZE_LIMIT:  # (bool is not int here)
            check_size(size)
        if self._dynamic_pool:
            return self._adopt(with_id, self._alloc_dynamic, self, size, flags)
        # an allocation from the static pool clears DYNAMIC
        return self._adopt(with_id, self._alloc_static, self, size, align,
                           POOL_STATIC if flags is POOL_DYNAMIC else flags)

    def _adopt(self, with_id: bool, make: Any, *args: Any) -> Shm:
        """Run ``make(*args)`` with an id reserved first (idr_alloc with NULL, then
        idr_replace, as the kernel does), so a failure frees the id and nothing leaks."""
        ids = self.system.ids
        shm_id = ids.alloc(None) if with_id else -1
        try:
            shm: Shm = make(*args)
        except BaseException:
            if with_id:
                ids.remove(shm_id)
            raise
        if with_id:
            shm.id = shm_id
            ids.replace(shm_id, shm)
        self.shms[shm.cookie] = shm
        return shm

    # -- registration ------------------------------------------------------------------
    def register_user_buf(self, obj: Any) -> Shm:
        """Register a writable buffer, zero-copy; it gets an id.

        Flags USER_MAPPED | DYNAMIC.  Any writable C-contiguous buffer: POSIX
        shm, or private memory (``bytearray``, numpy array, anonymous mmap),
        pinned until released (``poolsvc/usermem.py``).  Raises NotSharedMemory
        for read-only memory, BadParameters for a non-contiguous or empty
        buffer, and (``-EINVAL``) when the secure world refuses it, e.g. without
        DYNAMIC_SHM: the kernel does not look at REG_MEM, it sends REGISTER_SHM
        all the same.
        """
        return self._register(self.system.usermem.register, obj, USER_MAPPED, True)

    def register_kernel_buf(self, obj: Any) -> Shm:
        """Register a writable buffer for the driver's use, as ``register_user_buf``; no id (DYNAMIC)."""
        return self._register(self.system.usermem.register, obj, KERNEL_REG, False)

    def register_fd(self, fd: int, file_offset: int, length: int, user: bool = True) -> Shm:
        """Register ``length`` bytes at ``file_offset`` of the POSIX shm object open as ``fd``.

        What ``register_user_buf`` (``user``) or ``register_kernel_buf`` does for
        a buffer, for a caller that holds the object's descriptor (the pool
        service): the object is mapped from ``fd`` and named by its identity,
        without reading this process's memory maps.  ``fd`` stays the caller's.
        Raises BadParameters when refused, as ``register_user_buf``, NotSharedMemory for a descriptor
        that is not a writable shared-memory object, BadParameters for a range
        outside it.
        """
        return self._register(self.system.usermem.register_fd, (fd, file_offset, length),
                              USER_MAPPED if user else KERNEL_REG, user)

    def _register(self, how: Any, what: Any, flags: ShmFlags, with_id: bool) -> Shm:
        self._check()
        return self._adopt(with_id, how, self, what, flags)

    # -- lookup -------------------------------------------------------------------------
    def shm_from_id(self, shm_id: int) -> Shm:
        """The shm with this id, with one more reference (close() it when done).

        ItemNotFound (EINVAL in the kernel) for a free, reserved or foreign id.
        """
        self._check()
        check_shm_id(shm_id)
        shm = self.system.ids.find(shm_id)
        if shm is None or shm.context is not self or shm.closed:
            raise ItemNotFound(f"no shm with id {shm_id} in context {self.name}")
        shm.acquire()
        return shm

    # -- sessions with trusted apps ----------------------------------------------------
    def open_session(self, uuid: Any, params: Sequence[Any] = (), login: int = 0) -> Session:
        """Open a session with the trusted app ``uuid``: a :class:`poolsvc.tee.session.Session`.

        ``params``: up to 4 parameters (``poolsvc.tee.driver.Value``,
        ``RegisteredMemref``, ``TempMemref``, a Shm, or None).  Raises
        TeeError (code, origin) when the secure world or the app refuses.
        """
        return Session.open(self, uuid, params, login)

    # -- release -------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """Bytes and objects this context holds."""
        return {
            "shms": len(self.shms),
            "bytes": sum(s.size for s in self.shms.values()),
            "arena_bytes": self.arena.bytes_total,
            "sessions": len(self.sessions),
        }

    def close(self) -> None:
        """Release every shm and session of this context, then its storage. Idempotent."""
        if self.closed:
            return
        close_context_sessions(self)
        release = self.system.release
        for shm in list(self.shms.values()):
            shm.retire()
            self.shms.pop(shm.cookie, None)
            release(shm, shm.backing)
        self.arena.close()
        self.closed = True
        self.system.contexts.pop(self.cid, None)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Context {self.name} shms={len(self.shms)}{' closed' if self.closed else ''}>"


__all__ = ["Context", "PRIV_ALIGN"]
