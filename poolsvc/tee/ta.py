"""Trusted applications: the plug-in interface, the TA-side parameters, the built-in apps.

This module owns what a trusted app (TA) sees of a call:

- :class:`Value` and :class:`Memref`, the GlobalPlatform-style parameters the
  secure world hands to ``open_session`` / ``invoke`` (always a list of four,
  ``None`` for a NONE slot);
- :class:`TrustedApp`, the base class a user subclasses and registers under a
  UUID (``SecureWorld.install(cls)``); one instance lives per session;
- the built-in apps: :class:`Sha256App`, :class:`FillApp`, :class:`CopyApp`,
  :class:`StorageApp` (state kept in memory obtained from the normal world
  by RPC, as a firmware TPM keeps its state in supplicant memory),
  :class:`HelloWorldApp` and :class:`WaitApp` (a cancellable wait).

Zero copy.  A :class:`Memref` is a window onto physical pages, translated
through the frame table (the secure world's MMU).  Its bytes are reached as
*spans*: maximal runs of pages that are consecutive in one storage object,
each a ``memoryview`` straight into that object's mapping.  ``view()`` gives
the single span of a buffer whose pages are consecutive in one storage;
``read``/``readinto``/``write`` of a scattered buffer use the compiled
``gather``/``scatter`` of :mod:`poolsvc._backend`.  Nothing is copied on the
Python side unless the app asks for ``bytes``.

Lifetimes: views handed out by a per-call Memref are released when the call
returns; a TA must not keep them (numpy arrays over them included).  A
Memref of RPC memory (:meth:`SessionEnv.rpc_alloc`) lives until it is freed.

Invariant of a Memref: ``0 <= size`` (what is reported back) and every access
lies in ``[0, capacity)``; ``capacity == sum(span lengths)``.

Concurrency: a TA runs inside one secure-world call at a time; nothing here
is thread-safe.
"""
from __future__ import annotations

import hashlib
import uuid as uuidlib
from enum import IntEnum
from typing import Any, ClassVar, Iterator, Sequence, TypeGuard

import numpy as np

from .._backend import core
from ..constants import PAGE_SIZE, RpcShmType
from ..errors import BadParameters, SecurityViolation, ShortBuffer
from ..storage import LIVE

#: TEE_ERROR_TARGET_DEAD: the TA panicked; its session is dead.
TEE_ERROR_TARGET_DEAD = 0xFFFF3024


class ParamType(IntEnum):
    """``TEE_PARAM_TYPE_*``: the type of a parameter as a TA sees it."""

    NONE = 0
    VALUE_INPUT = 1
    VALUE_OUTPUT = 2
    VALUE_INOUT = 3
    MEMREF_INPUT = 5
    MEMREF_OUTPUT = 6
    MEMREF_INOUT = 7


class Login(IntEnum):
    """``TEE_LOGIN_*``: how the client identified itself at OPEN_SESSION."""

    PUBLIC = 0
    USER = 1
    GROUP = 2
    APPLICATION = 4
    APPLICATION_USER = 5
    APPLICATION_GROUP = 6
    REE_KERNEL = 0x80000000


class Value:
    """A value parameter: two u32 words ``a`` and ``b`` (the message's ``c`` stays behind)."""

    __slots__ = ("type", "a", "b")

    def __init__(self, type: ParamType, a: int = 0, b: int = 0) -> None:
        self.type = type
        self.a = a
        self.b = b

    def __repr__(self) -> str:
        return f"<Value {self.type.name} a={self.a:#x} b={self.b:#x}>"


