"""The one API contract of poolsvc: what a System, Context, Shm and Session offer.

Two implementations serve it: the embedded :class:`poolsvc.system.System`
(in-process) and the pool service's :class:`poolsvc.service.client.Client`
(the same API over a connection to ``poolsvc serve``).  The
:class:`typing.Protocol` classes below are that contract, checked by mypy in
``tests/test_api_contract.py``: code typed against them runs on either.

The argument checks both implementations make, and their messages, live here
too (``check_*`` and ``parse_*``), so that the two sides refuse the same
arguments with the same exception and words.  Each check raises
:class:`~poolsvc.errors.BadParameters` (or the subclass named) and returns
nothing, or returns the normalised value.

Attributes are declared as read-only properties, so that an implementation may
hold them as plain attributes or compute them.

Concurrency: none here (pure functions and type declarations).
"""
from __future__ import annotations

import uuid as uuidlib
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from .constants import TEE_NUM_PARAMS, ShmFlags
from .errors import BadParameters, Closed, NotSharedMemory, OutOfMemory

#: Sizes and ids travel as 64-bit fields (``size_t`` in the driver, u64/s64 on the wire);
#: a size must stay below this bound.
SIZE_LIMIT = 1 << 63


# ---------------------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------------------
@runtime_checkable
class Shm(Protocol):
    """A shared-memory object (``struct tee_shm``) held by a context."""

    @property
    def id(self) -> int:
        """The id user space knows it by (-1 when it has none)."""

    @property
    def size(self) -> int:
        """Bytes of the buffer."""

    @property
    def offset(self) -> int:
        """Where the buffer starts within its first page."""

    @property
    def flags(self) -> ShmFlags:
        """The ``TEE_SHM_*`` flags its constructor set."""

    @property
    def paddr(self) -> int | None:
        """PA of the first byte when the pages are physically contiguous, else None."""

    @property
    def cookie(self) -> int:
        """What the secure world knows it by."""

    @property
    def registered(self) -> bool:
        """Whether the secure world knows it by its cookie (REGISTER_SHM)."""

    @property
    def pages(self) -> np.ndarray:
        """The PA of each 4 KiB page (numpy uint64, read-only)."""

    @property
    def page_run(self) -> tuple[int, int] | None:
        """``(PA of the first page, page count)`` when the pages are consecutive, else None."""

    @property
    def closed(self) -> bool:
        """True once the last reference is dropped."""

    def view(self) -> memoryview:
        """A writable zero-copy view of the buffer's bytes, released with the Shm."""

    @property
    def buf(self) -> memoryview:
        """The same as :meth:`view`."""

    def __len__(self) -> int:
        """The buffer's size in bytes."""

    def close(self) -> None:
        """Drop one reference; the last one frees the memory; a released Shm's does nothing."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Session(Protocol):
    """A session with a trusted app (``Context.open_session``)."""

    @property
    def id(self) -> int:
        """The secure world's session id."""

    @property
    def uuid(self) -> uuidlib.UUID:
        """The trusted app's UUID."""

    @property
    def closed(self) -> bool: ...

    def invoke(self, func: int, params: Sequence[Any] = ()) -> Any:
        """INVOKE_COMMAND ``func`` with up to 4 params; returns an InvokeResult.

        Raises TeeError (with ``result``) on a non-zero answer.
        """

    def cancel(self, cancel_id: int = 0) -> None:
        """Ask the secure world to cancel what this session runs (TEE_IOC_CANCEL);
        callable from another thread while ``invoke`` runs.  Closed after close()."""

    def close(self) -> None:
        """CLOSE_SESSION; idempotent."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Context(Protocol):
    """A client context, as opening ``/dev/tee0`` gives one."""

    @property
    def cid(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    def alloc_user_buf(self, size: int) -> Shm:
        """A buffer user space can map; it gets an id (DYNAMIC | POOL)."""

    def alloc_kernel_buf(self, size: int) -> Shm:
        """A driver buffer shared with the TEE; no id (DYNAMIC | POOL)."""

    def alloc_priv_buf(self, size: int) -> Shm:
        """A driver-private buffer, never registered (PRIV | POOL)."""

    def register_user_buf(self, obj: Any) -> Shm:
        """Register a writable buffer backed by POSIX shm; it gets an id (USER_MAPPED | DYNAMIC)."""

    def register_kernel_buf(self, obj: Any) -> Shm:
        """Register a buffer backed by POSIX shm for the driver's use; no id (DYNAMIC)."""

    def shm_from_id(self, shm_id: int) -> Shm:
        """The shm with this id, with one more reference."""

    def open_session(self, uuid: Any, params: Sequence[Any] = (), login: int = 0) -> Session:
        """Open a session with the trusted app ``uuid``."""

    def usage(self) -> dict[str, int]:
        """Bytes and objects this context holds."""

    def close(self) -> None:
        """Release every shm and session of this context; idempotent."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class System(Protocol):
    """A machine with pools, contexts and a TEE: embedded, or reached through the service."""

    @property
    def pool(self) -> str:
        """``"dynamic"`` or ``"static"``: which pool serves allocations."""

    @property
    def closed(self) -> bool: ...

    def open_context(self, name: str = "") -> Context:
        """A new client context."""

    def stats(self) -> dict[str, Any]:
        """Pools, frames, ids, storage and per-context usage, as plain data."""

    def close(self) -> None:
        """Close every context and release everything; idempotent."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


