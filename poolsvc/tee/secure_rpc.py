"""The secure world's side of RPC: memory a trusted app asks the normal world for.

During a call an app may ask the normal world for memory
(``SessionEnv.rpc_alloc``): the secure world sends SHM_ALLOC (value a=type,
b=size, c=align) through ``rpc`` (the normal world's RPC server, made on
first use by ``rpc_factory``) and checks the answer as OP-TEE does:
``ret == 0``, one parameter, attr TMEM_OUTPUT (plain: inside the carve-out)
or TMEM_OUTPUT|NONCONTIG (a page list, parsed and checked), size at least
what was asked, a cookie not naming live RPC memory (nor, when ``strict``,
a registration).  A bad answer is freed again (SHM_FREE) and the app gets
OUT_OF_MEMORY.  Freed RPC memory is unmapped (``Memref.revoke``): a stale
reference reaches nothing.  Each RPC travels as bytes and its answer is
re-read, as through shared memory.

Invariant: ``rpc_shms`` holds exactly the RPC memory of live sessions.

Concurrency: an RPC is served inside the call that makes it (one thread).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..constants import ATTR_NONCONTIG, PAGE_MASK, PAGE_SIZE, RPC_MAX_PARAMS, Attr, RpcCmd, RpcShmType
from ..errors import TEE_SUCCESS, BadParameters, ItemNotFound, OutOfMemory, PoolsvcError
from .msg import MsgArg, MsgParam, unpack
from .ta import Memref, ParamType


class RpcMemory(Memref):
    """Normal-world memory an app obtained by RPC SHM_ALLOC (a read-write Memref).

    ``cookie`` names it to the normal world; ``shm_type`` is APPL/KERNEL/GLOBAL;
    ``freed`` once given back.
    """

    __slots__ = ("cookie", "shm_type", "session_id", "freed")

    # Set by SecureWorld._rpc_alloc right after the mapping is made.
    cookie: int
    shm_type: int
    session_id: int
    freed: bool


class SecureRpc:
    """The RPC client of a secure world (a base of SecureWorld, which provides the
    attributes declared here)."""

    memory: Any
    rpc: Any
    _rpc_arg: Any  # threading.local: ``pa`` of the RPC argument of this thread's call
    rpc_factory: Callable[[], Any] | None
    rpc_shms: dict[int, RpcMemory]
    registered: dict[int, Any]
    strict: bool
    stats: Any
    parse_noncontig: Callable[[int, int], tuple[np.ndarray, int]]

    def _rpc_port(self) -> Any:
        if self.rpc is None and self.rpc_factory is not None:
            self.rpc = self.rpc_factory()
        if self.rpc is None:
            raise OutOfMemory("no normal world to serve RPC")
        return self.rpc

    def _rpc_send(self, msg: MsgArg) -> MsgArg:
        """One RPC round trip.

        With an RPC argument for the call being served (SEC_CAP RPC_ARG: the
        driver placed it after the call's message), the request is written
        there, the normal world reads it and answers in place
        (``handle_arg``), and the answer is read back from memory; otherwise
        the request travels as bytes and the answer is re-read.
        """
        port = self._rpc_port()
        pa = getattr(self._rpc_arg, "pa", 0)
        handle_arg = getattr(port, "handle_arg", None)
        if pa and handle_arg is not None:
            if len(msg.params) > RPC_MAX_PARAMS:
                raise BadParameters(f"an RPC of {len(msg.params)} parameters does not fit the "
                                    f"RPC argument ({RPC_MAX_PARAMS})")
            data = msg.pack()
            self.memory.write(pa, data)
            handle_arg(pa)
            return unpack(self.memory.read(pa, len(data)))
        request = unpack(msg.pack())
        handle = getattr(port, "handle", port)
        handle(request)
        return unpack(request.pack())

    def rpc_alloc(self, session: Any, size: int, shm_type: int, align: int) -> RpcMemory:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= 0xFFFFFFFF:
            raise BadParameters(f"RPC allocation of {size!r} bytes")
        if shm_type not in (RpcShmType.APPL, RpcShmType.KERNEL, RpcShmType.GLOBAL):
            raise BadParameters(f"RPC shm type {shm_type!r} is not APPL, KERNEL or GLOBAL")
        reply = self._rpc_send(MsgArg(cmd=RpcCmd.SHM_ALLOC, params=[
            MsgParam(Attr.VALUE_INPUT, int(shm_type), size, align)]))
        if reply.ret != TEE_SUCCESS:
            raise OutOfMemory(f"normal world refused RPC SHM_ALLOC of {size:#x} bytes "
                              f"(ret {reply.ret:#x})")
        if len(reply.params) != 1:
            raise OutOfMemory(f"RPC SHM_ALLOC answer has {len(reply.params)} parameters, not 1")
        p = reply.params[0]
        cookie = p.c
        try:
            memory = self._rpc_memory(p, size)
        except PoolsvcError as exc:
            self._rpc_send_free(shm_type, cookie)
            raise OutOfMemory(f"bad RPC SHM_ALLOC answer: {exc}") from None
        memory.cookie = cookie
        memory.shm_type = int(shm_type)
        memory.session_id = session.id
        memory.freed = False
        self.rpc_shms[cookie] = memory
        session.rpc[cookie] = memory
        self.stats.rpc_alloc += 1
        return memory

    def _rpc_memory(self, p: MsgParam, size: int) -> RpcMemory:
        """Check an SHM_ALLOC answer as OP-TEE does and map it."""
        if p.attr not in (Attr.TMEM_OUTPUT, Attr.TMEM_OUTPUT | ATTR_NONCONTIG):
            raise BadParameters(f"attr {p.attr:#x} is not TMEM_OUTPUT[|NONCONTIG]")
        if p.b < size:
            raise BadParameters(f"size {p.b:#x} is less than the {size:#x} asked for")
        size = p.b
        # RPC memory is kept by cookie, so a cookie of live RPC memory is refused; OP-TEE
        # keeps it apart from the registrations, so a registered cookie is only refused
        # when strict
        if p.c in self.rpc_shms or (self.strict and p.c in self.registered):
            raise BadParameters(f"cookie {p.c:#x} is already in use")
        if p.attr & ATTR_NONCONTIG:
            pages, offset = self.parse_noncontig(p.a, size)
        else:
            base, rsize = self.memory.regions["static"]
            if not (p.a and base <= p.a and p.a + size <= base + rsize):
                raise BadParameters(f"contiguous buffer {p.a:#x}+{size:#x} is not inside the "
                                    "static carve-out")
            first = p.a & ~PAGE_MASK
            count = ((p.a & PAGE_MASK) + size + PAGE_MASK) // PAGE_SIZE
            pages = np.arange(first, first + count * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
            offset = p.a & PAGE_MASK
        return RpcMemory(self.memory, ParamType.MEMREF_INOUT, pages, offset, size)

    def _rpc_send_free(self, shm_type: int, cookie: int) -> int:
        reply = self._rpc_send(MsgArg(cmd=RpcCmd.SHM_FREE, params=[
            MsgParam(Attr.VALUE_INPUT, int(shm_type), cookie, 0)]))
        return reply.ret

    def rpc_free(self, session: Any, memory: RpcMemory) -> None:
        if not isinstance(memory, RpcMemory) or session.rpc.get(memory.cookie) is not memory:
            raise ItemNotFound(f"{memory!r} is not RPC memory of session {session.id}")
        memory.revoke()
        memory.freed = True
        del session.rpc[memory.cookie]
        del self.rpc_shms[memory.cookie]
        self.stats.rpc_free += 1
        self._rpc_send_free(memory.shm_type, memory.cookie)


__all__ = ["RpcMemory", "SecureRpc"]
