"""Batches: many operations, one round trip.

:class:`Batch` collects ALLOC, SHM_FROM_ID and SHM_CLOSE operations of one
service Context and sends them as one BATCH request; :class:`LocalBatch`
offers the same API over an embedded Context (operations run one by one on
``run()``); :func:`batch` gives whichever fits a context, so that code using
batches runs against both the embedded System and the daemon.

A batch's reply is decoded by a kernel (``_batch_results``: ext/wire.pyx,
twin poolsvc/_pure/wire.py) that makes the Shm of each new buffer's plain
DESC and takes each plain CLOSED; the other replies (errors, a DESC with
pages or a new segment, a buffer the context holds, a dropped segment,
PING) go through :func:`_result`, as every reply does when some operation
was answered here.

Concurrency: a batch belongs to its context's thread.
"""
from __future__ import annotations

from typing import Any, Callable, NoReturn, Protocol

from .._backend import core
from ..api import check_shm_id, check_size
from ..errors import BadParameters, PoolsvcError, ProtocolError
from . import protocol as P
from .channel import (
    ALLOC,
    ALLOC_BODY,
    ALLOC_KERNEL,
    ALLOC_PRIV,
    ALLOC_USER,
    CLOSED_SIZE,
    COOKIE_BODY,
    SHM_CLOSE,
    Channel,
    pack_alloc_frame,
    pack_close_frame,
    pack_header,
    refuse_pickle,
)

_ERROR = int(P.MsgType.ERROR)
_PING = int(P.MsgType.PING)
_unpack_closed_from = P.CLOSED.unpack_from
#: ``_batch_results(reply, sent, max_frame, kinds, context, shms, shm_type, fallback)``: a
#: BATCH_REPLY's results, the common replies (a new buffer's DESC, a plain CLOSED) taken
#: by a kernel (ext/wire.pyx; twin poolsvc/_pure/wire.py), the rest by ``fallback``.
_batch_results = core._batch_results


#: The ``kinds`` entry type of an operation answered here, without a request: its
#: result is the entry's ``extra`` (a refused argument's exception, or None for
#: the close of a released Shm).
_LOCAL = -1
#: The ``kinds`` entry of every ALLOC, and of every SHM_CLOSE, in a Batch.
_ALLOC_KIND = (ALLOC, None)
_CLOSE_KIND = (SHM_CLOSE, None)


class BatchOwner(Protocol):
    """What a Batch uses of its context (a :class:`.objects.Context`)."""

    _channel: Channel

    @property
    def _shm_type(self) -> type:
        """The Shm class the context makes (``_make_shm``)."""

    @property
    def name(self) -> str: ...

    @property
    def shms(self) -> dict[int, Any]: ...

    def _check(self) -> None: ...

    def _make_shm(self, body: Any, user_view: memoryview | None = None, start: int = 0,
                  end: int = -1) -> Any: ...

    def _unmap_segment(self, token: int) -> None: ...


def _batch_alloc(kind: int, doc: str) -> Callable[["Batch", int], None]:
    """A Batch method queueing an ALLOC of ``kind`` (the hot path: one struct call per frame)."""
    def alloc(self: "Batch", size: int) -> None:
        parts = self.parts
        if type(size) is int and 0 < size < 1 << 63 and len(parts) < self.limit:
            parts.append(pack_alloc_frame(ALLOC_BODY, ALLOC, 0, kind, size))
            self.kinds.append(_ALLOC_KIND)
        else:  # a bad size (refused locally) or a full batch (raises)
            self._alloc(kind, size)
    alloc.__doc__ = doc
    return alloc