# ---------------------------------------------------------------------------------------
# Argument checks both implementations call
# ---------------------------------------------------------------------------------------
def check_size(size: Any) -> None:
    """An allocation size: a positive int (not bool) below :data:`SIZE_LIMIT`.

    Size 0 raises OutOfMemory, as the kernel's pools refuse it and
    ``TEE_IOC_SHM_ALLOC`` fails with ENOMEM (``tee_shm_alloc_user_buf``); a
    negative size, or one that is not an int, BadParameters.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise BadParameters(f"size must be an int, got {size!r}")
    if size == 0:
        raise OutOfMemory("size 0: the pools refuse an empty allocation (ENOMEM)")
    if size < 0:
        raise BadParameters(f"size {size} must be positive")
    if size >= SIZE_LIMIT:
        raise BadParameters(f"size {size} does not fit in a signed 64-bit field")


def check_shm_id(shm_id: Any) -> None:
    """A shm id to look up: an int (not bool) that fits in a signed 64-bit field."""
    if isinstance(shm_id, bool) or not isinstance(shm_id, int):
        raise BadParameters(f"id must be an int, got {shm_id!r}")
    if not -SIZE_LIMIT <= shm_id < SIZE_LIMIT:
        raise BadParameters(f"id {shm_id} does not fit in a signed 64-bit field")


def check_u32(value: Any, what: str) -> int:
    """``value`` when it is an int (not bool) in [0, 2**32); ``what`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise BadParameters(f"{what} {value!r} is not a u32")
    return value


def check_param_count(params: Sequence[Any]) -> None:
    """At most TEE_NUM_PARAMS parameters reach a trusted app."""
    if len(params) > TEE_NUM_PARAMS:
        raise BadParameters(f"{len(params)} parameters; a trusted app takes at most {TEE_NUM_PARAMS}")


def parse_uuid(value: Any) -> uuidlib.UUID:
    """A :class:`uuid.UUID` from a UUID or its string form; BadParameters otherwise."""
    if isinstance(value, uuidlib.UUID):
        return value
    try:
        return uuidlib.UUID(str(value))
    except ValueError:
        raise BadParameters(f"{value!r} is not a UUID") from None


def check_writable(view: memoryview, addr: int, mapping_writable: bool) -> None:
    """A buffer to register must be writable: its mapping and the object itself.

    ``view`` is the buffer's memoryview, ``addr`` its address, ``mapping_writable``
    whether the shared mapping holding it is writable.  Raises NotSharedMemory.
    """
    if not mapping_writable:
        raise NotSharedMemory(f"buffer at {addr:#x} is in a read-only mapping; "
                              "a registered buffer must be writable")
    if view.readonly:
        raise NotSharedMemory("buffer object is read-only; a registered buffer must be writable")



class ShmBase:
    """What both Shm implementations share: the reference count's reading, ``len()``, ``.buf``.

    A subclass keeps ``_refs`` (live references), ``id``, ``cookie`` and
    ``size``, and defines ``view()``.
    """

    __slots__ = ()
    _refs: int
    id: int
    cookie: int
    size: int

    @property
    def closed(self) -> bool:
        """True once the last reference is dropped."""
        return self._refs <= 0

    @property
    def refs(self) -> int:
        """Live references (``close()`` drops one; the last frees the memory)."""
        return self._refs

    def _check(self) -> None:
        if self._refs <= 0:
            raise Closed(f"shm (id {self.id}, cookie {self.cookie:#x}) is released")

    def __len__(self) -> int:
        """The buffer's size in bytes (``size``)."""
        return self.size

    def view(self) -> memoryview:
        raise NotImplementedError

    @property
    def buf(self) -> memoryview:
        """The same as :meth:`view` (the name ``multiprocessing.shared_memory`` uses)."""
        return self.view()

__all__ = ["SIZE_LIMIT", "Context", "Session", "Shm", "System", "check_param_count", "check_shm_id",
           "check_size", "check_u32", "check_writable", "parse_uuid"]
