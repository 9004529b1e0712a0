"""The normal-world driver's end of the message call: what ``drivers/tee/optee`` does
to talk to the secure world.

:class:`Driver` owns

- the message page, where ``struct optee_msg_arg`` is placed and handed over
  by physical address (a kernel page of dynamic RAM with DYNAMIC_SHM, else a
  page of the reserved static pool), and, while any session is open, the
  cancel message that only :meth:`Driver.cancel` uses (a header-sized
  block of the static pool when there is one and it has room, else a
  kernel page): Linux takes each call's message from its cache of messages
  (``optee_get_msg_arg``), so a CANCEL never overwrites the call it
  cancels;
- kernel pages: contiguous dynamic frames backed by the kernel arena, for the
  message page and for page lists longer than one list page;
- :meth:`Driver.page_list`, the one builder of an OP-TEE NONCONTIG page list in
  kernel pages (REGISTER_SHM, temporary memrefs, RPC SHM_ALLOC answers);
- the calls: :meth:`Driver.call_smc` (any message: the SMC-level result and
  the reply), :meth:`Driver.call` (a refusal at the SMC level answered
  TEEC_ERROR_COMMUNICATION / origin COMMS, as ``optee_open_session`` and
  ``optee_invoke_func`` do), :meth:`Driver.register` /
  :meth:`Driver.register_run` (REGISTER_SHM: any refusal is ``-EINVAL``,
  a :class:`~poolsvc.errors.BadParameters`, as in ``optee_shm_register``)
  and :meth:`Driver.unregister` (UNREGISTER_SHM).  With DYNAMIC_SHM the
  one-parameter commands go through the compiled ``core.SmcDriver``; a list
  of one list page (up to 511 pages) is built by it in a fresh frame backed
  by the driver's scratch storage page (zeroed after each use).  Without it
  the driver still sends REGISTER_SHM (the kernel does not look at REG_MEM;
  libteec does), through :meth:`Driver.call_smc`, and the secure world
  refuses it.  :meth:`Driver.cancel` sends OPTEE_MSG_CMD_CANCEL
  (``optee_cancel_req``).

The secure world is reached only through the callables the System hands
over: ``call_with_arg(pa)``, which returns the SMC-level result
(``SMC_RETURN_*``), and ``smc_entry(pa)`` for the compiled ``SmcDriver``
(the secure world's compiled entry with DYNAMIC_SHM); this module does not
import the secure world.

This module also offers the client-side parameter kinds of the GlobalPlatform
API (:class:`Value`, :class:`RegisteredMemref`, :class:`TempMemref`,
:class:`InvokeResult`), defined by the codec in ``poolsvc/tee/params.py``, as
the public place to import them from (``from poolsvc.tee.driver import Value``).

Accounting: ``kernel pages in use == 1 (message page, with dynamic shm) +
pages of the lists of the running call`` (+ 1 for the cancel message while
sessions are open, when the static pool has no room for it).

Concurrency: one thread (the System's), except :meth:`Driver.cancel`, which
any thread may call while that thread is inside a call (it uses only the
cancel message, under ``_cancel_lock``).
"""
from __future__ import annotations

import threading
import time
from typing import Any, NamedTuple

import numpy as np

from .. import pagelist
from .._backend import core
from ..constants import ATTR_NONCONTIG, MSG_ARG_HEADER_SIZE, PAGE_SIZE, Attr, MsgCmd, Origin
from ..errors import TEE_ERROR_COMMUNICATION, BadParameters, Closed, OutOfMemory, TeeError
from ..memory import Arena, PhysicalMemory, Segment
from .msg import SMC_RETURN_OK, MsgArg, MsgParam, arg_size, unpack
from .params import InvokeResult, RegisteredMemref, TempMemref, Value

# The one-parameter commands, as plain ints for the hot path.
_REGISTER = int(MsgCmd.REGISTER_SHM)
_UNREGISTER = int(MsgCmd.UNREGISTER_SHM)
_REGISTER_ATTR = int(Attr.TMEM_OUTPUT | ATTR_NONCONTIG)
#: Pages a single list page holds (longer lists take kernel pages from the arena).
_LIST_ENTRIES = pagelist.ENTRIES_PER_LIST_PAGE