def _spans_of(sids: np.ndarray, offs: np.ndarray, offset: int, size: int) -> list[tuple[int, int, int]]:
    """``(storage id, byte start, length)`` runs covering ``size`` bytes from ``offset``.

    ``sids[i]``/``offs[i]`` locate page i (``offs`` a multiple of 4096).
    """
    n = len(sids)
    if n == 0 or size == 0:
        return []
    breaks = np.flatnonzero((np.diff(sids) != 0) | (np.diff(offs) != PAGE_SIZE)) + 1
    starts = [0] + breaks.tolist()
    ends = breaks.tolist() + [n]
    spans = [[int(sids[s]), int(offs[s]), (e - s) * PAGE_SIZE] for s, e in zip(starts, ends)]
    spans[0][1] += offset
    spans[0][2] -= offset
    excess = n * PAGE_SIZE - offset - size
    spans[-1][2] -= excess
    return [(sid, start, length) for sid, start, length in spans]


class Memref:
    """A memory-reference parameter: zero-copy access to the caller's pages.

    Attributes: ``type`` (:class:`ParamType`), ``capacity`` (bytes the caller
    gave), ``size`` (what is reported back for OUTPUT/INOUT; starts at
    ``capacity``, set it to the size produced, or to the size needed before
    raising :class:`ShortBuffer`), ``is_null`` (a NULL memref: no bytes at
    all, only a size), ``readonly`` (MEMREF_INPUT).

    Accesses beyond ``capacity`` raise :class:`SecurityViolation`; writes to
    an input memref too.
    """

    __slots__ = ("type", "capacity", "size", "is_null", "readonly", "_memory", "_pages",
                 "_offset", "_spans", "_views", "__weakref__")

    def __init__(self, memory: Any, type: ParamType, pages: np.ndarray | None, offset: int,
                 size: int) -> None:
        """Map ``size`` bytes starting ``offset`` bytes into ``pages`` (None: a NULL memref).

        Raises AddressError (a BadParameters) if a page is not backed by storage.
        """
        self.type = type
        self.capacity = size if pages is not None else 0
        self.size = size
        self.is_null = pages is None
        self.readonly = type == ParamType.MEMREF_INPUT
        self._memory = memory
        self._offset = offset
        self._views: list[memoryview] = []
        if pages is None or size == 0:
            self._pages = np.zeros(0, np.uint64)
            self._spans: list[tuple[int, int, int]] = []
        else:
            self._pages = pages
            sids, offs = memory.table.translate_batch(pages)
            self._spans = _spans_of(np.asarray(sids), np.asarray(offs), offset, size)

    # -- geometry ------------------------------------------------------------------
    @property
    def contiguous(self) -> bool:
        """True if the bytes are one span of one storage object (``view()`` works)."""
        return len(self._spans) <= 1

    @property
    def nspans(self) -> int:
        """Number of storage spans (1 for a contiguous buffer)."""
        return len(self._spans)

    def _check_range(self, start: int, n: int) -> None:
        if start < 0 or n < 0 or start + n > self.capacity:
            raise SecurityViolation(f"access [{start:#x}, {start + n:#x}) is outside the memref "
                                    f"of {self.capacity:#x} bytes")

    def _check_write(self) -> None:
        if self.readonly:
            raise SecurityViolation("write to an input memref")

    def _span_view(self, sid: int, start: int, length: int) -> memoryview:
        buf = self._memory.storages[sid]
        with memoryview(buf) as base:
            flat = base.cast("B") if base.format != "B" or base.ndim != 1 else base
            view = flat[start:start + length]
            if flat is not base:
                flat.release()
        if self.readonly:
            ro = view.toreadonly()
            view.release()
            view = ro
        self._views.append(view)
        return view

    # -- zero-copy access -------------------------------------------------------------
    def spans(self, start: int = 0, n: int | None = None) -> Iterator[memoryview]:
        """Memoryviews straight into storage, covering ``[start, start+n)`` in order.

        Valid until the call returns (read-only for an input memref).
        """
        n = self.capacity - start if n is None else n
        self._check_range(start, n)
        pos = 0
        end = start + n
        for sid, sstart, length in self._spans:
            lo, hi = max(start, pos), min(end, pos + length)
            if lo < hi:
                yield self._span_view(sid, sstart + lo - pos, hi - lo)
            pos += length
            if pos >= end:
                break

    def view(self) -> memoryview | None:
        """The whole buffer as one memoryview, or None when its pages are scattered."""
        if not self.contiguous:
            return None
        if not self._spans:
            return memoryview(b"") if self.readonly else memoryview(bytearray())
        return self._span_view(*self._spans[0])

    # -- copying access ----------------------------------------------------------------
    def _pages_for(self, start: int, n: int) -> tuple[np.ndarray, int]:
        absolute = self._offset + start
        first = absolute // PAGE_SIZE
        count = (absolute % PAGE_SIZE + n + PAGE_SIZE - 1) // PAGE_SIZE
        return self._pages[first:first + count], absolute % PAGE_SIZE

    def readinto(self, out: Any, start: int = 0) -> int:
        """Copy ``len(out)`` bytes from ``start`` into the writable buffer ``out``; returns it."""
        with memoryview(out) as mv:
            n = mv.nbytes
            self._check_range(start, n)
            if n == 0:
                return 0
            pages, off = self._pages_for(start, n)
            return core.gather(self._memory.table, pages, off, n, out)

    def read(self, start: int = 0, n: int | None = None) -> bytearray:
        """A copy of ``n`` bytes from ``start`` (all remaining bytes by default)."""
        n = self.capacity - start if n is None else n
        out = bytearray(n)
        self.readinto(out, start)
        return out

    def write(self, data: Any, start: int = 0) -> int:
        """Copy the buffer ``data`` into the memref at ``start``; returns the bytes written."""
        self._check_write()
        with memoryview(data) as mv:
            n = mv.nbytes
            self._check_range(start, n)
            if n == 0:
                return 0
            pages, off = self._pages_for(start, n)
            return core.scatter(self._memory.table, pages, off, n, data)

    def require(self, needed: int) -> None:
        """Raise ShortBuffer (with ``size = needed`` reported back) if ``needed > capacity``."""
        if needed > self.capacity:
            self.size = needed
            raise ShortBuffer(f"output memref holds {self.capacity:#x} bytes, {needed:#x} needed",
                              needed)

    # -- lifetime ------------------------------------------------------------------------
    def release(self) -> None:
        """Release every view handed out (done by the secure world when the call returns)."""
        for view in self._views:
            try:
                view.release()
            except BufferError:
                LIVE["exported_views"] += 1
        self._views.clear()

    def revoke(self) -> None:
        """Release the views and unmap the pages (the memory was given back):
        every later access raises SecurityViolation."""
        self.release()
        self.capacity = 0
        self.size = 0
        self._pages = np.zeros(0, np.uint64)
        self._spans = []

    def __repr__(self) -> str:
        kind = "NULL" if self.is_null else f"{self.nspans} span(s)"
        return f"<Memref {self.type.name} capacity={self.capacity:#x} size={self.size:#x} {kind}>"