class Batch:
    """Operations collected and sent as one BATCH request (one round trip).

    ``alloc_user_buf(size)``, ``alloc_kernel_buf``, ``alloc_priv_buf``,
    ``shm_from_id(id)`` and ``close(shm)`` queue an operation; ``run()``
    sends them and returns one result per operation, in order: an Shm, None
    for a close, or the PoolsvcError instance of an operation that failed
    (the others still ran).  A Batch can be run once.

    Closes take effect here when the batch runs, as ``Shm.close()`` does; a
    close of a Shm that is released by then (closed before, or by earlier
    closes in the batch) does nothing and gives None, as ``Shm.close()``.
    """

    __slots__ = ("ctx", "parts", "kinds", "limit", "closing", "local")

    def __init__(self, ctx: BatchOwner) -> None:
        self.ctx = ctx
        #: Encoded request frames, and per operation ``(message type, extra)``.
        self.parts: list[bytes] = []
        self.kinds: list[tuple[int, Any]] = []
        self.limit = ctx._channel.max_batch
        #: The Shm of each queued close, in order; whether some operation is
        #: answered here (:data:`_LOCAL`).
        self.closing: list[Any] = []
        self.local = False

    def __len__(self) -> int:
        return len(self.kinds)

    def __reduce__(self) -> NoReturn:
        refuse_pickle(self)

    def _full(self) -> None:
        raise BadParameters(f"batch already holds {len(self.kinds)} operations, the daemon's "
                            "limit (max_batch)")

    def _push(self, frame: bytes, kind: tuple[int, Any]) -> None:
        if len(self.parts) >= self.limit:
            self._full()
        self.parts.append(frame)
        self.kinds.append(kind)

    def _add(self, msg_type: int, body: bytes, extra: Any = None) -> None:
        self._push(pack_header(len(body), msg_type, 0) + body, (msg_type, extra))

    def _answer_here(self, result: PoolsvcError | None) -> None:
        """An operation that sends nothing: its result is ``result`` (the error of
        arguments that cannot even be encoded, or None)."""
        self.kinds.append((_LOCAL, result))
        self.local = True

    def _alloc(self, kind: int, size: int) -> None:
        # the checks of check_size; a valid size goes through _push (which may raise full)
        if type(size) is int and 0 < size < 1 << 63:
            self._push(pack_alloc_frame(ALLOC_BODY, ALLOC, 0, kind, size), _ALLOC_KIND)
            return
        try:
            check_size(size)
        except PoolsvcError as exc:  # BadParameters, or OutOfMemory for size 0
            self._answer_here(exc)

    alloc_user_buf = _batch_alloc(ALLOC_USER, "Queue ``Context.alloc_user_buf(size)``.")
    alloc_kernel_buf = _batch_alloc(ALLOC_KERNEL, "Queue ``Context.alloc_kernel_buf(size)``.")
    alloc_priv_buf = _batch_alloc(ALLOC_PRIV, "Queue ``Context.alloc_priv_buf(size)``.")

    def shm_from_id(self, shm_id: int) -> None:
        try:
            check_shm_id(shm_id)
        except BadParameters as exc:
            self._answer_here(exc)
            return
        self._add(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(shm_id))

    def close(self, shm: Any) -> None:
        """Queue ``shm.close()`` (None for a Shm already released: nothing is sent)."""
        if getattr(shm, "context", None) is not self.ctx:
            raise BadParameters(f"{shm!r} is not a shm of context {self.ctx.name}")
        if shm._refs <= 0:  # released: nothing to send
            self._answer_here(None)
            return
        parts = self.parts
        if len(parts) >= self.limit:
            self._full()
        parts.append(pack_close_frame(COOKIE_BODY, SHM_CLOSE, 0, shm.cookie))
        self.kinds.append(_CLOSE_KIND)
        self.closing.append(shm)

    def _unsend_closes(self, kinds: list[tuple[int, Any]], parts: list[bytes],
                       kept: list[bool]) -> None:
        """Answer here (None, nothing sent) the closes whose ``kept`` entry is False
        (their Shm was released by then); ``kept`` has one entry per queued close."""
        close_at = part_at = 0
        for kind_at, (msg_type, _) in enumerate(kinds):
            if msg_type == _LOCAL:  # (no frame)
                continue
            if msg_type == SHM_CLOSE:
                if not kept[close_at]:
                    kinds[kind_at] = (_LOCAL, None)
                    parts[part_at] = b""
                close_at += 1
            part_at += 1
        self.local = True

    def run(self) -> list[Any]:
        """Send the batch; one result per operation (Shm, None, or an exception)."""
        ctx = self.ctx
        ctx._check()
        ctx._channel.check_process()
        kinds, self.kinds = self.kinds, []
        parts, self.parts = self.parts, []
        closing, self.closing = self.closing, []
        # Closes take effect locally first, exactly as Shm.close() does; one whose
        # Shm is released by now sends nothing.
        if closing:
            kept = [shm._drop_ref() for shm in closing]
            if not all(kept):
                self._unsend_closes(kinds, parts, kept)
        if self.local:
            parts = [part for part in parts if part]
        if not parts:
            return [extra for _, extra in kinds]
        body = b"".join(parts)
        sent = len(parts)
        reply_type, reply = ctx._channel.call(P.MsgType.BATCH, body)
        if reply_type == P.MsgType.ERROR:
            raise P.error_from_body(reply)
        if reply_type != P.MsgType.BATCH_REPLY:
            raise ProtocolError(f"daemon answered BATCH with {P.type_name(reply_type)}")
        if not self.local:  # every operation was sent: the kernel takes the common replies
            return _batch_results(reply, sent, P.MAX_REPLY_FRAME, kinds, ctx, ctx.shms, ctx._shm_type,
                                  lambda i, sub_type, start, end:
                                  _result(ctx, reply, kinds[i][0], sub_type, start, end))
        replies = P.split_frames(reply, sent, P.MAX_REPLY_FRAME)
        if len(replies) != sent:
            raise ProtocolError(f"BATCH_REPLY holds {len(replies)} replies for {sent} requests")
        # the results of the operations answered here go in between
        answers = iter(replies)
        return [extra if msg_type == _LOCAL else _result(ctx, reply, msg_type, *next(answers))
                for msg_type, extra in kinds]


