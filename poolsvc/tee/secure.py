"""The simulated secure world: receives ``struct optee_msg_arg`` and trusts nothing.

It owns the registered shared-memory objects (by cookie) and validates every
page list and every address the way OP-TEE does (DESIGN.md section 6):

- REGISTER_SHM: exactly one parameter whose ``attr`` is exactly
  ``TMEM_OUTPUT | NONCONTIG``; the page list is parsed and checked (alignment
  of list pages, ``next`` pointers and entries; every page in non-secure
  memory; size+offset and num_pages*8 overflow; zero pages); the object's size
  is ``num_pages*4096 - offset``; a cookie already registered is refused.
- UNREGISTER_SHM: exactly one parameter, ``attr == RMEM_INPUT``, a known
  cookie that no running call uses.

Every refusal answers with the exact return code and leaves the state as it
was.  Errors are :mod:`poolsvc.errors` exceptions inside; they become return
codes at one boundary, :meth:`SecureWorld.call`.

Concurrency: one call at a time (the System serialises); a call that is
running marks the objects it uses as in flight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import pagelist
from ..constants import (
    ATTR_NONCONTIG,
    MSG_ARG_HEADER_SIZE,
    PAGE_MASK,
    PAGE_SIZE,
    Attr,
    MsgCmd,
    Origin,
    SecCaps,
)
from ..errors import (
    TEE_SUCCESS,
    BadParameters,
    Busy,
    NotSupported,
    PoolsvcError,
    ProtocolError,
)
from .msg import MsgArg, arg_size, peek_num_params, unpack


@dataclass
class RegisteredShm:
    """A shared-memory object the normal world registered (OP-TEE's ``mobj_reg_shm``).

    ``size == len(pages) * 4096 - offset``; ``inflight`` counts running calls
    that use it (it cannot be unregistered while ``inflight > 0``).
    """

    cookie: int
    pages: np.ndarray
    offset: int
    size: int
    inflight: int = 0


@dataclass
class SecureStats:
    calls: int = 0
    errors: dict[int, int] = field(default_factory=dict)


class SecureWorld:
    """An OP-TEE-like secure world over a :class:`~poolsvc.memory.PhysicalMemory`."""

    def __init__(self, memory: Any, caps: SecCaps) -> None:
        self.memory = memory
        self.caps = caps
        self.registered: dict[int, RegisteredShm] = {}
        self.stats = SecureStats()
        self._handlers: dict[int, Callable[[MsgArg], None]] = {
            MsgCmd.REGISTER_SHM: self._register_shm,
            MsgCmd.UNREGISTER_SHM: self._unregister_shm,
        }

    # -- entry points ------------------------------------------------------------
    def call(self, arg: bytes | bytearray | memoryview) -> bytes:
        """Process one raw ``struct optee_msg_arg``; return it with ret/outputs filled.

        Raises ProtocolError only when the bytes cannot be a message at all
        (shorter than the header or than ``num_params`` parameters); every
        other fault is answered in ``ret`` / ``ret_origin``.
        """
        msg = unpack(arg)
        self.process(msg)
        return msg.pack()

    def call_with_arg(self, arg_pa: int) -> None:
        """Process the message the normal world placed at physical address ``arg_pa``.

        The argument must lie inside the static carve-out (8-byte aligned), or
        start a page-aligned page of non-secure RAM and fit in it; otherwise
        BadParameters (OP-TEE answers such a call with an error at the SMC
        level, before any message exists).
        """
        if not isinstance(arg_pa, int) or arg_pa < 0 or arg_pa >= 1 << 64:
            raise BadParameters(f"message address {arg_pa!r} is not a u64")
        header = self._read_arg(arg_pa, MSG_ARG_HEADER_SIZE)
        size = arg_size(peek_num_params(header))
        data = self._read_arg(arg_pa, size)
        msg = unpack(data)
        self.process(msg)
        self.memory.write(arg_pa, msg.pack())

    def _read_arg(self, pa: int, size: int) -> bytes:
        mem = self.memory
        if mem.in_region("static", pa, size):
            if pa % 8:
                raise BadParameters(f"message at {pa:#x} in the static carve-out is not 8-byte aligned")
        elif mem.in_region("dynamic", pa, size):
            if pa & PAGE_MASK:
                raise BadParameters(f"message at {pa:#x} in dynamic RAM is not page-aligned")
            if size > PAGE_SIZE:
                raise BadParameters(f"message of {size} bytes at {pa:#x} does not fit in one page")
        else:
            raise BadParameters(f"message at {pa:#x}+{size:#x} is not in non-secure shared memory")
        return mem.read(pa, size)

    def process(self, msg: MsgArg) -> None:
        """Handle a decoded message in place: sets ``ret`` and ``ret_origin``."""
        self.stats.calls += 1
        msg.ret, msg.ret_origin = TEE_SUCCESS, Origin.TEE
        handler = self._handlers.get(msg.cmd)
        try:
            if handler is None:
                raise NotSupported(f"command {msg.cmd} is not supported")
            handler(msg)
        except PoolsvcError as exc:
            code = exc.tee_code
            msg.ret = code
            msg.ret_origin = getattr(exc, "origin", Origin.TEE)
            self.stats.errors[code] = self.stats.errors.get(code, 0) + 1

    # -- shared-memory registration ------------------------------------------------
    def parse_noncontig(self, buf_ptr: int, size: int) -> tuple[np.ndarray, int]:
        """Pages and offset of a NONCONTIG buffer, validated as OP-TEE does."""
        pages = pagelist.parse(buf_ptr, size, self.memory.read_page,
                               nonsecure=self.memory.nonsecure_ranges())
        return pages, buf_ptr & PAGE_MASK

    def _register_shm(self, msg: MsgArg) -> None:
        if not self.caps & SecCaps.DYNAMIC_SHM:
            raise NotSupported("REGISTER_SHM without dynamic shared memory")
        if len(msg.params) != 1:
            raise BadParameters(f"REGISTER_SHM carries {len(msg.params)} parameters, not 1")
        param = msg.params[0]
        if param.attr != (Attr.TMEM_OUTPUT | ATTR_NONCONTIG):
            raise BadParameters(f"REGISTER_SHM attr {param.attr:#x} is not TMEM_OUTPUT|NONCONTIG")
        cookie = param.c
        if cookie in self.registered:
            raise BadParameters(f"cookie {cookie:#x} is already registered")
        pages, offset = self.parse_noncontig(param.a, param.b)
        self.registered[cookie] = RegisteredShm(cookie, pages, offset,
                                                len(pages) * PAGE_SIZE - offset)

    def _unregister_shm(self, msg: MsgArg) -> None:
        if len(msg.params) != 1:
            raise BadParameters(f"UNREGISTER_SHM carries {len(msg.params)} parameters, not 1")
        param = msg.params[0]
        if param.attr != Attr.RMEM_INPUT:
            raise BadParameters(f"UNREGISTER_SHM attr {param.attr:#x} is not RMEM_INPUT")
        entry = self.registered.get(param.c)
        if entry is None:
            raise BadParameters(f"cookie {param.c:#x} is not registered")
        if entry.inflight:
            raise Busy(f"cookie {param.c:#x} is in use by {entry.inflight} running call(s)")
        del self.registered[param.c]

    def lookup_cookie(self, cookie: int) -> RegisteredShm:
        """The registered object of ``cookie`` (BadParameters if unknown)."""
        entry = self.registered.get(cookie)
        if entry is None:
            raise BadParameters(f"cookie {cookie:#x} is not registered")
        return entry


__all__ = ["RegisteredShm", "SecureWorld", "ProtocolError"]
