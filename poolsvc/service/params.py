"""The service client's session parameters: the driver's kinds to the wire and back.

:class:`Params` encodes up to four parameters of OPEN_SESSION or INVOKE
(``poolsvc.tee.driver`` Value, RegisteredMemref or a bare Shm, TempMemref,
None) into the protocol's PARAM records, and decodes the RESULT that comes
back: output values and sizes are written into the caller's parameter
objects, and bounced temporary memrefs are copied back.  :class:`Params` is a
:class:`~poolsvc.tee.params.ParamCall` of the GP parameter codec: the codec
decodes directions, validates memrefs, registers or bounces temporaries,
applies the outputs and raises TeeError; this module only writes and reads
the wire records.

Concurrency: one Params serves one call of one Context (its thread).
"""
from __future__ import annotations

from typing import Any, Sequence

from ..api import Context, check_param_count, check_u32
from ..errors import BadParameters
from ..tee.params import ParamCall, direction, raise_for
from . import protocol as P
_pack_param = P.PARAM.pack


def _is_shm(param: Any) -> bool:
    """Whether ``param`` is a bare Shm (of any context: the codec checks whose)."""
    return hasattr(param, "cookie") and hasattr(param, "context")


class Params(ParamCall):
    """Session parameters of the driver's kinds, to the wire and back.

    Value, RegisteredMemref (or a bare Shm) and NULL memrefs travel as they
    are; a TempMemref is registered for the call when it lies in POSIX shared
    memory, else bounced through a kernel buffer of the pool (as libteec does
    without REG_MEM), and travels as a registered memref.  The outputs are
    applied by the codec's :meth:`~poolsvc.tee.params.ParamCall.finish`, and
    leaving the ``with`` block releases the temporary shms.
    """

    def __init__(self, ctx: Context, params: Sequence[Any], can_register: bool = True) -> None:
        """``can_register``: whether the daemon's driver offers REG_MEM (libteec's check
        for temporary memrefs); with it a temporary that cannot be registered
        (private memory: NotSharedMemory) is bounced all the same."""
        from ..tee import driver

        check_param_count(params)
        super().__init__(ctx, can_register=can_register, memref_null=None)
        self.driver = driver
        self.params = list(params)
        self.records: list[bytes] = []

    def encode(self) -> bytes:
        """The count and PARAM records of the parameters (validated by the codec)."""
        d = self.driver
        for param in self.params:
            if param is None:
                self.emit_none()
                self.after.append(None)
            elif isinstance(param, d.Value):
                flow = direction(param.direction)
                self.emit_value(check_u32(param.a, "value a"), check_u32(param.b, "value b"), flow)
                self.after.append(("value", param, flow))
            elif isinstance(param, d.RegisteredMemref) or _is_shm(param):
                ref = param if isinstance(param, d.RegisteredMemref) else d.RegisteredMemref(param)
                flow = direction(ref.direction)
                self._registered(ref, flow)
                self.after.append(("memref", ref, flow))
            elif isinstance(param, d.TempMemref):
                self._temp(param)  # registered for the call, or bounced
            else:
                raise BadParameters(f"parameter {param!r} is not None, Value, RegisteredMemref, "
                                    "TempMemref or Shm")
        return P.COOKIE.pack(len(self.records)) + b"".join(self.records)

    # -- the codec's writers: one PARAM record each --------------------------------------------
    def emit_none(self) -> None:
        self.records.append(_pack_param(P.ParamKind.NONE, 0, 0, 0))

    def emit_value(self, a: int, b: int, d: int) -> None:
        self.records.append(_pack_param(P.ParamKind.VALUE | d << 8, a, b, 0))

    def emit_memref(self, shm: Any, offset: int, size: int | None, d: int) -> None:
        whole = size is None
        self.records.append(_pack_param(P.ParamKind.MEMREF | d << 8 | (P.PARAM_WHOLE if whole else 0),
                                        shm.cookie, offset, 0 if whole else size))

    def emit_null(self, size: int, d: int) -> None:
        self.records.append(_pack_param(P.ParamKind.NULL_MEMREF | d << 8, 0, 0, size))

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