def _result(ctx: BatchOwner, reply: Any, msg_type: int, sub_type: int, start: int, end: int) -> Any:
    """The result of one reply frame ``reply[start:end]`` of type ``sub_type`` to a request
    of ``msg_type``: an exception, None (a close), PING's bytes, or a Shm."""
    if sub_type == _ERROR:
        return P.error_from_body(reply[start:end])
    if msg_type == SHM_CLOSE:
        if end - start != CLOSED_SIZE:
            raise ProtocolError(f"SHM_CLOSE reply of {end - start} bytes in a BATCH_REPLY")
        dropped = _unpack_closed_from(reply, start)[1]
        if dropped:
            ctx._unmap_segment(dropped)
        return None
    if msg_type == _PING:
        return bytes(reply[start:end])
    return ctx._make_shm(reply, None, start, end)


class LocalBatch:
    """The :class:`Batch` API over an embedded Context (operations run at once on ``run()``),
    so that code using batches runs against both the embedded System and the daemon."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.ops: list[tuple[str, Any]] = []

    def __len__(self) -> int:
        return len(self.ops)

    def alloc_user_buf(self, size: int) -> None:
        self.ops.append(("alloc_user_buf", size))

    def alloc_kernel_buf(self, size: int) -> None:
        self.ops.append(("alloc_kernel_buf", size))

    def alloc_priv_buf(self, size: int) -> None:
        self.ops.append(("alloc_priv_buf", size))

    def shm_from_id(self, shm_id: int) -> None:
        self.ops.append(("shm_from_id", shm_id))

    def close(self, shm: Any) -> None:
        self.ops.append(("close", shm))

    def run(self) -> list[Any]:
        results: list[Any] = []
        for op, arg in self.ops:
            try:
                results.append(arg.close() if op == "close" else getattr(self.ctx, op)(arg))
            except PoolsvcError as exc:
                results.append(exc)
        self.ops = []
        return results


def batch(ctx: Any) -> Any:
    """A batch for any context: ``ctx.batch()`` for a daemon's, a LocalBatch for an embedded one."""
    make = getattr(ctx, "batch", None)
    return make() if make is not None else LocalBatch(ctx)
