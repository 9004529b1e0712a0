"""The GlobalPlatform parameter codec: what a client passes to a trusted app, and back.

One codec for every side that turns a client's parameters into a call and the
call's outputs back into the client's objects: the embedded driver
(``poolsvc.driver``), the pool-service client (``poolsvc.service.client``)
and the TEE daemon (``poolsvc.tee.daemon``).  It owns

- the parameter kinds: :class:`Value` (``TEEC_VALUE_*``),
  :class:`RegisteredMemref` (a whole Shm or a range of it,
  ``TEEC_MEMREF_PARTIAL_*``; a bare Shm means the whole of it, inout),
  :class:`TempMemref` (any buffer-protocol object, ``TEEC_MEMREF_TEMP_*``;
  ``buffer=None`` is a NULL memref) and :class:`InvokeResult`;
- directions, decoded once (:func:`direction`: ``"in"``, ``"out"``, ``"inout"``
  to :data:`IN`, :data:`OUT`, :data:`INOUT`);
- validation, with one message per fault;
- register-or-bounce: a temporary memref lying in POSIX shared memory is
  registered for the call (``register_kernel_buf``), any other goes through
  a bounce buffer of the pool (``alloc_kernel_buf``), copied in before the
  call (unless OUTPUT) and out after it (as libteec does without REG_MEM);
- the copy-back of outputs: values into ``Value.a/b``, sizes into
  ``*.size``, bounced bytes into the caller's buffer.

:class:`ParamCall` walks one call's parameters and hands each, validated, to
the side's ``emit_*`` methods (which write a message parameter or a wire
parameter); :meth:`ParamCall.finish` applies the outputs and builds the
:class:`InvokeResult`; :meth:`ParamCall.close` releases the temporary shms.

Concurrency: a ParamCall belongs to the call that made it (one thread).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, TypeVar

from ..api import check_param_count, check_u32
from ..errors import TEE_SUCCESS, BadParameters, Closed, NotSharedMemory, NotSupported, PoolsvcError

_Self = TypeVar("_Self", bound="ParamCall")

#: Directions, as the low bits the message attrs add to their INPUT type.
IN, OUT, INOUT = 0, 1, 2
_DIRECTIONS = {"in": IN, "out": OUT, "inout": INOUT}
#: Direction names by number (the wire carries numbers).
DIRECTION_NAMES = ("in", "out", "inout")


def direction(value: Any) -> int:
    """:data:`IN`, :data:`OUT` or :data:`INOUT` for ``"in"``, ``"out"``, ``"inout"``."""
    try:
        return _DIRECTIONS[value]
    except (KeyError, TypeError):
        raise BadParameters(f"direction {value!r} is not 'in', 'out' or 'inout'") from None


@dataclass
class Value:
    """A value parameter (``TEEC_VALUE_*``): ``a``, ``b`` (u32), direction."""

    a: int = 0
    b: int = 0
    direction: str = "in"


@dataclass
class RegisteredMemref:
    """A range of a Shm (``TEEC_MEMREF_PARTIAL_*``; the whole Shm when size is None).

    After the call ``size`` holds what the secure world reported (OUTPUT/INOUT).
    """

    shm: Any
    offset: int = 0
    size: int | None = None
    direction: str = "inout"


@dataclass
class TempMemref:
    """A temporary memory reference (``TEEC_MEMREF_TEMP_*``) to a buffer-protocol object.

    ``buffer=None`` with a ``size`` is a NULL memref.  After the call ``size``
    holds what the secure world reported (OUTPUT/INOUT).
    """

    buffer: Any
    direction: str = "inout"
    size: int | None = None


@dataclass
class InvokeResult:
    """What a call returned: ``ret``, ``origin``, and per parameter ``values`` ((a, b)
    for output values, else None) and ``sizes`` (for output memrefs, else None)."""

    ret: int
    origin: int
    values: list[tuple[int, int] | None] = field(default_factory=list)
    sizes: list[int | None] = field(default_factory=list)


def _non_negative(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadParameters(f"{what} {value!r} is not a non-negative int")


def copy_back(ref: TempMemref, bounce: Any, size: int) -> None:
    """Copy the first ``size`` bytes (at most the buffer's) of ``bounce`` into ``ref.buffer``."""
    with memoryview(ref.buffer) as dst, bounce.view() as src:
        flat = dst.cast("B")
        n = min(size, len(flat))
        flat[:n] = src[:n]


def raise_for(what: str, result: InvokeResult) -> None:
    """TeeError (with ``result``) unless ``result.ret`` is TEE_SUCCESS."""
    if result.ret == TEE_SUCCESS:
        return
    from ..errors import TeeError

    exc = TeeError(f"{what}: secure world answered {result.ret:#x} (origin {result.origin})",
                   result.ret, result.origin)
    exc.result = result  # type: ignore[attr-defined]
    raise exc


class ParamCall:
    """One call's parameters on their way to the secure world and back.

    ``ParamCall(ctx, can_register, memref_null)``: ``ctx`` is the caller's
    context (an ``api.Context``: its shms are the only ones a memref may
    name, and temporary memrefs are registered or bounced through it);
    ``can_register`` says whether a temporary memref may be registered
    (REG_MEM); ``memref_null`` whether NULL memrefs are allowed (None: not
    checked here, the far side checks).  Subclasses write the parameters:
    ``emit_none``, ``emit_value``, ``emit_memref``, ``emit_null``,
    ``emit_temp``.  Use as a context manager (or call :meth:`close`) so that
    the temporary shms are released.

    Per parameter ``after`` holds what the outputs update: None,
    ``("value", Value, d)``, ``("memref", ref, d)`` or
    ``("bounce", (TempMemref, bounce shm), d)``.
    """

    def __init__(self, ctx: Any, can_register: bool, memref_null: bool | None) -> None:
        self.ctx = ctx
        self.can_register = can_register
        self.memref_null = memref_null
        self.after: list[tuple[str, Any, int] | None] = []
        #: Shms made for this call (registered temporaries, bounce buffers), closed by close().
        self.temps: list[Any] = []

    # -- the side's writers ----------------------------------------------------------------
    def emit_none(self) -> None:
        raise NotImplementedError

    def emit_value(self, a: int, b: int, d: int) -> None:
        raise NotImplementedError

    def emit_memref(self, shm: Any, offset: int, size: int | None, d: int) -> None:
        """A range of a shm of the context; ``size`` None: the rest of the shm."""
        raise NotImplementedError

    def emit_null(self, size: int, d: int) -> None:
        raise NotImplementedError

    def emit_temp(self, shm: Any, length: int, d: int) -> None:
        """A temporary memref registered for the call as ``shm`` (``length`` bytes)."""
        self.emit_memref(shm, 0, length, d)

    # -- parameters in -----------------------------------------------------------------------
    def add_all(self, params: Sequence[Any]) -> None:
        """Validate and emit up to four parameters."""
        check_param_count(params)
        for param in params:
            self.add(param)

    def add(self, param: Any) -> None:
        """Validate and emit one parameter (None, Value, RegisteredMemref, TempMemref or a Shm)."""
        if param is None:
            self.emit_none()
            self.after.append(None)
        elif isinstance(param, Value):
            d = direction(param.direction)
            self.emit_value(check_u32(param.a, "value a"), check_u32(param.b, "value b"), d)
            self.after.append(("value", param, d))
        elif isinstance(param, RegisteredMemref):
            d = direction(param.direction)
            self._registered(param, d)
            self.after.append(("memref", param, d))
        elif isinstance(param, TempMemref):
            self._temp(param)
        elif hasattr(param, "cookie") and hasattr(param, "pages"):  # a bare Shm: whole, inout
            ref = RegisteredMemref(param)
            self._registered(ref, INOUT)
            self.after.append(("memref", ref, INOUT))
        else:
            raise BadParameters(f"parameter {param!r} is not None, Value, RegisteredMemref, "
                                "TempMemref or Shm")

    def _registered(self, ref: RegisteredMemref, d: int) -> None:
        shm = ref.shm
        if getattr(shm, "context", None) is not self.ctx:
            raise BadParameters(f"shm {shm!r} does not belong to context {self.ctx.name}")
        if shm.closed:
            raise Closed(f"shm {shm!r} is released")
        _non_negative(ref.offset, "memref offset")
        size = shm.size - ref.offset if ref.size is None else ref.size
        _non_negative(size, "memref size")
        if ref.offset + size > shm.size:
            raise BadParameters(f"memref [{ref.offset:#x}, {ref.offset + size:#x}) is beyond the "
                                f"{shm.size:#x} bytes of the shm")
        self.emit_memref(shm, ref.offset, ref.size, d)

    def _null(self, ref: TempMemref, size: Any, d: int, what: str) -> None:
        if self.memref_null is False:
            raise BadParameters(f"{what} without the MEMREF_NULL capability")
        _non_negative(size, "NULL memref size")
        self.emit_null(size, d)
        self.after.append(("memref", ref, d))

    def _temp(self, ref: TempMemref) -> None:
        d = direction(ref.direction)
        if ref.buffer is None:
            self._null(ref, 0 if ref.size is None else ref.size, d, "NULL memref")
            return
        try:
            view = memoryview(ref.buffer)
        except TypeError:
            raise BadParameters(f"{type(ref.buffer).__name__} does not support the buffer protocol") from None
        with view:
            length = view.nbytes
            readonly = view.readonly
        if ref.size is not None and ref.size != length:
            raise BadParameters(f"temporary memref size {ref.size!r} differs from the buffer's "
                                f"{length} bytes")
        if length == 0:
            self._null(ref, 0, d, "empty temporary memref")
            return
        shm = None
        if self.can_register and not readonly:  # read-only memory cannot be registered
            try:
                shm = self.ctx.register_kernel_buf(ref.buffer)
            except (NotSharedMemory, NotSupported):
                shm = None
        if shm is not None:
            self.temps.append(shm)
            self.emit_temp(shm, length, d)
            self.after.append(("memref", ref, d))
            return
        bounce = self.ctx.alloc_kernel_buf(length)
        self.temps.append(bounce)
        if d != OUT:  # in, inout: copy in
            with memoryview(ref.buffer) as src, bounce.view() as dst:
                dst[:length] = src.cast("B")
        self.emit_memref(bounce, 0, length, d)
        self.after.append(("bounce", (ref, bounce), d))

    # -- outputs back -----------------------------------------------------------------------
    def finish(self, ret: int, origin: int,
               outputs: Iterable[tuple[tuple[int, int] | None, int | None]]) -> InvokeResult:
        """Apply the call's outputs and return them as an :class:`InvokeResult`.

        ``outputs`` gives per parameter ``(value, size)``: ``(a, b)`` of an
        output value, the size of an output memref, or None.  Values go into
        the Value objects, sizes into the memref objects, and a bounced
        buffer's bytes into the caller's buffer when ``ret`` is TEE_SUCCESS.
        """
        result = InvokeResult(ret, origin)
        for entry, (value, size) in zip(self.after, outputs):
            if entry is not None:
                kind, obj, _ = entry
                if kind == "value":
                    if value is not None:
                        obj.a, obj.b = value
                elif size is not None:
                    if kind == "bounce":
                        ref, bounce = obj
                        if ret == TEE_SUCCESS:
                            copy_back(ref, bounce, size)
                        obj = ref
                    obj.size = size
            result.values.append(value)
            result.sizes.append(size)
        return result

    def close(self) -> None:
        """Release the temporary shms (last made first); the first failure is raised after all ran."""
        errors = []
        for shm in reversed(self.temps):
            try:
                if not shm.closed:
                    shm.close()
            except PoolsvcError as exc:
                errors.append(exc)
        self.temps.clear()
        if errors:
            raise errors[0]

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DIRECTION_NAMES", "IN", "INOUT", "InvokeResult", "OUT", "ParamCall", "RegisteredMemref",
           "TempMemref", "Value", "copy_back", "direction", "raise_for"]