Param = Value | Memref | None


def check_types(params: Sequence[Param], *types: ParamType) -> None:
    """Raise BadParameters unless the four params have exactly these types (NONE = None)."""
    expected = list(types) + [ParamType.NONE] * (4 - len(types))
    actual = [ParamType.NONE if p is None else p.type for p in params]
    if actual != expected:
        raise BadParameters(f"parameter types {[t.name for t in actual]} are not "
                            f"{[t.name for t in expected]}")


def _is_output(p: Param) -> TypeGuard[Memref]:
    return isinstance(p, Memref) and p.type in (ParamType.MEMREF_OUTPUT, ParamType.MEMREF_INOUT)


# The secure world builds a Value for a VALUE_* type and a Memref for a MEMREF_* type, so once
# check_types has accepted the params these only narrow the static type.
def _memref(p: Param) -> Memref:
    assert isinstance(p, Memref), p
    return p


def _value(p: Param) -> Value:
    assert isinstance(p, Value), p
    return p


# ---------------------------------------------------------------------------------------
# The plug-in interface
# ---------------------------------------------------------------------------------------
class TrustedApp:
    """Base class of a trusted application.

    Subclass it, set ``UUID`` (a :class:`uuid.UUID`) and ``NAME``, and install
    the class with ``system.tee.install(MyApp)``.  The secure world creates
    one instance per session: ``MyApp(env)``, where ``env`` is the session's
    :class:`~poolsvc.tee.secure_sessions.SessionEnv` (session id, client identity,
    ``rpc_alloc``/``rpc_free``).

    ``open_session(params)`` and ``invoke(func, params)`` get four params
    (:class:`Value`, :class:`Memref` or None).  They succeed by returning
    None (or 0), and fail by raising a :class:`~poolsvc.errors.PoolsvcError`
    (its ``tee_code`` is the return code, origin TRUSTED_APP) or by returning
    a non-zero TEE code.  Any other exception is a TA panic: the call answers
    TARGET_DEAD and the session is dead.  ``close_session()`` cannot fail.
    """

    UUID: ClassVar[uuidlib.UUID]
    NAME: ClassVar[str] = "app"

    def __init__(self, env: Any) -> None:
        self.env = env

    def open_session(self, params: Sequence[Param]) -> int | None:
        """Accept the session (default: any params)."""
        return None

    def invoke(self, func: int, params: Sequence[Param]) -> int | None:
        """Run command ``func``; the default refuses every command (BadParameters)."""
        raise BadParameters(f"{self.NAME}: unknown command {func}")

    def close_session(self) -> None:
        """Release the session's resources (RPC memory still held is freed after)."""


