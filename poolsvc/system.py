"""The embedded system: memory, pools, the TEE driver and a secure world, wired together.

:class:`System` is what ``/dev/tee0`` plus the OP-TEE driver plus the secure
world are on a real machine, in one process.  It builds and owns

- ``memory`` (:class:`~poolsvc.memory.PhysicalMemory`: regions, frame table,
  storage) and ``dynamic`` (the frame allocator of dynamic RAM);
- ``pools`` (``poolsvc/pools.py``: the dynamic pool and the reserved static
  pool; ``static`` is the latter's allocator, or None);
- ``usermem`` (``poolsvc/usermem.py``: registration of existing buffers);
- ``tee`` (the secure world, ``poolsvc/tee/secure.py``) and ``driver``
  (``poolsvc/tee/driver.py``: message page, kernel pages, calls), which
  reaches the secure world only through its entries (``serve``, and
  ``driver_entry`` for the compiled registration path); the secure world
  gets a factory of the RPC server (``poolsvc/tee/rpc.py``);
- ``ids`` (the id table of user-visible shms) and the contexts
  (``open_context()``, ``poolsvc/context.py``).

Registration of existing buffers is offered (REG_MEM) only with DYNAMIC_SHM;
without it the driver still sends REGISTER_SHM, which the secure world
refuses (BadParameters: ``-EINVAL``).

Release order (``tee_shm_release``, :meth:`System.release`): a pool buffer is
unregistered from the secure world (if it was registered) and its memory
returned to the pool; a registered buffer is unregistered, then its frames
released.  A refused unregistration is logged and the memory freed all the
same, as the kernel does.  Both pools keep a buffer's bytes in its context's
arena (the static pool's private buffers excepted, ``poolsvc/pools.py``), so
closing a context returns its frames and its storage alike.

Accounting invariants, checked by the tests after every operation:
  ``dynamic.free_frames + dynamic.used_frames == dynamic.nframes``
  ``static.free_bytes + static.used_bytes == static.size``
  ``len(ids) == number of live shms with an id``

Concurrency: a System and everything it hands out belong to one thread at a
time; the pool service serialises its clients' requests onto one System.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Callable

from ._backend import BACKEND, core
from .config import Config
from .constants import PAGE_SIZE, RPC_MAX_PARAMS, SecCaps
from .context import Context
from .errors import Closed, TeeError
from .fragmentation import unusable_indices
from .memory import Arena, PhysicalMemory
from .pools import Pools
from .shm import ArenaRun, Shm, StaticBacking, StaticRun
from .storage import LIVE, cleanup_stale
from .tee.driver import Driver
from .tee.rpc import RpcServer
from .tee.secure import SecureWorld
from .usermem import UserMemory

_log = logging.getLogger(__name__)


class System:
    """An embedded simulated machine: physical memory, pools, contexts and a TEE.

    ``System(config=None)`` uses the default layout (:class:`Config`).  Use it
    as a context manager, or call :meth:`close`; nothing is left in
    ``/dev/shm`` either way (objects are unlinked as soon as they are mapped).
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config = config or Config()
        cleanup_stale(config.shm_prefix)
        self._closed = False
        self.memory = PhysicalMemory(config)
        self.phys = self.memory
        self.ids = core.IdTable()
        self.contexts: dict[int, Context] = {}
        self._cids = itertools.count(1)
        cookies = itertools.count(0x1000)
        self.pool = "dynamic" if config.dynamic_shm else "static"
        self.dynamic = core.FrameAllocator(config.dynamic_base, config.dynamic_size // PAGE_SIZE,
                                           config.max_contig_order)
        self.kernel_arena = Arena(self.memory, min(config.arena_step, 4 << 20),
                                  config.shm_prefix, owner="kernel", frames=self.dynamic)
        self.driver: Any = None
        self.pools: Any = None
        #: Called with the size of each RPC SHM_ALLOC before it is served; raises
        #: OutOfMemory to refuse it (the pool service charges RPC memory to the
        #: quota of the client whose call the trusted app is serving).
        self.rpc_admit: Callable[[int], None] | None = None
        try:
            self.pools = Pools(config, self.memory, cookies)
            self.static = self.pools.static  # core.RangeAllocator when the TEE has a reserved pool
            self.usermem = UserMemory(self.memory, self.dynamic, cookies)
            self.tee = SecureWorld(self.memory, config.sec_caps, config.strict)
            self.tee.rpc_factory = lambda: RpcServer(self)
            rpc_params = RPC_MAX_PARAMS if config.sec_caps & SecCaps.RPC_ARG else 0
            self.driver = Driver(self.memory, self.dynamic, self.kernel_arena, self.static,
                                 config.dynamic_shm, self.tee.serve, self.tee.driver_entry,
                                 rpc_param_count=rpc_params)
            self.pools.register_run = self.driver.register_run
            self.usermem.driver = self.driver
            self._unregister = self.driver.unregister
            # kept for tests/test_tee_review.py until it reads system.driver.msg_pa
            self._msg_pa = self.driver.msg_pa
        except BaseException:
            self._teardown()
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def check(self) -> None:
        """Closed once the System is closed."""
        if self._closed:
            raise Closed("system is closed")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run; read-only.

        ``closed`` implies that every context this System opened is closed (``close``
        closes them first), so an open context stands for an open System.
        """
        return self._closed

    @property
    def last_register_seconds(self) -> float:
        """Seconds the last registration took (page list + REGISTER_SHM)."""
        # kept for poolsvc.study until it reads system.driver.last_register_seconds
        return self.driver.last_register_seconds

    def open_context(self, name: str = "") -> Context:
        """A new client context (like opening /dev/tee0)."""
        self.check()
        cid = next(self._cids)
        ctx = Context(self, cid, name)
        self.contexts[cid] = ctx
        return ctx

    def close(self) -> None:
        """Close every context and release all memory and storage. Idempotent."""
        if self._closed:
            return
        for ctx in list(self.contexts.values()):
            ctx.close()
        self._teardown()
        self._closed = True

    def _teardown(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self.kernel_arena.close()
        if self.pools is not None:
            self.pools.close()

    def __enter__(self) -> "System":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # -- release -----------------------------------------------------------------------------------
    def release(self, shm: Shm, backing: Any) -> None:
        """tee_shm_release: unregister (if registered), free memory, drop the id.

        ``backing`` is ``shm.backing``.  The caller has retired ``shm``
        (``Shm.retire``) and taken it out of its context's table.  When the
        secure world refuses the unregistration, the refusal is logged and the
        memory freed all the same (``tee_shm_release`` /
        ``optee_pool_op_free_helper`` ignore the result but for a message).
        A memref of a running call holds a reference on its shm, so the
        driver's own calls never unregister a buffer a call is using.
        """
        if shm.registered:
            shm.registered = False
            try:
                self._unregister(shm.cookie)
            except TeeError as exc:
                self.unregister_failed(shm.cookie, exc)
        if type(backing) is ArenaRun:
            ctx = shm.context  # Arena.give, inlined: zero, unmap and free in one call
            if ctx.give_pages(backing) > 1:  # its segment emptied, and another is empty too
                ctx.arena.drop_spare()
        elif type(backing) is StaticRun or type(backing) is StaticBacking:
            self.pools.free_static(shm.context, backing)
        else:
            self.usermem.unpin(backing)
        if shm.id > 0:
            self.ids.remove(shm.id)

    @staticmethod
    def unregister_failed(cookie: int, exc: TeeError) -> None:
        """Log a refused UNREGISTER_SHM of ``cookie`` (the memory is freed all the same)."""
        _log.error("unregister shm cookie %#x failed: %s", cookie, exc)

    # -- observability ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Pools, frames, ids, storage and per-context usage, as plain data."""
        dyn = self.dynamic
        blocks = dyn.free_blocks_per_order()
        out: dict[str, Any] = {
            "backend": BACKEND,
            "pool": self.pool,
            "caps": {"sec_caps": int(self.config.sec_caps), "gen_caps": int(self.config.gen_caps)},
            "dynamic": {
                "base": self.config.dynamic_base,
                "frames": dyn.nframes,
                "free_frames": dyn.free_frames,
                "used_frames": dyn.used_frames,
                "largest_free_run": dyn.largest_free_run,
                "free_blocks_per_order": [int(x) for x in blocks],
                "unusable_index": unusable_indices(blocks),
            },
            "static": None,
            "ids": len(self.ids),
            "registered_cookies": len(self.tee.registered),
            "mapped_frames": self.memory.table.mapped_frames,
            "storage": {"objects": LIVE["storage"], "fds": LIVE["fd"],
                        "kernel_arena_bytes": self.kernel_arena.bytes_total},
            "contexts": {ctx.name: ctx.usage() for ctx in self.contexts.values()},
            "pid": os.getpid(),
        }
        if self.static is not None:
            st = self.static
            out["static"] = {"base": st.base, "size": st.size, "free": st.free_bytes,
                             "used": st.used_bytes, "largest_free": st.largest_free,
                             "allocations": st.count}
        return out

    def __repr__(self) -> str:
        return f"<System pool={self.pool} contexts={len(self.contexts)}{' closed' if self._closed else ''}>"


__all__ = ["System"]