class KernelPages(NamedTuple):
    """Contiguous dynamic frames backed by kernel-arena storage pages."""

    pa: int
    npages: int
    segment: Segment
    first: int  # first storage page within ``segment``


def check_ret(cmd: int, ret: int, origin: int) -> None:
    """TeeError when the secure world answered ``cmd`` with a non-zero ``ret``;
    for REGISTER_SHM BadParameters (``optee_shm_register``'s ``-EINVAL``)."""
    if ret != 0:
        what = f"secure world answered {ret:#x} (origin {origin}) to command {cmd}"
        if cmd == _REGISTER:
            raise BadParameters(f"registration refused (EINVAL): {what}")
        raise TeeError(what, ret, origin)


class Driver:
    """The driver end of one System (see the module doc).

    ``Driver(memory, dynamic, kernel_arena, static, dynamic_shm, call_with_arg,
    smc_entry=None, rpc_param_count=0)``: the physical memory, the dynamic
    frame allocator, the kernel arena, the reserved pool's allocator (or
    None), whether the TEE has DYNAMIC_SHM, the secure world's entry (returns
    the SMC-level result), the entry the compiled ``SmcDriver`` calls
    (default ``call_with_arg``), and the parameters of the RPC argument the
    secure world asked for (SEC_CAP RPC_ARG; 0: none).
    :meth:`close` gives its pages back.
    """

    def __init__(self, memory: PhysicalMemory, dynamic: Any, kernel_arena: Arena, static: Any,
                 dynamic_shm: bool, call_with_arg: Any, smc_entry: Any = None,
                 rpc_param_count: int = 0) -> None:
        self.memory = memory
        #: bytes of the RPC argument placed after each call's message (0: none)
        self.rpc_arg_size = arg_size(rpc_param_count) if rpc_param_count else 0
        self.dynamic = dynamic
        self.kernel_arena = kernel_arena
        self.call_with_arg = call_with_arg
        self.closed = False
        #: seconds the last registration took (page list + REGISTER_SHM), for the study
        self.last_register_seconds = 0.0
        self.msg: KernelPages | None = None
        #: the kernel storage page behind the list frame of one-list-page registrations
        #: (all zero between calls), with dynamic shm
        self.list_scratch_page: tuple[Segment, int] | None = None
        self.smc: Any = None  # core.SmcDriver
        self.static = static
        #: the cancel message while sessions are open: a static block's address, or kernel pages
        self.cancel_msg: KernelPages | int | None = None
        #: open sessions, which hold the cancel message (:meth:`hold_cancel`)
        self.cancel_users = 0
        self._cancel_lock = threading.Lock()
        self._kernel_msgs = dynamic_shm or static is None
        if self._kernel_msgs:
            self.msg = self.alloc_kernel_pages(1)
            self.msg_pa = self.msg.pa
            if dynamic_shm:
                self.list_scratch_page = kernel_arena.alloc(1)
        else:
            self.msg_pa = int(static.alloc(PAGE_SIZE, PAGE_SIZE))
        scratch = self.list_scratch_page
        self.smc = core.SmcDriver(memory.table, dynamic, self.msg_pa,
                                  call_with_arg if smc_entry is None else smc_entry,
                                  -1 if scratch is None else scratch[0].sid,
                                  0 if scratch is None else scratch[1])

    def close(self) -> None:
        """Give back the scratch page and the message pages. Idempotent."""
        with self._cancel_lock:
            self.closed = True
            self._free_cancel_msg()
        self.smc = None
        if self.list_scratch_page is not None:
            self.kernel_arena.free(*self.list_scratch_page, 1)
            self.list_scratch_page = None
        if self.msg is not None:
            self.free_kernel_pages(self.msg)
            self.msg = None

    # -- kernel pages ---------------------------------------------------------------------
    def alloc_kernel_pages(self, npages: int) -> KernelPages:
        """Contiguous dynamic frames mapped to zeroed kernel-arena pages.

        Raises OutOfMemory (frames or storage); nothing is kept when it raises.
        """
        pa = self.dynamic.alloc_contig(npages)
        try:
            seg, index = self.kernel_arena.alloc(npages)
        except BaseException:
            self.dynamic.free_contig(pa, npages)
            raise
        try:
            self.memory.table.map_range(pa, npages, seg.sid, index)
        except BaseException:  # (a frame the table still maps: a bug elsewhere; leak nothing)
            self.kernel_arena.free(seg, index, npages)
            self.dynamic.free_contig(pa, npages)
            raise
        return KernelPages(pa, npages, seg, index)

    def free_kernel_pages(self, pages: KernelPages) -> None:
        """Undo :meth:`alloc_kernel_pages` (the pages are zeroed)."""
        self.memory.table.unmap_range(pages.pa, pages.npages)
        self.kernel_arena.free(pages.segment, pages.first, pages.npages)
        self.dynamic.free_contig(pages.pa, pages.npages)

    def page_list(self, pages: np.ndarray, offset: int) -> KernelPages:
        """The NONCONTIG page list of ``pages`` (buffer starting ``offset`` into the first)
        built in fresh kernel pages; the list's address is ``result.pa | offset``.
        Free it with :meth:`free_kernel_pages`."""
        nlist = pagelist.list_pages_needed(len(pages))
        kpages = self.alloc_kernel_pages(nlist)
        try:
            with memoryview(kpages.segment.storage.mm) as whole:
                with whole[kpages.first * PAGE_SIZE:(kpages.first + nlist) * PAGE_SIZE] as out:
                    core.pagelist_build_into(pages, offset, kpages.pa, out)
        except BaseException:
            self.free_kernel_pages(kpages)
            raise
        return kpages

    # -- calls -----------------------------------------------------------------------------
    def call_smc(self, msg: MsgArg) -> tuple[int, MsgArg]:
        """Place ``msg`` in the message page, call the secure world, read the reply back.

        Returns ``(SMC-level result, reply)``, the reply whatever its ``ret``
        (as sent when the call was refused at the SMC level).  Raises
        BadParameters for a message that does not fit in a page, Closed after
        :meth:`close`.
        """
        data = msg.pack()
        if len(data) > PAGE_SIZE:
            raise BadParameters(f"message of {len(msg.params)} parameters does not fit in a page")
        if self.closed:
            raise Closed("the driver is closed")
        self.memory.write(self.msg_pa, data)
        if self.rpc_arg_size and len(data) + self.rpc_arg_size <= PAGE_SIZE:
            # OPTEE_SMC_CALL_WITH_RPC_ARG: the RPC argument follows the message, as
            # optee_smc_do_call_with_arg places it (OPTEE_MSG_GET_ARG_SIZE(num_params) on)
            rc = self.call_with_arg(self.msg_pa, self.msg_pa + len(data))
        else:
            rc = self.call_with_arg(self.msg_pa)
        return (SMC_RETURN_OK if rc is None else rc), unpack(self.memory.read(self.msg_pa, len(data)))

    def call(self, msg: MsgArg) -> MsgArg:
        """:meth:`call_smc`'s reply; a call refused at the SMC level is answered
        TEEC_ERROR_COMMUNICATION with origin COMMS (``optee_open_session``,
        ``optee_invoke_func``)."""
        rc, reply = self.call_smc(msg)
        if rc != SMC_RETURN_OK:
            reply.ret, reply.ret_origin = TEE_ERROR_COMMUNICATION, Origin.COMMS
        return reply

    # -- cancellation ------------------------------------------------------------------------
    def hold_cancel(self) -> None:
        """A session opened (System's thread): the cancel message exists while any is open.

        Raises OutOfMemory when the message cannot be taken (nothing kept).
        """
        with self._cancel_lock:
            if self.cancel_users == 0:
                self.cancel_msg = self._take_cancel_msg()
            self.cancel_users += 1

    def _take_cancel_msg(self) -> KernelPages | int:
        """A header-sized block of the static pool (the carve-out takes messages at any
        8-byte boundary), else, with dynamic shm, a kernel page."""
        if self.static is not None:
            try:
                return int(self.static.alloc(MSG_ARG_HEADER_SIZE, 8))
            except OutOfMemory:
                if not self._kernel_msgs:
                    raise
        return self.alloc_kernel_pages(1)

    def release_cancel(self) -> None:
        """A session closed (System's thread): the last one gives the cancel message back."""
        with self._cancel_lock:
            self.cancel_users -= 1
            if self.cancel_users == 0 and not self.closed:
                self._free_cancel_msg()

    def _free_cancel_msg(self) -> None:
        msg, self.cancel_msg = self.cancel_msg, None
        if isinstance(msg, KernelPages):
            self.free_kernel_pages(msg)
        elif msg is not None:
            self.static.free(msg)

    def cancel(self, session: int, cancel_id: int = 0) -> None:
        """OPTEE_MSG_CMD_CANCEL of ``session`` (``optee_cancel_req``), in the cancel message.

        Any thread may call it, also while the System's thread is inside a
        call of that session: the secure world sets the session's cancel
        flag, which an app waiting for it wakes on.  The answer is not
        looked at (Linux ignores it).  Raises Closed after :meth:`close`,
        BadParameters when no session is open (``-EINVAL``).
        """
        data = MsgArg(cmd=MsgCmd.CANCEL, session=session, cancel_id=cancel_id).pack()
        with self._cancel_lock:
            if self.closed:
                raise Closed("the driver is closed")
            msg = self.cancel_msg
            if msg is None:
                raise BadParameters(f"CANCEL of session {session}: no session is open (EINVAL)")
            pa = msg.pa if isinstance(msg, KernelPages) else msg
            self.memory.write(pa, data)
            self.call_with_arg(pa)

    def register(self, pages: np.ndarray, offset: int, size: int, cookie: int) -> None:
        """REGISTER_SHM of ``pages`` (buffer of ``size`` bytes from ``offset``) as ``cookie``.

        Raises TeeError when the secure world refuses.  Sets ``last_register_seconds``.
        """
        if len(pages) <= _LIST_ENTRIES and self.list_scratch_page is not None:
            smc = self.smc
            ret, origin = smc.register(pages, offset, size, cookie)
            check_ret(_REGISTER, ret, origin)
            self.last_register_seconds = smc.last_seconds
            return
        t0 = time.perf_counter()
        kpages = self.page_list(pages, offset)
        try:
            if self.list_scratch_page is not None:
                ret, origin = self.smc.call1(_REGISTER, _REGISTER_ATTR, kpages.pa | offset, size, cookie)
            else:  # no DYNAMIC_SHM: sent all the same, through the generic call
                rc, reply = self.call_smc(MsgArg(cmd=_REGISTER, params=[
                    MsgParam(_REGISTER_ATTR, kpages.pa | offset, size, cookie)]))
                if rc != SMC_RETURN_OK:
                    raise BadParameters(f"registration refused (EINVAL): secure world refused "
                                        f"command {_REGISTER} at the SMC level ({rc:#x})")
                ret, origin = reply.ret, reply.ret_origin
        finally:
            self.free_kernel_pages(kpages)
        check_ret(_REGISTER, ret, origin)
        self.last_register_seconds = time.perf_counter() - t0

    def register_run(self, pa: int, npages: int, size: int, cookie: int) -> None:
        """:meth:`register` of the contiguous pages from ``pa`` at offset 0 (no page array)."""
        if npages > _LIST_ENTRIES or self.list_scratch_page is None:
            self.register(np.arange(pa, pa + npages * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64),
                          0, size, cookie)
            return
        smc = self.smc
        ret, origin = smc.register_run(pa, npages, 0, size, cookie)
        if ret != 0:
            check_ret(_REGISTER, ret, origin)
        self.last_register_seconds = smc.last_seconds

    def unregister(self, cookie: int) -> None:
        """UNREGISTER_SHM of ``cookie``; TeeError (e.g. BUSY) when the secure world refuses
        (COMMUNICATION, origin COMMS, when it refuses the call at the SMC level)."""
        if self.list_scratch_page is not None:
            ret, origin = self.smc.unregister(cookie)
        else:  # no DYNAMIC_SHM: the generic call, whose SMC-level result is read
            rc, reply = self.call_smc(MsgArg(cmd=_UNREGISTER, params=[
                MsgParam(int(Attr.RMEM_INPUT), 0, 0, cookie)]))
            if rc != SMC_RETURN_OK:
                raise TeeError(f"secure world refused command {_UNREGISTER} at the SMC level "
                               f"({rc:#x})", TEE_ERROR_COMMUNICATION, Origin.COMMS)
            ret, origin = reply.ret, reply.ret_origin
        if ret != 0:
            check_ret(_UNREGISTER, ret, origin)


__all__ = ["Driver", "InvokeResult", "KernelPages", "RegisteredMemref", "TempMemref", "Value",
           "check_ret"]
