"""The normal world's RPC server: what the secure world asks of it during a call.

:class:`RpcServer` serves SHM_ALLOC and SHM_FREE as the Linux driver does
(``smc_abi.c``: ``handle_rpc_func_cmd_shm_alloc`` / ``_shm_free``), with
``ret_origin`` COMMS on every answer:

- SHM_ALLOC: parameter 0 must be VALUE_INPUT and any further ones NONE (else
  BAD_PARAMETERS); type APPL or KERNEL (GLOBAL and others: BAD_PARAMETERS);
  a size the pool cannot serve, 0 included, is OUT_OF_MEMORY, and so is one
  the System's ``rpc_admit`` hook refuses (the pool service's quota).  The buffer is
  a private buffer of the context ``tee-rpc`` (never REGISTER_SHM'd, no id),
  answered in parameter 0 in the formats of docs/design.md section 5: a
  NONCONTIG page list (TMEM_OUTPUT|NONCONTIG) from the dynamic pool, a plain
  TMEM_OUTPUT physical address from the reserved pool.  The list pages live
  until the current call returns (``call_done``).  The requested alignment
  is not honoured beyond the pool's own (page for dynamic, 16 bytes for
  static), as in Linux.  Linux gives APPL memory from the supplicant's
  registered user buffers; here both types are private buffers, charged to
  ``tee-rpc``, so that the secure world's cookie table holds exactly the
  normal world's registrations.
- SHM_FREE: exactly one VALUE_INPUT parameter (else BAD_PARAMETERS); the
  buffer of that cookie, if this server handed it out, is released, and the
  answer is SUCCESS whatever the cookie and type (Linux trusts the cookie as
  a pointer; poolsvc looks it up so as not to free what it did not hand
  out).  ``strict`` (``Config.strict``): an unknown cookie or a type other
  than APPL / KERNEL is answered BAD_PARAMETERS.

The System hands a factory of its RpcServer to the secure world, which makes
the server on first use; neither imports the other.

Concurrency: an RPC is served inside the call that makes it (one thread).
"""
from __future__ import annotations

from typing import Any

from ..constants import ATTR_NONCONTIG, MSG_ARG_HEADER_SIZE, Attr, Origin, RpcCmd, RpcShmType
from ..errors import TEE_SUCCESS, BadParameters, NotSupported, OutOfMemory, PoolsvcError
from .driver import KernelPages
from .msg import MsgArg, MsgParam, arg_size, peek_num_params, unpack


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
        """Serve one RPC message in place (``ret``, origin COMMS, the answer)."""
        msg.ret = TEE_SUCCESS
        msg.ret_origin = Origin.COMMS
        try:
            if msg.cmd == RpcCmd.SHM_ALLOC:
                self._shm_alloc(msg)
            elif msg.cmd == RpcCmd.SHM_FREE:
                self._shm_free(msg)
            else:
                raise NotSupported(f"RPC command {msg.cmd} is not supported")
        except PoolsvcError as exc:
            msg.ret = exc.tee_code

    def handle_arg(self, pa: int) -> None:
        """Serve the RPC the secure world wrote in the RPC argument at ``pa`` (SEC_CAP
        RPC_ARG), answering in place, as the driver reads it from its preallocated
        argument (``optee_handle_rpc`` with ``rpc_arg``)."""
        memory = self.system.memory
        request = unpack(memory.read(pa, arg_size(peek_num_params(memory.read(pa, MSG_ARG_HEADER_SIZE)))))
        self.handle(request)
        memory.write(pa, request.pack())

    def _shm_alloc(self, msg: MsgArg) -> None:
        params = msg.params
        if not params or params[0].attr != Attr.VALUE_INPUT:
            raise BadParameters("RPC SHM_ALLOC: parameter 0 must be VALUE_INPUT")
        if any(p.attr != Attr.NONE for p in params[1:]):
            raise BadParameters("RPC SHM_ALLOC: parameters after the first must be NONE")
        p = params[0]
        if p.a not in (RpcShmType.APPL, RpcShmType.KERNEL):
            raise BadParameters(f"RPC SHM_ALLOC type {p.a} is not APPL or KERNEL")
        size = p.b
        if size == 0:
            raise OutOfMemory("RPC SHM_ALLOC of 0 bytes: the pools cannot serve it")
        admit = self.system.rpc_admit
        if admit is not None:
            admit(size)
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
        if len(msg.params) != 1 or msg.params[0].attr != Attr.VALUE_INPUT:
            raise BadParameters("RPC SHM_FREE expects one VALUE_INPUT parameter")
        p = msg.params[0]
        known_type = p.a in (RpcShmType.APPL, RpcShmType.KERNEL)
        if self.system.tee.strict:  # Config.strict, as the secure world holds it
            if not known_type:
                raise BadParameters(f"RPC SHM_FREE type {p.a} is not APPL or KERNEL (strict)")
            if p.b not in self.shms:
                raise BadParameters(f"RPC SHM_FREE of unknown cookie {p.b:#x} (strict)")
        shm = self.shms.pop(p.b, None) if known_type else None
        if shm is not None and not shm.closed:
            shm.close()

    def call_done(self) -> None:
        """Free the page lists of the call that just returned."""
        while self._lists:
            self.system.driver.free_kernel_pages(self._lists.pop())

    def stats(self) -> dict[str, int]:
        """Live RPC buffers and their bytes."""
        return {"buffers": len(self.shms), "bytes": sum(s.size for s in self.shms.values())}


__all__ = ["RpcServer"]
