"""The service client's API objects: Context, Session and Shm.

:class:`Context` is a context in the daemon's System over its own
:class:`~.channel.Channel` (as opening ``/dev/tee0`` gives one file): it
allocates and registers :class:`Shm` objects, looks them up by id, opens
:class:`Session` objects with trusted apps, and collects
:class:`~.batch.Batch` operations.  ``register_*_buf(obj)`` finds the POSIX
shm object behind ``obj`` in this process's memory maps and sends its
descriptor, offset and length; the daemon maps the same object.

:class:`Shm` mirrors the embedded ``poolsvc.Shm`` (docs/design.md section 9):
``id``, ``size``, ``offset``, ``flags``, ``pages``, ``paddr``, ``cookie``,
``registered``; ``view()`` (also ``.buf``), ``len()``, ``close()`` and
``with``.  Its bytes are a zero-copy window on the context's storage segment
(mapped from the descriptor the daemon sent) or on the caller's own
registered object.

``Shm.close()`` is pipelined: the SHM_CLOSE request is queued and leaves in
the same ``sendmsg`` (or slot exchange) as the context's next request, or on
:meth:`Context.flush`; its reply is read with that request's.

The three live in one module because each reaches into the others' state
(a Shm's references and views, a Context's table of Shms and its channel).

Concurrency: a context (with its shms and sessions) belongs to one thread at
a time; different contexts are different sockets and may be used from
different threads.  The exception is :meth:`Session.cancel`, which any
thread may call while another waits in :meth:`Session.invoke`: it uses the
context's own MONITOR connection, under its own lock.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from ..api import ShmBase, check_shm_id, check_size, check_u32, check_writable, parse_uuid
from ..constants import PAGE_SIZE, GenCaps, ShmFlags
from ..errors import Closed, NotSharedMemory, NotSupported, PoolsvcError, ProtocolError
from . import channel as _channel_mod
from . import protocol as P
from .batch import Batch
from .channel import (
    ALLOC,
    ALLOC_BODY,
    ALLOC_KERNEL,
    ALLOC_PRIV,
    ALLOC_USER,
    CLOSED_SIZE,
    MAX_IN_FLIGHT,
    Channel,
    Dialer,
    Handle,
    check_reply,
    pack_alloc_frame,
)
from .params import Params

log = logging.getLogger("poolsvc.client")

_unpack_desc = P.DESC.unpack_from
_DESC_SIZE = P.DESC.size
_PAGES_FOLLOW = int(P.DescBits.PAGES_FOLLOW)
_NEW_SEGMENT = int(P.DescBits.NEW_SEGMENT)
_OK = int(P.MsgType.OK)
_unpack_closed = P.CLOSED.unpack

_REGISTERED = int(P.DescBits.REGISTERED)
_ARENA = int(P.Backing.ARENA)
_USER = int(P.Backing.USER)
_NO_PADDR = P.NO_PADDR
#: ShmFlags values by int (building an IntFlag costs microseconds).
_FLAGS: dict[int, ShmFlags] = {}
#: Fields of a DESC tuple (``P.DESC.unpack``), by index.
(D_COOKIE, D_ID, D_SIZE, D_FIRST, D_PADDR, D_SEG_OFFSET, D_SEG_BYTES, D_OFFSET, D_NPAGES, D_TOKEN,
 D_FLAGS, D_BACKING, D_BITS) = range(13)


class Shm(ShmBase, Handle):
    """A shared-memory object held through the daemon (the embedded Shm's API).

    Attributes: ``id``, ``size``, ``offset``, ``flags``, ``pages`` (numpy
    uint64), ``paddr``, ``cookie``, ``registered``; ``view()``, ``buf``,
    ``len()`` and ``close()``.  The daemon's descriptor is kept as the tuple
    it was unpacked into (``_desc``, fields ``D_*``); the attributes a caller
    reads rarely are properties over it, so that making a Shm is a few stores.
    """

    __slots__ = ("context", "id", "size", "cookie", "_desc", "_pages", "_refs", "_user_view",
                 "_views", "__weakref__")

    def __init__(self, context: "Context", desc: tuple, pages: np.ndarray | None,
                 user_view: memoryview | None) -> None:
        # (the compiled _batch_results, ext/wire.pyx, makes a Shm by these same slot stores)
        self.context = context
        self.cookie = desc[D_COOKIE]
        self.id = desc[D_ID]
        self.size = desc[D_SIZE]
        self._desc = desc
        self._pages = pages
        self._refs = 1
        self._user_view = user_view
        self._views: list[memoryview] = []

    @property
    def offset(self) -> int:
        """Where the buffer starts within its first page."""
        return int(self._desc[D_OFFSET])

    @property
    def flags(self) -> ShmFlags:
        """The ``TEE_SHM_*`` flags the daemon's constructor set."""
        flags = self._desc[D_FLAGS]
        known = _FLAGS.get(flags)
        return known if known is not None else _FLAGS.setdefault(flags, ShmFlags(flags))

    @property
    def paddr(self) -> int | None:
        """PA of the first byte when the pages are physically contiguous, else None."""
        paddr = self._desc[D_PADDR]
        return None if paddr == _NO_PADDR else int(paddr)

    @property
    def registered(self) -> bool:
        """Whether the secure world knows the buffer by its cookie."""
        return bool(self._desc[D_BITS] & _REGISTERED)

    @property
    def pages(self) -> np.ndarray:
        """Physical address of each 4 KiB page (numpy uint64, read-only)."""
        if self._pages is None:
            first = self._desc[D_FIRST]
            pages = np.arange(first, first + self._desc[D_NPAGES] * PAGE_SIZE, PAGE_SIZE,
                              dtype=np.uint64)
            pages.flags.writeable = False
            self._pages = pages
        return self._pages

    @property
    def page_run(self) -> tuple[int, int] | None:
        """``(PA of the first page, page count)`` when the pages are physically
        consecutive, else None (read ``pages`` then); builds no array."""
        desc = self._desc
        return None if desc[D_PADDR] == _NO_PADDR else (desc[D_FIRST], desc[D_NPAGES])

    def view(self) -> memoryview:
        """A writable zero-copy memoryview of the buffer (released when the Shm is).

        NotSupported for a private buffer of the reserved static pool
        (``alloc_priv_buf`` without dynamic shm): it may share its carve-out
        page with other clients' buffers, so it stays in the daemon.
        """
        if self._refs <= 0:
            self._check()  # raises Closed
        desc = self._desc
        backing = desc[D_BACKING]
        if backing == _ARENA:
            context = self.context
            segment = context._segment_views.get(desc[D_TOKEN])
            if segment is None:
                segment = context._segment_view(desc[D_TOKEN])
                if segment is None:
                    raise Closed(f"storage segment {desc[D_TOKEN]} of shm {self.cookie:#x} is not mapped")
            start = desc[D_SEG_OFFSET]
            # (the slice holds the mapping, also once the whole-segment view is released)
            view = segment[start:start + self.size]
        elif backing == _USER:
            assert self._user_view is not None
            view = self._user_view[:]
        else:
            raise NotSupported("a private buffer of the reserved static pool may share its "
                               "carve-out page with other clients' buffers, so it stays in the "
                               "daemon: view() of it is not available through the pool service")
        self._views.append(view)
        return view

    def close(self) -> None:
        """Drop one reference; the last one frees the memory (pipelined: no round trip).

        Closing a released Shm does nothing (like ``SharedMemory.close()``).
        """
        refs = self._refs
        if refs <= 0:
            return
        context = self.context
        if context._channel.forks != _channel_mod._forks:
            context._channel.check_process()  # raises UsedAfterFork
        self._refs = refs - 1
        if refs == 1:
            self._release_local()
        context._post_close(self)

    def _add_ref(self) -> None:
        """One more reference (the daemon gave this process the same shm again)."""
        self._refs += 1

    def _drop_ref(self) -> bool:
        """Drop one reference here, without a request (the caller sends SHM_CLOSE);
        the last one releases the views.  False, and nothing done, when the Shm is
        already released.  Package-private: :meth:`close` and :class:`~.batch.Batch`."""
        refs = self._refs - 1
        if refs < 0:
            return False
        self._refs = refs
        if refs == 0:
            self._release_local()
        return True

    def _release_local(self) -> None:
        self._refs = 0
        if self._views:
            for view in self._views:
                try:
                    view.release()
                except BufferError:
                    pass
            self._views.clear()
        if self._user_view is not None:
            try:
                self._user_view.release()
            except BufferError:
                pass
        self.context.shms.pop(self.cookie, None)

    def __repr__(self) -> str:
        state = "released" if self.closed else f"refs={self._refs}"
        paddr = f"{self.paddr:#x}" if self.paddr is not None else "scattered"
        return (f"<remote Shm id={self.id} size={self.size:#x} offset={self.offset:#x} "
                f"flags={self.flags!r} pages={self._desc[D_NPAGES]} paddr={paddr} {state}>")


class Session(Handle):
    """A session with a trusted app in the daemon's secure world."""

    def __init__(self, context: "Context", session_id: int, uuid: Any) -> None:
        self.context = context
        self.id = session_id
        self.uuid = uuid
        self.closed = False
        self.open_result: Any = None

    def invoke(self, func: int, params: Sequence[Any] = ()) -> Any:
        """INVOKE_COMMAND ``func`` with up to 4 params; returns an InvokeResult.

        Raises TeeError (with ``result``) on a non-zero answer, like the embedded Session.
        """
        if self.closed:
            raise Closed(f"session {self.id} is closed")
        return self.context._invoke(self, func, params)

    def cancel(self, cancel_id: int = 0) -> None:
        """Ask the secure world to cancel what this session runs (TEE_IOC_CANCEL).

        Sends CANCEL on the context's MONITOR connection, so it may be called
        from another thread while :meth:`invoke` of this session waits for its
        reply: an app waiting in TEE_Wait with cancellation unmasked returns
        TEE_ERROR_CANCEL.  The flag stays set for the session's life.  Raises
        Closed for a closed session or context.
        """
        if self.closed:
            raise Closed(f"session {self.id} is closed")
        self.context._cancel(self, check_u32(cancel_id, "cancel_id"))

    def close(self) -> None:
        """CLOSE_SESSION. Idempotent."""
        if self.closed:
            return
        self.closed = True
        ctx = self.context
        ctx.sessions.pop(self.id, None)
        if ctx.closed:
            return
        reply_type, body = ctx._channel.call(P.MsgType.CLOSE_SESSION, P.COOKIE.pack(self.id))
        check_reply(reply_type, body, "CLOSE_SESSION")

    def __repr__(self) -> str:
        return f"<remote Session {self.id} {self.uuid}{' closed' if self.closed else ''}>"


class Context(Handle):
    """A context in the daemon's System, over its own connection."""

    #: The class of its Shm objects (a Batch's replies make them: :mod:`.batch`).
    _shm_type = Shm

    def __init__(self, dialer: Dialer, name: str = "",
                 forget: Callable[["Context"], None] | None = None) -> None:
        """A new context of the daemon ``dialer`` reaches; ``forget(ctx)`` runs once it closes."""
        self._forget = forget
        self._dialer = dialer
        self._channel = dialer.open(P.Role.CONTEXT, name)
        #: The MONITOR connection that carries CANCEL (the context's own is busy with
        #: the INVOKE it cancels), opened with the first session; any thread, under the lock.
        self._cancel_channel: Channel | None = None
        self._cancel_lock = threading.Lock()
        #: TEE_GEN_CAP_REG_MEM: temporary memrefs are registered, else bounced (libteec's check)
        self._reg_mem = bool(self._channel.gen_caps & GenCaps.REG_MEM)
        self.cid = self._channel.cid
        self.name = self._channel.context_name
        self.shms: dict[int, Shm] = {}
        self.sessions: dict[int, Session] = {}
        self.closed = False
        #: Errors of pipelined closes, as (cookie, exception); normally empty.
        self.deferred_errors: list[tuple[int, PoolsvcError]] = []
        #: A view of each mapped storage segment, by token, that Shm views are cut from
        #: (a slice of a live view costs a fraction of a view of the mapping); released
        #: before the segment is unmapped (:meth:`_unmap_segment`) and when the context goes.
        self._segment_views: dict[int, memoryview] = {}
        self._channel.on_lost = self._lost
        #: :meth:`_on_close_reply`, bound once (it is queued with every pipelined close).
        self._close_reply = self._on_close_reply

    def _lost(self) -> None:
        """The daemon is gone (or the context closes): so is everything it held for us."""
        if self.closed:
            return
        self.closed = True
        for session in self.sessions.values():
            session.closed = True
        self.sessions.clear()
        for shm in list(self.shms.values()):
            shm._release_local()
        self._release_segment_views()
        self._close_cancel_line()
        if self._forget is not None:
            self._forget(self)

    def _check(self) -> None:
        if self.closed:
            raise Closed(f"context {self.name} is closed")

    # -- storage segments ----------------------------------------------------------------------
    def _segment_view(self, token: int) -> memoryview | None:
        """A view of the whole mapped segment ``token``, kept for later Shm views (None
        when the segment is not mapped)."""
        mm = self._channel.segments.get(token)
        if mm is None:
            return None
        view = self._segment_views[token] = memoryview(mm)
        return view

    def _unmap_segment(self, token: int) -> None:
        """Unmap the segment ``token`` (the daemon dropped it), its view released first."""
        view = self._segment_views.pop(token, None)
        if view is not None:
            view.release()
        self._channel.unmap_segment(token)

    def _release_segment_views(self) -> None:
        for view in self._segment_views.values():
            view.release()
        self._segment_views.clear()

    # -- replies -------------------------------------------------------------------------------
    def _make_shm(self, body: Any, user_view: memoryview | None = None, start: int = 0,
                  end: int = -1) -> Shm:
        """The Shm described by the DESC reply ``body[start:end]`` (``end`` -1: to the end)."""
        if end < 0:
            end = len(body)
        if end - start < _DESC_SIZE:
            raise ProtocolError(f"shm descriptor of {end - start} bytes, expected at least {_DESC_SIZE}")
        desc = _unpack_desc(body, start)
        bits = desc[D_BITS]
        pages = None
        if bits & _PAGES_FOLLOW:
            npages = desc[D_NPAGES]
            if end - start != _DESC_SIZE + 8 * npages:
                raise ProtocolError(f"shm descriptor of {end - start} bytes for {npages} pages")
            pages = np.frombuffer(body, dtype=np.uint64, count=npages, offset=start + _DESC_SIZE).copy()
            pages.flags.writeable = False
        if bits & _NEW_SEGMENT:
            self._channel.map_segment(desc[D_TOKEN], desc[D_SEG_BYTES])
        return self._shm_of(desc, pages, user_view)

    def _shm_of(self, desc: tuple[Any, ...], pages: np.ndarray | None, user_view: memoryview | None) -> Shm:
        """The Shm of the decoded DESC ``desc`` (its page array ``pages`` or None, the
        caller's registered object ``user_view`` or None), its segment mapped: the one this
        context holds under that cookie, with one more reference (``shm_from_id`` of a
        buffer it holds), else a new one, entered in :attr:`shms`."""
        shms, cookie = self.shms, desc[D_COOKIE]
        if cookie in shms:
            known = shms[cookie]
            known._add_ref()
            return known
        shm = shms[cookie] = Shm(self, desc, pages, user_view)
        return shm

    def _request_shm(self, msg_type: int, body: bytes, what: str, fds: Sequence[int] = (),
                     user_view: memoryview | None = None) -> Shm:
        self._check()
        reply_type, reply = self._channel.call(msg_type, body, fds)
        return self._make_shm(check_reply(reply_type, reply, what), user_view)

    def _post_close(self, shm: Shm) -> None:
        if self.closed:
            return
        channel = self._channel
        if channel.wire.post_close(shm.cookie, self._close_reply, channel.close_cookies) >= MAX_IN_FLIGHT:
            channel.drain()

    def _on_close_reply(self, reply_type: int, body: memoryview) -> None:
        """A reply to a pipelined SHM_CLOSE (the wire drops the cookie of an OK
        that unmaps nothing itself: ``ClientWire.post_close``)."""
        channel = self._channel
        cookie = channel.close_cookies.popleft()
        if reply_type == _OK and len(body) == CLOSED_SIZE:
            dropped = _unpack_closed(body)[1]
            if dropped:
                self._unmap_segment(dropped)
            return
        exc = (P.error_from_body(body) if reply_type == P.MsgType.ERROR
               else ProtocolError(f"unexpected {P.type_name(reply_type)} reply to SHM_CLOSE"))
        log.warning("closing shm %#x failed in the daemon: %s", cookie, exc)
        self.deferred_errors.append((cookie, exc))

    # -- allocation ------------------------------------------------------------------------------
    def alloc_user_buf(self, size: int) -> Shm:
        """Allocate a buffer user space can map; it gets an id (DYNAMIC | POOL)."""
        return self._alloc(ALLOC_USER, size)

    def alloc_kernel_buf(self, size: int) -> Shm:
        """Allocate a driver buffer shared with the TEE; no id (DYNAMIC | POOL)."""
        return self._alloc(ALLOC_KERNEL, size)

    def alloc_priv_buf(self, size: int) -> Shm:
        """Allocate a driver-private buffer, never registered (PRIV | POOL)."""
        return self._alloc(ALLOC_PRIV, size)

    def _alloc(self, kind: int, size: int) -> Shm:
        if type(size) is not int or not 0 < size < 1 << 63:
            check_size(size)
        if self.closed:
            self._check()  # raises Closed
        channel = self._channel
        reply_type, reply = channel.call_frame(pack_alloc_frame(ALLOC_BODY, ALLOC, 0, kind, size))
        if reply_type != _OK:
            check_reply(reply_type, reply, "ALLOC")
        desc = channel.wire.plain_desc(reply)  # no page array, no new segment (the common case)
        if desc is None:
            return self._make_shm(reply)
        return self._shm_of(desc, None, None)

    # -- registration ------------------------------------------------------------------------------
    def register_user_buf(self, obj: Any, fd: int | None = None) -> Shm:
        """Register a writable buffer backed by POSIX shm; it gets an id.

        The object's descriptor goes to the daemon: ``fd`` if given, else
        the object is reopened from this process's memory maps.
        """
        return self._register(obj, P.RegisterKind.USER, fd)

    def register_kernel_buf(self, obj: Any, fd: int | None = None) -> Shm:
        """Register a buffer backed by POSIX shm for the driver's use; no id."""
        return self._register(obj, P.RegisterKind.KERNEL, fd)

    def _register(self, obj: Any, kind: P.RegisterKind, fd: int | None) -> Shm:
        from ..mapping import buffer_span, find_mapping

        self._check()
        view, addr, length = buffer_span(obj)
        own_fd = -1
        try:
            mapping = find_mapping(addr, length)
            check_writable(view, addr, mapping.writable)
            if fd is None:
                fd = own_fd = _open_mapping(mapping)
            file_offset = mapping.file_offset + (addr - mapping.start)
            return self._request_shm(P.MsgType.REGISTER, P.REGISTER.pack(kind, file_offset, length),
                                     "REGISTER", fds=[fd], user_view=view)
        except BaseException:
            view.release()
            raise
        finally:
            if own_fd >= 0:
                os.close(own_fd)

    # -- lookup -----------------------------------------------------------------------------------
    def shm_from_id(self, shm_id: int) -> Shm:
        """The shm with this id, with one more reference (close() it when done)."""
        check_shm_id(shm_id)
        return self._request_shm(P.MsgType.SHM_FROM_ID, P.SHM_ID.pack(shm_id), "SHM_FROM_ID")

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, uuid: Any, params: Sequence[Any] = (), login: int = 0) -> Session:
        """Open a session with the trusted app ``uuid`` in the daemon's secure world."""
        self._check()
        ta_uuid = parse_uuid(uuid)
        check_u32(login, "login")
        with Params(self, params, self._reg_mem) as conv:
            body = ta_uuid.bytes + P.COOKIE.pack(login) + conv.encode()
            reply_type, reply = self._channel.call(P.MsgType.OPEN_SESSION, body)
            reply = check_reply(reply_type, reply, "OPEN_SESSION")
            session_id = P.COOKIE.unpack_from(reply)[0]
            result = conv.decode(reply[P.COOKIE.size:], f"open session with {ta_uuid}")
        session = Session(self, session_id, ta_uuid)
        session.open_result = result
        try:  # now, while the daemon can accept it: during a wait it reads only this process's monitors
            with self._cancel_lock:
                self._cancel_line()
        except PoolsvcError as exc:  # e.g. max_monitors: cancel() tries again
            log.debug("context %s: no connection for CANCEL yet: %s", self.name, exc)
        self.sessions[session_id] = session
        return session

    def _invoke(self, session: Session, func: int, params: Sequence[Any]) -> Any:
        self._check()
        check_u32(func, "command")
        with Params(self, params, self._reg_mem) as conv:
            body = P.SESSION.pack(session.id, func, 0) + conv.encode()
            reply_type, reply = self._channel.call(P.MsgType.INVOKE, body)
            reply = check_reply(reply_type, reply, "INVOKE")
            return conv.decode(reply, f"invoke {func} on session {session.id}")

    def _cancel_line(self) -> Channel:
        """The MONITOR connection for CANCEL, opened on first use (a socket: the
        daemon reads it while an app waits).  Call under ``_cancel_lock``."""
        channel = self._cancel_channel
        if channel is None or channel.closed:
            channel = self._cancel_channel = replace(self._dialer, transport="socket").open(
                P.Role.MONITOR, self.name)
        return channel

    def _cancel(self, session: Session, cancel_id: int) -> None:
        with self._cancel_lock:
            self._check()
            self._channel.check_process()
            reply_type, body = self._cancel_line().call(P.MsgType.CANCEL,
                                                        P.SESSION.pack(session.id, cancel_id, 0))
            check_reply(reply_type, body, "CANCEL")

    def _close_cancel_line(self) -> None:
        with self._cancel_lock:
            channel, self._cancel_channel = self._cancel_channel, None
        if channel is not None:
            channel.close()

    def flush(self) -> None:
        """Send pipelined closes now and wait for their replies (``stats()`` does this)."""
        if not self.closed and not self._channel.closed:
            self._channel.drain()

    # -- batches ----------------------------------------------------------------------------------
    def batch(self) -> Batch:
        """A :class:`Batch` of operations sent as one request."""
        self._check()
        return Batch(self)

    # -- release ----------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """Bytes and objects this context holds (as the client sees them)."""
        return {"shms": len(self.shms), "bytes": sum(s.size for s in self.shms.values()),
                "sessions": len(self.sessions)}

    def close(self) -> None:
        """Release every shm and session of this context and hang up. Idempotent."""
        if self.closed:
            return
        channel = self._channel
        try:
            if not channel.closed:
                channel.drain()
                channel.call(P.MsgType.GOODBYE)
        except Closed:
            pass
        finally:
            self._lost()
            channel.close()

    def __repr__(self) -> str:
        return f"<remote Context {self.name} shms={len(self.shms)}{' closed' if self.closed else ''}>"


def _open_mapping(mapping: Any) -> int:
    """A read-write descriptor of the object behind one of this process's mappings."""
    path = mapping.path
    if path.startswith("/dev/shm/") and not path.endswith(" (deleted)"):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            if os.fstat(fd).st_ino == mapping.inode:
                return fd
            os.close(fd)
    try:
        return os.open(f"/proc/self/map_files/{mapping.start:x}-{mapping.end:x}",
                       os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NotSharedMemory(
            f"cannot reopen the shared-memory object mapped at {mapping.start:#x} ({path}): "
            f"{exc.strerror}; pass its descriptor as register_*_buf(obj, fd=...)") from exc


