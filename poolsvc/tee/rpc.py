"""The normal world's RPC server: what the secure world asks of it during a call.

:class:`RpcServer` serves SHM_ALLOC (types APPL, KERNEL, GLOBAL) from the
System's pool as a private buffer of the context ``tee-rpc`` (so it is never
REGISTER_SHM'd and carries no id), answered in the formats of docs/design.md
section 5: a NONCONTIG page list (TMEM_OUTPUT|NONCONTIG) from the dynamic
pool, a plain TMEM_OUTPUT physical address from the reserved pool.  The list
pages live until the current call returns (``call_done``).  The requested
alignment is not honoured beyond the pool's own (page for dynamic, 16 bytes
for static), as in Linux.  SHM_FREE releases a buffer by cookie.  Linux gives
APPL memory from the supplicant's registered user buffers; here every type is
a private buffer, charged to ``tee-rpc``, so that the secure world's cookie
table holds exactly the normal world's registrations.

The System hands a factory of its RpcServer to the secure world, which makes
the server on first use; neither imports the other.

Concurrency: an RPC is served inside the call that makes it (one thread).
"""
from __future__ import annotations

from typing import Any

from ..constants import ATTR_NONCONTIG, Attr, RpcCmd, RpcShmType
from ..errors import TEE_SUCCESS, BadParameters, NotSupported, PoolsvcError
from .driver import KernelPages
from .msg import MsgArg, MsgParam


class RpcServer:
    """Serves the secure world's RPC requests (SHM_ALLOC, SHM_FREE) from a System's pools.

    ``handle(msg)`` fills ``ret`` and the answer in place; ``call_done()``
    frees the page lists made during the call that just ended.
    Invariant: ``shms`` maps each cookie handed out and not yet freed.
    """

    CONTEXT_NAME = "tee-rpc"

    def __init__(self, system: Any) -> None:
        self.system = system
        self.ctx: Any = None
        self.shms: dict[int, Any] = {}
        self._lists: list[KernelPages] = []

    def _context(self) -> Any:
        if self.ctx is None or self.ctx.closed:
            self.shms.clear()
            self.ctx = self.system.open_context(self.CONTEXT_NAME)
        return self.ctx

    def drop_context(self) -> None:
        """The context is closing: forget it and its buffers (it releases them)."""
        self.shms.clear()
        self.ctx = None

    def handle(self, msg: MsgArg) -> None:
        """Serve one RPC message in place."""
        msg.ret = TEE_SUCCESS
        try:
            if msg.cmd == RpcCmd.SHM_ALLOC:
                self._shm_alloc(msg)
            elif msg.cmd == RpcCmd.SHM_FREE:
                self._shm_free(msg)
            else:
                raise NotSupported(f"RPC command {msg.cmd} is not supported")
        except PoolsvcError as exc:
            msg.ret = exc.tee_code

    @staticmethod
    def _value(msg: MsgArg) -> MsgParam:
        if len(msg.params) != 1 or msg.params[0].attr != Attr.VALUE_INPUT:
            raise BadParameters("RPC expects one VALUE_INPUT parameter")
        p = msg.params[0]
        if p.a not in (RpcShmType.APPL, RpcShmType.KERNEL, RpcShmType.GLOBAL):
            raise BadParameters(f"RPC shm type {p.a} is not APPL, KERNEL or GLOBAL")
        return p

    def _shm_alloc(self, msg: MsgArg) -> None:
        p = self._value(msg)
        size = p.b
        if size == 0:
            raise BadParameters("RPC SHM_ALLOC of 0 bytes")
        shm = self._context().alloc_priv_buf(size)
        try:
            if self.system.pool == "dynamic":
                kpages = self.system.driver.page_list(shm.pages, shm.offset)
                self._lists.append(kpages)
                answer = MsgParam(Attr.TMEM_OUTPUT | ATTR_NONCONTIG, kpages.pa | shm.offset,
                                  shm.size, shm.cookie)
            else:
                answer = MsgParam(Attr.TMEM_OUTPUT, shm.paddr, shm.size, shm.cookie)
        except BaseException:
            shm.close()
            raise
        self.shms[shm.cookie] = shm
        msg.params[0] = answer

    def _shm_free(self, msg: MsgArg) -> None:
        p = self._value(msg)
        shm = self.shms.pop(p.b, None)
        if shm is None:
            raise BadParameters(f"RPC SHM_FREE of unknown cookie {p.b:#x}")
        if not shm.closed:
            shm.close()

    def call_done(self) -> None:
        """Free the page lists of the call that just returned."""
        while self._lists:
            self.system.driver.free_kernel_pages(self._lists.pop())

    def stats(self) -> dict[str, int]:
        """Live RPC buffers and their bytes."""
        return {"buffers": len(self.shms), "bytes": sum(s.size for s in self.shms.values())}


__all__ = ["RpcServer"]