def _uuid(name: str) -> uuidlib.UUID:
    return uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"https://poolsvc/ta/{name}")


class Sha256App(TrustedApp):
    """SHA-256 of an input memref, hashed span by span straight from storage.

    Command 0 (DIGEST): params MEMREF_INPUT data, MEMREF_OUTPUT digest
    (32 bytes; SHORT_BUFFER with size 32 if smaller).  Command 1
    (DIGEST_RANGE): MEMREF_INPUT data, MEMREF_OUTPUT digest, VALUE_INPUT
    a=start, b=length (SECURITY outside the memref).
    """

    UUID = _uuid("sha256")  # 7c3ebd6c-4dd1-5a79-a05d-8fd3a366054a
    NAME = "sha256"
    DIGEST = 0
    DIGEST_RANGE = 1

    def invoke(self, func: int, params: Sequence[Param]) -> None:
        if func == self.DIGEST:
            check_types(params, ParamType.MEMREF_INPUT, ParamType.MEMREF_OUTPUT)
            start, length = 0, _memref(params[0]).capacity
        elif func == self.DIGEST_RANGE:
            check_types(params, ParamType.MEMREF_INPUT, ParamType.MEMREF_OUTPUT,
                        ParamType.VALUE_INPUT)
            window = _value(params[2])
            start, length = window.a, window.b
        else:
            raise BadParameters(f"sha256: unknown command {func}")
        data, out = _memref(params[0]), _memref(params[1])
        out.require(32)
        h = hashlib.sha256()
        if not data.is_null:
            for span in data.spans(start, length):
                h.update(span)
        out.write(h.digest())
        out.size = 32


