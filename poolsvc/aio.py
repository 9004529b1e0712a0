"""The asyncio client of the pool service: ``await poolsvc.aio.connect(path)``.

::

    from poolsvc import aio

    async with await aio.connect(path) as client:
        async with await client.open_context("app") as ctx:
            shm = await ctx.alloc_user_buf(8192)
            shm.buf[:5] = b"hello"
            await shm.close()

How it works: an :class:`AsyncClient` owns one worker thread (a
``ThreadPoolExecutor`` of one thread) and runs every request of the
synchronous client (:mod:`poolsvc.service.client`) there; a coroutine awaits
the request's future, so the event loop never blocks on the daemon.  There
is no second implementation of the protocol: framing, descriptors, the shm
slot, timeouts and fork checks are the synchronous client's.  (A native
asyncio transport would have to re-implement the channel's reply path, whose
waits are blocking ``recvmsg`` calls with kernel timeouts and, with the shm
transport, slot polling and eventfd wake-ups; the thread keeps one codec.)

The contract: the async classes mirror :mod:`poolsvc.api`.  Every method of
``api.System``, ``api.Context``, ``api.Shm`` and ``api.Session`` that talks
to the daemon or reads state a request changes is a coroutine here, with the
same parameters (``close()``, ``open_context()``, ``alloc_*_buf()``,
``usage()``, ``invoke()``, ...); attributes, ``Shm.view()``, ``Shm.buf`` and
``len(shm)`` are plain, since they read only the Shm's own fixed fields and
bytes; ``async with`` replaces ``with``.  ``tests/test_aio.py`` checks the
mirror against the Protocols.

Bytes: ``AsyncShm.buf`` (and ``view()``) is one memoryview of the buffer,
made on the worker when the Shm was obtained, as
``multiprocessing.shared_memory.SharedMemory.buf`` is one view; it is
released with the Shm (then ``view()`` raises Closed).

Concurrency: requests of one client run one at a time, in the order they
were awaited, on its worker; any number of tasks may await them at once.
The objects belong to one event loop's thread.

Cancellation: a request cannot be interrupted once the worker started it
(the connection would be left mid-reply); an invoke's trusted app can be
asked to stop with :meth:`AsyncSession.cancel` (a CANCEL from a thread of its
own).  A task cancelled while awaiting
one gets CancelledError at once; a request that had not started is dropped;
one that had started finishes on the worker, and what it created (a Shm's
reference, a session, a context, a client) is closed right after, so
nothing leaks and the client stays usable.  To bound waits on an
unresponsive daemon use the client's ``timeout`` (it raises DaemonTimeout
and closes that connection), not ``asyncio.timeout``, which only abandons
the wait.

Processes: as the synchronous client, an AsyncClient belongs to the
process that connected it: in a forked child every request raises
UsedAfterFork (the worker thread does not exist there) and ``close()``
drops the child's copies only; pickling is refused.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Coroutine, NoReturn, ParamSpec, Self, Sequence, TypeVar
import uuid as uuidlib

import numpy as np

from .constants import ShmFlags
from .errors import Closed, PoolsvcError
from .service import client as sync
from .service.channel import Handle, refuse_pickle
from .tee.params import RegisteredMemref

_P = ParamSpec("_P")
_T = TypeVar("_T")

__all__ = ["AsyncClient", "AsyncContext", "AsyncSession", "AsyncShm", "connect"]


class _Worker:
    """The one thread that runs a client's requests, in order."""

    def __init__(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                              thread_name_prefix="poolsvc-aio")
        self.pid = os.getpid()
        #: Set by :meth:`run_close`: the client's close, queued behind the requests before it.
        self.closing: concurrent.futures.Future[None] | None = None

    def submit(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> concurrent.futures.Future[_T]:
        """``fn`` queued on the worker; in a forked child (where the worker thread
        does not exist) run here at once, as the synchronous client runs there:
        its requests raise UsedAfterFork, its close drops the child's copies."""
        if os.getpid() != self.pid:
            job: concurrent.futures.Future[_T] = concurrent.futures.Future()
            try:
                job.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                job.set_exception(exc)
            return job
        try:
            return self.executor.submit(fn, *args, **kwargs)
        except RuntimeError:  # shut down by close()
            raise Closed("the asyncio client is closed") from None

    async def run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn(*args, **kwargs)`` on the worker; its result (or exception) here.

        When the awaiting task is cancelled, a request still queued is dropped
        and what a started one returns is closed (see the module doc).
        """
        job = self.submit(fn, *args, **kwargs)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # Runs after ``job`` on the one thread: by then it finished or was dropped.
            try:
                self.executor.submit(_dispose, job)
            except RuntimeError:  # closing: the client's close releases everything
                pass
            raise

    async def run_close(self, close: Callable[[], None]) -> None:
        """Queue ``close`` (once) and end the worker after it; wait for it to finish.

        Cancelling the wait does not stop the close.
        """
        if self.closing is None:
            self.closing = self.submit(close)
            self.executor.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(self.closing))


def _dispose(job: concurrent.futures.Future[Any]) -> None:
    """Close what the finished ``job`` created for a task that no longer waits for it."""
    if job.cancelled() or job.exception() is not None:
        return
    result = job.result()
    handle = getattr(result, "_handle", result)
    if isinstance(handle, Handle):
        handle.close()


class _Async:
    """Base of the async objects: ``async with`` closes them, pickling is refused."""

    __slots__ = ()

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __reduce__(self) -> NoReturn:
        refuse_pickle(self)


class AsyncShm(_Async):
    """A shared-memory object held through the daemon (``api.Shm``, ``close()`` awaited).

    Attributes as the synchronous Shm's; ``buf`` / ``view()`` is the one
    memoryview of its bytes, ``len()`` its size.
    """

    __slots__ = ("_handle", "context", "_buf", "_view_error")

    def __init__(self, shm: sync.Shm, context: "AsyncContext") -> None:
        """Wrap ``shm``; runs on the worker (it makes the view there)."""
        self._handle = shm
        self.context = context
        self._buf: memoryview | None = None
        self._view_error: PoolsvcError | None = None
        try:
            self._buf = shm.view()
        except PoolsvcError as exc:  # a private buffer of the static pool stays in the daemon
            self._view_error = exc

    @property
    def id(self) -> int:
        """The id user space knows it by (-1 when it has none)."""
        return self._handle.id

    @property
    def size(self) -> int:
        """Bytes of the buffer."""
        return self._handle.size

    @property
    def offset(self) -> int:
        """Where the buffer starts within its first page."""
        return self._handle.offset

    @property
    def cookie(self) -> int:
        """What the secure world knows it by."""
        return self._handle.cookie

    @property
    def flags(self) -> ShmFlags:
        """The ``TEE_SHM_*`` flags."""
        return self._handle.flags

    @property
    def paddr(self) -> int | None:
        """PA of the first byte when the pages are physically contiguous, else None."""
        return self._handle.paddr

    @property
    def registered(self) -> bool:
        """Whether the secure world knows it by its cookie."""
        return self._handle.registered

    @property
    def pages(self) -> np.ndarray:
        """The PA of each 4 KiB page (numpy uint64, read-only)."""
        return self._handle.pages

    @property
    def page_run(self) -> tuple[int, int] | None:
        """``(PA of the first page, page count)`` when the pages are consecutive, else None."""
        return self._handle.page_run

    @property
    def closed(self) -> bool:
        """True once the last reference is dropped."""
        return self._handle.closed

    @property
    def refs(self) -> int:
        """Live references (``close()`` drops one; the last frees the memory)."""
        return self._handle.refs

    def view(self) -> memoryview:
        """The writable zero-copy view of the buffer (the same one each time).

        Closed once the Shm is released; NotSupported for a private buffer of
        the reserved static pool (as the synchronous Shm).
        """
        self._handle._check()
        if self._buf is None:
            assert self._view_error is not None
            raise type(self._view_error)(str(self._view_error))
        return self._buf

    @property
    def buf(self) -> memoryview:
        """The same as :meth:`view`."""
        return self.view()

    def __len__(self) -> int:
        return self._handle.size

    async def close(self) -> None:
        """Drop one reference; the last frees the memory; a released Shm's does nothing."""
        if self._handle.closed:
            return
        await self.context._worker.run(self.context._close_shm, self)

    def __repr__(self) -> str:
        return f"<async {self._handle!r}>"


class AsyncSession(_Async):
    """A session with a trusted app in the daemon's secure world (``api.Session``)."""

    __slots__ = ("_handle", "context")

    def __init__(self, session: sync.Session, context: "AsyncContext") -> None:
        self._handle = session
        self.context = context

    @property
    def id(self) -> int:
        """The secure world's session id."""
        return int(self._handle.id)

    @property
    def uuid(self) -> uuidlib.UUID:
        """The trusted app's UUID."""
        return self._handle.uuid

    @property
    def closed(self) -> bool:
        return self._handle.closed

    @property
    def open_result(self) -> Any:
        """The InvokeResult of OPEN_SESSION."""
        return self._handle.open_result

    async def invoke(self, func: int, params: Sequence[Any] = ()) -> Any:
        """INVOKE_COMMAND ``func`` with up to 4 params (Shms of this client's
        contexts as AsyncShm); returns an InvokeResult, raises TeeError as the
        synchronous Session."""
        session = self._handle
        return await self.context._worker.run(_with_sync_params, lambda p: session.invoke(func, p), params)

    async def cancel(self, cancel_id: int = 0) -> None:
        """Ask the secure world to cancel what this session runs (the synchronous
        ``Session.cancel``).  It runs on a thread of its own, not on the client's
        worker, which may be inside this session's :meth:`invoke`."""
        await asyncio.to_thread(self._handle.cancel, cancel_id)

    async def close(self) -> None:
        """CLOSE_SESSION; idempotent."""
        if not self._handle.closed:
            await self.context._worker.run(self._handle.close)

    def __repr__(self) -> str:
        return f"<async {self._handle!r}>"


class AsyncContext(_Async):
    """A context in the daemon's System, over its own connection (``api.Context``)."""

    __slots__ = ("_handle", "_worker", "_shms")

    def __init__(self, ctx: sync.Context, worker: _Worker) -> None:
        self._handle = ctx
        self._worker = worker
        #: The wrapper of each Shm this context holds, by cookie (worker thread only).
        self._shms: dict[int, AsyncShm] = {}

    @property
    def cid(self) -> int:
        return self._handle.cid

    @property
    def name(self) -> str:
        return self._handle.name

    @property
    def closed(self) -> bool:
        return self._handle.closed

    # -- on the worker ---------------------------------------------------------------------------
    def _wrap(self, shm: sync.Shm) -> AsyncShm:
        """The AsyncShm of ``shm`` (the same object for the same Shm, as ``shm_from_id`` gives)."""
        known = self._shms.get(shm.cookie)
        if known is None or known._handle is not shm:
            known = self._shms[shm.cookie] = AsyncShm(shm, self)
        return known

    def _close_shm(self, shm: AsyncShm) -> None:
        shm._handle.close()
        if shm._handle.closed:
            self._shms.pop(shm._handle.cookie, None)

    def _request_shm(self, method: Callable[..., sync.Shm], *args: Any) -> AsyncShm:
        return self._wrap(method(*args))

    def _open_session(self, uuid: Any, params: Sequence[Any], login: int) -> AsyncSession:
        session = _with_sync_params(lambda p: self._handle.open_session(uuid, p, login), params)
        return AsyncSession(session, self)

    def _close(self) -> None:
        self._handle.close()
        self._shms.clear()

    # -- the API -----------------------------------------------------------------------------------
    async def alloc_user_buf(self, size: int) -> AsyncShm:
        """A buffer user space can map; it gets an id (DYNAMIC | POOL)."""
        return await self._worker.run(self._request_shm, self._handle.alloc_user_buf, size)

    async def alloc_kernel_buf(self, size: int) -> AsyncShm:
        """A driver buffer shared with the TEE; no id (DYNAMIC | POOL)."""
        return await self._worker.run(self._request_shm, self._handle.alloc_kernel_buf, size)

    async def alloc_priv_buf(self, size: int) -> AsyncShm:
        """A driver-private buffer, never registered (PRIV | POOL)."""
        return await self._worker.run(self._request_shm, self._handle.alloc_priv_buf, size)

    async def register_user_buf(self, obj: Any, fd: int | None = None) -> AsyncShm:
        """Register a writable buffer backed by POSIX shm; it gets an id (see the
        synchronous ``register_user_buf`` for ``fd``)."""
        return await self._worker.run(self._request_shm, self._handle.register_user_buf, obj, fd)

    async def register_kernel_buf(self, obj: Any, fd: int | None = None) -> AsyncShm:
        """Register a buffer backed by POSIX shm for the driver's use; no id."""
        return await self._worker.run(self._request_shm, self._handle.register_kernel_buf, obj, fd)

    async def shm_from_id(self, shm_id: int) -> AsyncShm:
        """The shm with this id, with one more reference (the same AsyncShm for one this
        context holds)."""
        return await self._worker.run(self._request_shm, self._handle.shm_from_id, shm_id)

    async def open_session(self, uuid: Any, params: Sequence[Any] = (), login: int = 0) -> AsyncSession:
        """Open a session with the trusted app ``uuid`` in the daemon's secure world."""
        return await self._worker.run(self._open_session, uuid, params, login)

    async def usage(self) -> dict[str, int]:
        """Bytes and objects this context holds (as the client sees them)."""
        return await self._worker.run(self._handle.usage)

    async def flush(self) -> None:
        """Send pipelined closes now and wait for their replies."""
        await self._worker.run(self._handle.flush)

    async def close(self) -> None:
        """Release every shm and session of this context and hang up; idempotent."""
        if not self._handle.closed:
            await self._worker.run(self._close)

    def __repr__(self) -> str:
        return f"<async {self._handle!r}>"


class AsyncClient(_Async):
    """A System-like asyncio handle on a running ``poolsvc serve`` (``api.System``)."""

    __slots__ = ("_handle", "_worker")

    def __init__(self, client: sync.Client, worker: _Worker) -> None:
        self._handle = client
        self._worker = worker

    @property
    def pool(self) -> str:
        """``"dynamic"`` or ``"static"``: which pool serves allocations."""
        return self._handle.pool

    @property
    def path(self) -> str:
        """The daemon's socket path."""
        return self._handle.path

    @property
    def closed(self) -> bool:
        return self._handle.closed or self._worker.closing is not None

    async def open_context(self, name: str = "") -> AsyncContext:
        """A new context in the daemon (one connection)."""
        ctx = await self._worker.run(self._handle.open_context, name)
        return AsyncContext(ctx, self._worker)

    async def stats(self) -> dict[str, Any]:
        """The System's figures, plus ``"service"``: the daemon's own (as ``Client.stats``)."""
        return await self._worker.run(self._handle.stats)

    async def service_stats(self) -> dict[str, Any]:
        """The daemon's whole STATS document."""
        return await self._worker.run(self._handle.service_stats)

    async def ping(self, payload: bytes = b"") -> bytes:
        """One round trip to the daemon; returns the echoed payload."""
        return await self._worker.run(self._handle.ping, payload)

    async def close(self) -> None:
        """Close every context (releasing what it holds) and end the worker; idempotent.

        Requests awaited before it run first; later ones raise Closed.
        """
        await self._worker.run_close(self._handle.close)

    def __repr__(self) -> str:
        return f"<async {self._handle!r}>"


def _with_sync_params(call: Callable[[Sequence[Any]], _T], params: Sequence[Any]) -> _T:
    """``call(params)`` with each AsyncShm in ``params`` (bare, or in a
    RegisteredMemref) replaced by its synchronous Shm; the sizes the secure
    world reports go back into the caller's RegisteredMemrefs."""
    plain: list[Any] = []
    copies: list[tuple[RegisteredMemref, RegisteredMemref]] = []
    for param in params:
        if isinstance(param, AsyncShm):
            param = param._handle
        elif isinstance(param, RegisteredMemref) and isinstance(param.shm, AsyncShm):
            copy = dataclasses.replace(param, shm=param.shm._handle)
            copies.append((param, copy))
            param = copy
        plain.append(param)
    try:
        return call(plain)
    finally:
        for mine, copy in copies:
            mine.size = copy.size


def _async_connect(sync_connect: Callable[_P, sync.Client]) -> Callable[_P, Coroutine[Any, Any, AsyncClient]]:
    """:func:`connect`: ``sync_connect`` on a new worker (the parameters are its own)."""
    async def connect(*args: _P.args, **kwargs: _P.kwargs) -> AsyncClient:
        worker = _Worker()
        try:
            client = await worker.run(sync_connect, *args, **kwargs)
        except BaseException:
            worker.executor.shutdown(wait=False)
            raise
        return AsyncClient(client, worker)

    connect.__doc__ = (f"An :class:`AsyncClient` of the daemon serving ``socket_path``; the "
                       f"arguments are those of :func:`poolsvc.service.client.connect`:\n\n"
                       f"{sync_connect.__doc__}")
    return connect


connect = _async_connect(sync.connect)
