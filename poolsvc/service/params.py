"""The service client's session parameters: the driver's kinds to the wire and back.

:class:`Params` encodes up to four parameters of OPEN_SESSION or INVOKE
(``poolsvc.tee.driver`` Value, RegisteredMemref or a bare Shm, TempMemref,
None) into the protocol's PARAM records, and decodes the RESULT that comes
back: output values and sizes are written into the caller's parameter
objects, and bounced temporary memrefs are copied back.  Directions, the
copy-back and the TeeError of a failed call come from the GP parameter codec
(:mod:`poolsvc.tee.params`).

Concurrency: one Params serves one call of one Context (its thread).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..api import check_param_count, check_u32
from ..errors import BadParameters, NotSharedMemory, NotSupported
from ..tee.params import OUT, ParamCall, direction, raise_for
from . import protocol as P
from .shm import Shm

if TYPE_CHECKING:
    from .context import Context


class Params(ParamCall):
    """Session parameters of the driver's kinds, to the wire and back.

    Value, RegisteredMemref (or a bare Shm) and NULL memrefs travel as they
    are; a TempMemref is registered for the call when it lies in POSIX shared
    memory, else bounced through a kernel buffer of the pool (as libteec does
    without REG_MEM), and travels as a registered memref.  The outputs are
    applied by the codec's :meth:`~poolsvc.tee.params.ParamCall.finish`, and
    leaving the ``with`` block releases the temporary shms.
    """

    def __init__(self, ctx: "Context", params: Sequence[Any]) -> None:
        from ..tee import driver

        check_param_count(params)
        super().__init__(ctx, can_register=True, memref_null=None)
        self.driver = driver
        self.params = list(params)

    def encode(self) -> bytes:
        d = self.driver
        out = [P.COOKIE.pack(len(self.params))]
        for param in self.params:
            if param is None:
                out.append(P.PARAM.pack(P.ParamKind.NONE, 0, 0, 0))
                self.after.append(None)
            elif isinstance(param, d.Value):
                flow = direction(param.direction)
                check_u32(param.a, "value a")
                check_u32(param.b, "value b")
                out.append(P.PARAM.pack(P.ParamKind.VALUE | flow << 8, param.a, param.b, 0))
                self.after.append(("value", param, flow))
            elif isinstance(param, d.RegisteredMemref) or isinstance(param, Shm):
                ref = param if isinstance(param, d.RegisteredMemref) else d.RegisteredMemref(param)
                out.append(self._encode_memref(ref, ref.shm, ref.offset, ref.size, ref.direction))
                self.after.append(("memref", ref, direction(ref.direction)))
            elif isinstance(param, d.TempMemref):
                out.append(self._encode_temp(param))
            else:
                raise BadParameters(f"parameter {param!r} is not None, Value, RegisteredMemref, "
                                    "TempMemref or Shm")
        return b"".join(out)

    def _encode_memref(self, ref: Any, shm: Any, offset: Any, size: Any, way: str) -> bytes:
        d = direction(way)
        if not isinstance(shm, Shm) or shm.context is not self.ctx:
            raise BadParameters(f"shm {shm!r} does not belong to context {self.ctx.name}")
        shm._check()
        for what, v in (("offset", offset), ("size", size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise BadParameters(f"memref {what} {v!r} is not a non-negative int")
        whole = size is None
        return P.PARAM.pack(P.ParamKind.MEMREF | d << 8 | (P.PARAM_WHOLE if whole else 0),
                            shm.cookie, offset or 0, 0 if whole else size)

    def _encode_temp(self, ref: Any) -> bytes:
        d = direction(ref.direction)
        if ref.buffer is None:
            size = 0 if ref.size is None else ref.size
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadParameters(f"NULL memref size {size!r}")
            self.after.append(("memref", ref, d))
            return P.PARAM.pack(P.ParamKind.NULL_MEMREF | d << 8, 0, 0, size)
        try:
            view = memoryview(ref.buffer)
        except TypeError:
            raise BadParameters(f"{type(ref.buffer).__name__} does not support the buffer protocol") from None
        with view:
            length = view.nbytes
        if ref.size is not None and ref.size != length:
            raise BadParameters(f"temporary memref size {ref.size!r} differs from the buffer's "
                                f"{length} bytes")
        if length == 0:
            self.after.append(("memref", ref, d))
            return P.PARAM.pack(P.ParamKind.NULL_MEMREF | d << 8, 0, 0, 0)
        shm: Shm | None
        try:  # NotSupported without REG_MEM (api.require_reg_mem)
            shm = self.ctx.register_kernel_buf(ref.buffer)
        except (NotSharedMemory, NotSupported):
            shm = None
        bounce = shm is None
        if shm is None:
            shm = self.ctx.alloc_kernel_buf(length)
            if d != OUT:  # in, inout: copy in
                with memoryview(ref.buffer) as src, shm.view() as dst:
                    dst[:length] = src.cast("B")
        self.temps.append(shm)
        self.after.append(("bounce" if bounce else "memref", (ref, shm) if bounce else ref, d))
        return P.PARAM.pack(P.ParamKind.MEMREF | d << 8, shm.cookie, 0, length)

    def decode(self, body: memoryview, what: str) -> Any:
        """Apply the RESULT record ``body`` to the parameters; the InvokeResult, or
        TeeError (with ``result``) when the secure world did not answer TEE_SUCCESS."""
        ret, origin, count = P.RESULT.unpack_from(body)
        outputs: list[tuple[tuple[int, int] | None, int | None]] = []
        pos = P.RESULT.size
        for _ in range(count):
            kind, a, b = P.OUTPUT.unpack_from(body, pos)
            pos += P.OUTPUT.size
            outputs.append(((a, b), None) if kind == P.OutputKind.VALUE else
                           (None, a) if kind == P.OutputKind.SIZE else (None, None))
        result = self.finish(ret, origin, outputs)
        raise_for(what, result)
        return result