class FillApp(TrustedApp):
    """Fill an output memref with a repeating pattern of 1 to 4 bytes.

    Command 0 (FILL): MEMREF_OUTPUT or MEMREF_INOUT, VALUE_INPUT a=pattern
    (little-endian u32), b=pattern length in bytes (1..4).  The pattern's phase
    starts at byte 0 of the memref; ``size`` reported back = capacity.
    """

    UUID = _uuid("fill")  # 8b2c27b0-5160-5b7c-b9d8-05d73ae7e68a
    NAME = "fill"
    FILL = 0

    def invoke(self, func: int, params: Sequence[Param]) -> None:
        if func != self.FILL:
            raise BadParameters(f"fill: unknown command {func}")
        out, value = params[0], params[1]
        if (not _is_output(out) or not isinstance(value, Value) or value.type != ParamType.VALUE_INPUT
                or any(params[2:])):
            raise BadParameters("fill: expects MEMREF_OUTPUT/INOUT, VALUE_INPUT")
        if not 1 <= value.b <= 4:
            raise BadParameters(f"fill: pattern length {value.b} is not 1..4")
        pattern = np.frombuffer((value.a & 0xFFFFFFFF).to_bytes(4, "little")[:value.b], np.uint8)
        pos = 0
        for span in out.spans():
            arr = np.frombuffer(span, np.uint8)
            phase = pos % len(pattern)
            rolled = np.roll(pattern, -phase)
            reps = -(-len(arr) // len(pattern))
            arr[:] = np.tile(rolled, reps)[:len(arr)]
            del arr
            pos += len(span)
        out.size = out.capacity


class CopyApp(TrustedApp):
    """Copy an input memref into an output memref, span to span (one copy, in C).

    Command 0 (COPY): MEMREF_INPUT src, MEMREF_OUTPUT/INOUT dst.  A dst
    smaller than src gives SHORT_BUFFER with size = src's size; otherwise
    size = src's size.
    """

    UUID = _uuid("copy")  # f25d48f3-0779-5d77-9df8-24464b7cb1a5
    NAME = "copy"
    COPY = 0

    def invoke(self, func: int, params: Sequence[Param]) -> None:
        if func != self.COPY:
            raise BadParameters(f"copy: unknown command {func}")
        src, dst = params[0], params[1]
        if (not isinstance(src, Memref) or src.type != ParamType.MEMREF_INPUT or not _is_output(dst)
                or any(params[2:])):
            raise BadParameters("copy: expects MEMREF_INPUT, MEMREF_OUTPUT/INOUT")
        dst.require(src.capacity)
        pos = 0
        if not src.is_null:
            for span in src.spans():
                dst.write(span, pos)
                pos += len(span)
        dst.size = src.capacity


class StorageApp(TrustedApp):
    """A byte store kept in normal-world memory obtained by RPC (like fTPM's NV state).

    open_session: optional VALUE_INPUT a = store size in bytes (default
    64 KiB, at most 16 MiB); the app asks the normal world for that much
    memory (RPC SHM_ALLOC, type APPL) and keeps it until the session closes
    (RPC SHM_FREE).  Commands:

    - 0 WRITE: VALUE_INPUT a=offset, MEMREF_INPUT data;
    - 1 READ: VALUE_INPUT a=offset, MEMREF_OUTPUT/INOUT out (reads capacity bytes);
    - 2 INFO: VALUE_OUTPUT a=store size, b=bytes written (high-water mark).

    Ranges outside the store give BAD_PARAMETERS.
    """

    UUID = _uuid("storage")  # f7609984-b0dc-5ee7-9d10-a0a1368999a0
    NAME = "storage"
    WRITE, READ, INFO = 0, 1, 2
    DEFAULT_SIZE = 64 << 10
    MAX_SIZE = 16 << 20

    def open_session(self, params: Sequence[Param]) -> None:
        size = self.DEFAULT_SIZE
        first = params[0]
        if first is not None:
            if not isinstance(first, Value) or first.type != ParamType.VALUE_INPUT:
                raise BadParameters("storage: open_session takes an optional VALUE_INPUT size")
            size = first.a
        if not 0 < size <= self.MAX_SIZE:
            raise BadParameters(f"storage: size {size:#x} is not in 1..{self.MAX_SIZE:#x}")
        self.store = self.env.rpc_alloc(size, RpcShmType.APPL)
        self.size = size
        self.high = 0

    def _range(self, offset: int, n: int) -> None:
        if offset + n > self.size:
            raise BadParameters(f"storage: range {offset:#x}+{n:#x} is outside the store "
                                f"of {self.size:#x} bytes")

    def invoke(self, func: int, params: Sequence[Param]) -> None:
        if func == self.WRITE:
            check_types(params, ParamType.VALUE_INPUT, ParamType.MEMREF_INPUT)
            offset, data = _value(params[0]).a, _memref(params[1])
            self._range(offset, data.capacity)
            pos = offset
            for span in data.spans():
                self.store.write(span, pos)
                pos += len(span)
            self.high = max(self.high, pos)
        elif func == self.READ:
            where, out = params[0], params[1]
            if (not isinstance(where, Value) or where.type != ParamType.VALUE_INPUT or not _is_output(out)
                    or any(params[2:])):
                raise BadParameters("storage: READ expects VALUE_INPUT, MEMREF_OUTPUT/INOUT")
            self._range(where.a, out.capacity)
            pos = where.a
            for span in out.spans():
                self.store.readinto(span, pos)
                pos += len(span)
        elif func == self.INFO:
            check_types(params, ParamType.VALUE_OUTPUT)
            info = _value(params[0])
            info.a, info.b = self.size, self.high
        else:
            raise BadParameters(f"storage: unknown command {func}")

    def close_session(self) -> None:
        store = getattr(self, "store", None)
        if store is not None and not store.freed:
            self.env.rpc_free(store)


#: The apps every SecureWorld starts with.
class HelloWorldApp(TrustedApp):
    """OP-TEE's "hello world" example app, under its UUID: add or subtract 1.

    Command 0 (INC_VALUE) and command 1 (DEC_VALUE): VALUE_INOUT ``a``,
    changed by one (modulo 2**32).
    """

    UUID = uuidlib.UUID("8aaaf200-2450-11e4-abe2-0002a5d5c51b")
    NAME = "hello_world"
    INC_VALUE = 0
    DEC_VALUE = 1

    def invoke(self, func: int, params: Sequence[Param]) -> None:
        check_types(params, ParamType.VALUE_INOUT)
        value = _value(params[0])
        if func == self.INC_VALUE:
            value.a = (value.a + 1) & 0xFFFFFFFF
        elif func == self.DEC_VALUE:
            value.a = (value.a - 1) & 0xFFFFFFFF
        else:
            raise BadParameters(f"hello_world: unknown command {func}")


class WaitApp(TrustedApp):
    """Waits until its session is cancelled, as a cancellable TA does (GP TEE_Wait).

    Command 0 (WAIT): VALUE_INPUT ``a`` = milliseconds (0xFFFFFFFF: until
    cancelled), ``b`` = 1 to wait with cancellation masked.  Unmasks
    cancellation unless asked not to (``TEE_UnmaskCancellation``) and waits
    (``env.wait``): TEE_ERROR_CANCEL (origin TRUSTED_APP) once the normal
    world sends CANCEL for the session, SUCCESS when the time has passed.
    """

    UUID = _uuid("wait")  # 07358268-6017-5483-960f-d04b43469f0d
    NAME = "wait"
    WAIT = 0

    def invoke(self, func: int, params: Sequence[Param]) -> int | None:
        check_types(params, ParamType.VALUE_INPUT)
        if func != self.WAIT:
            raise BadParameters(f"wait: unknown command {func}")
        value = _value(params[0])
        if value.b == 1:
            self.env.mask_cancellation()
        else:
            self.env.unmask_cancellation()
        return self.env.wait(value.a)


BUILTIN_APPS: tuple[type[TrustedApp], ...] = (Sha256App, FillApp, CopyApp, StorageApp, HelloWorldApp, WaitApp)

__all__ = ["BUILTIN_APPS", "CopyApp", "FillApp", "HelloWorldApp", "Login", "Memref", "Param", "ParamType",
           "Sha256App", "StorageApp", "TEE_ERROR_TARGET_DEAD", "TrustedApp", "Value", "WaitApp",
           "check_types"]
