"""The secure world's copies of a call's TA parameters (OP-TEE's ``copy_in_params`` /
``copy_out_params``).

:class:`TaParamCopies` (a part of :class:`~poolsvc.tee.secure.SecureWorld`)
turns the message's parameters into the four parameters a trusted app sees
and writes the outputs back:

- ``copy_in``: META set: BAD_PARAMETERS.  VALUE: a and b (u32).  RMEM:
  cookie lookup (unknown: BAD_PARAMETERS) takes a reference (``inflight``)
  held until the call returns; ``offs + size`` overflowing or beyond the
  object: SECURITY.  TMEM with ``buf_ptr == 0``: a NULL memref (only with the
  MEMREF_NULL capability, else BAD_PARAMETERS).  TMEM with NONCONTIG: a page
  list parsed into a temporary object that lives for the call.  Plain TMEM:
  the range must lie inside the static carve-out, else BAD_PARAMETERS.
- ``copy_out``: only ``size`` is written back for OUTPUT/INOUT memrefs and
  ``a``/``b`` for OUTPUT/INOUT values, decided by the message's attrs.
- ``release_holds``: drops the references and temporary objects a call took.

Invariant: ``temp_live`` counts the temporary NONCONTIG objects of the running
call (0 between calls).

Concurrency: one call at a time (the System serialises).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._backend import core
from ..constants import (
    ATTR_META,
    ATTR_NONCONTIG,
    ATTR_TYPE_MASK,
    PAGE_MASK,
    PAGE_SIZE,
    TEE_NUM_PARAMS,
    Attr,
    SecCaps,
)
from ..errors import BadParameters, SecurityViolation
from .msg import MsgParam
from .ta import Memref, Param, ParamType, Value

U64_MAX = (1 << 64) - 1
_VALUE_TYPES = (Attr.VALUE_INPUT, Attr.VALUE_OUTPUT, Attr.VALUE_INOUT)
_RMEM_TYPES = (Attr.RMEM_INPUT, Attr.RMEM_OUTPUT, Attr.RMEM_INOUT)
_TMEM_TYPES = (Attr.TMEM_INPUT, Attr.TMEM_OUTPUT, Attr.TMEM_INOUT)
_OUT_VALUE_TYPES = (Attr.VALUE_OUTPUT, Attr.VALUE_INOUT)
_OUT_MEMREF_TYPES = (Attr.RMEM_OUTPUT, Attr.RMEM_INOUT, Attr.TMEM_OUTPUT, Attr.TMEM_INOUT)

# A shared-memory object the normal world registered (OP-TEE's ``mobj_reg_shm``):
# ``RegisteredShm(cookie, pages, offset, size, inflight=0)`` with
# ``size == len(pages) * 4096 - offset`` and ``inflight`` the running calls'
# parameters that use it (it cannot be unregistered while ``inflight > 0``).
# It is the backend's (compiled: a C struct the entry builds without Python).
if TYPE_CHECKING:
    from .._pure.smc import RegisteredShm
else:
    RegisteredShm = core.RegisteredShm


class TaParamCopies:
    """The parameter copies of a secure world (a base of SecureWorld, which provides
    the attributes declared here)."""

    memory: Any
    registered: dict[int, RegisteredShm]
    caps: SecCaps
    temp_live: int
    strict: bool
    _table: Any
    _nonsecure: tuple[tuple[int, int], ...]

    def parse_noncontig(self, buf_ptr: int, size: int) -> tuple[np.ndarray, int]:
        """Pages and offset of a NONCONTIG buffer, validated as OP-TEE does.

        ``msg_param_mobj_from_noncontig`` counts ``(size + offset - 1) / 4096 + 1``
        pages, so size 0 at an offset within the first page is one page (a 1-byte
        buffer has the same pages); size 0 at offset 0 is refused.  ``strict``
        refuses size 0 at any offset.
        """
        offset = buf_ptr & PAGE_MASK
        if size == 0 and offset and not self.strict:
            size = 1
        # list pages are read straight through the frame table (no read_page callback)
        pages = core.pagelist_parse_frames(buf_ptr, size, self._table, self._nonsecure)
        return pages, offset

    def _memref(self, ptype: ParamType, pages: np.ndarray | None, offset: int, size: int) -> Memref:
        return Memref(self.memory, ptype, pages, offset, size)

    def copy_in(self, params: Sequence[MsgParam], holds: list[Any]) -> list[Param]:
        """The TA's four params from the message's; references taken go to ``holds``.

        Raises (with ``holds`` released by the caller): BadParameters,
        SecurityViolation, OutOfMemory (page list too long).
        """
        if len(params) > TEE_NUM_PARAMS:
            raise BadParameters(f"{len(params)} parameters for a trusted app; at most "
                                f"{TEE_NUM_PARAMS}")
        out: list[Param] = [None] * TEE_NUM_PARAMS
        for i, p in enumerate(params):
            if p.attr & ATTR_META:
                raise BadParameters(f"parameter {i}: META bit set (attr {p.attr:#x})")
            kind = p.attr & ATTR_TYPE_MASK
            if kind == Attr.NONE:
                continue
            if kind in _VALUE_TYPES:
                out[i] = Value(ParamType(kind), p.a & 0xFFFFFFFF, p.b & 0xFFFFFFFF)
            elif kind in _RMEM_TYPES:
                out[i] = self._rmem_param(i, p, ParamType(kind), holds)
            elif kind in _TMEM_TYPES:
                out[i] = self._tmem_param(i, p, ParamType(kind - 4), holds)
            else:
                raise BadParameters(f"parameter {i}: attr type {kind:#x} is not a parameter type")
        return out

    def _rmem_param(self, i: int, p: MsgParam, ptype: ParamType, holds: list[Any]) -> Memref:
        entry = self.registered.get(p.c)
        if entry is None:
            raise BadParameters(f"parameter {i}: cookie {p.c:#x} is not registered")
        offs, size = p.a, p.b
        if offs + size > U64_MAX:
            raise SecurityViolation(f"parameter {i}: offs {offs:#x} + size {size:#x} overflows u64")
        if offs + size > entry.size:
            raise SecurityViolation(f"parameter {i}: [{offs:#x}, {offs + size:#x}) is beyond the "
                                    f"{entry.size:#x} bytes of cookie {p.c:#x}")
        start = entry.offset + offs
        first = start // PAGE_SIZE
        count = (start % PAGE_SIZE + size + PAGE_MASK) // PAGE_SIZE if size else 0
        memref = self._memref(ptype, entry.pages[first:first + count], start % PAGE_SIZE, size)
        entry.inflight += 1
        holds.append(entry)
        holds.append(memref)
        return memref

    def _tmem_param(self, i: int, p: MsgParam, ptype: ParamType, holds: list[Any]) -> Memref:
        buf_ptr, size = p.a, p.b
        if buf_ptr == 0:
            if not self.caps & SecCaps.MEMREF_NULL:
                raise BadParameters(f"parameter {i}: NULL memref without the MEMREF_NULL capability")
            memref = self._memref(ptype, None, 0, size)
        elif p.attr & ATTR_NONCONTIG:
            pages, offset = self.parse_noncontig(buf_ptr, size)
            memref = self._memref(ptype, pages, offset, size)
            self.temp_live += 1
            holds.append(_Temp(self))
        else:
            base, rsize = self.memory.regions["static"]
            if not self.caps & SecCaps.HAVE_RESERVED_SHM:
                raise BadParameters(f"parameter {i}: contiguous TMEM {buf_ptr:#x} without a "
                                    "reserved shared-memory carve-out")
            if buf_ptr + size > U64_MAX or not (base <= buf_ptr and buf_ptr + max(size, 1) <= base + rsize):
                raise BadParameters(f"parameter {i}: TMEM [{buf_ptr:#x}, +{size:#x}) is not inside "
                                    f"the static carve-out [{base:#x}, {base + rsize:#x})")
            first = buf_ptr & ~PAGE_MASK
            count = ((buf_ptr & PAGE_MASK) + size + PAGE_MASK) // PAGE_SIZE if size else 0
            pages = np.arange(first, first + count * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
            memref = self._memref(ptype, pages, buf_ptr & PAGE_MASK, size)
        holds.append(memref)
        return memref

    @staticmethod
    def copy_out(params: Sequence[MsgParam], ta_params: Sequence[Param]) -> None:
        """Write back ``size`` of output memrefs and ``a``/``b`` of output values.

        The message's attrs decide what is written (OP-TEE's saved attrs), never
        the app's params: ``ta_params`` is the secure world's own list (the app
        got a copy), and an attribute the app broke falls back safely.
        """
        for p, tp in zip(params, ta_params):
            kind = p.attr & ATTR_TYPE_MASK
            if kind in _OUT_VALUE_TYPES:
                p.a = _u32(getattr(tp, "a", 0))
                p.b = _u32(getattr(tp, "b", 0))
            elif kind in _OUT_MEMREF_TYPES:
                p.b = _u64(getattr(tp, "size", None), _u64(getattr(tp, "capacity", None), p.b))

    @staticmethod
    def release_holds(holds: list[Any]) -> None:
        for hold in reversed(holds):
            if isinstance(hold, RegisteredShm):
                hold.inflight -= 1
            elif isinstance(hold, Memref):
                hold.release()
            else:
                hold.release()
        holds.clear()


class _Temp:
    """A temporary NONCONTIG object of one call; its release balances ``temp_live``."""

    __slots__ = ("world",)

    def __init__(self, world: Any) -> None:
        self.world = world

    def release(self) -> None:
        self.world.temp_live -= 1


def _u32(value: Any) -> int:
    return value & 0xFFFFFFFF if isinstance(value, int) else 0


def _u64(value: Any, default: int) -> int:
    """``value`` if it is an int in u64 range, else ``default``."""
    return value if isinstance(value, int) and 0 <= value <= U64_MAX else default


__all__ = ["RegisteredShm", "TaParamCopies", "U64_MAX"]
