"""poolsvc's exceptions: one base class, typed subclasses.

Every error poolsvc raises on purpose is a :class:`PoolsvcError`.  Each class
carries the GlobalPlatform / OP-TEE return code that the secure side would
answer with for the same fault (``tee_code``), so the simulated secure world
can turn any exception into a return code at one boundary.

Messages say what was wrong and with which value, e.g.
``AlignmentError("page-list entry 3 is 0x50000010, not 4 KiB-aligned")``.
"""
from __future__ import annotations

from . import teecodes

# GlobalPlatform TEE Client API return codes (facts, see docs/design).
TEE_SUCCESS = 0x00000000
TEE_ERROR_GENERIC = 0xFFFF0000
TEE_ERROR_ACCESS_DENIED = 0xFFFF0001
TEE_ERROR_CANCEL = 0xFFFF0002
TEE_ERROR_BAD_FORMAT = 0xFFFF0005
TEE_ERROR_BAD_PARAMETERS = 0xFFFF0006
TEE_ERROR_BAD_STATE = 0xFFFF0007
TEE_ERROR_ITEM_NOT_FOUND = 0xFFFF0008
TEE_ERROR_NOT_IMPLEMENTED = 0xFFFF0009
TEE_ERROR_NOT_SUPPORTED = 0xFFFF000A
TEE_ERROR_COMMUNICATION = 0xFFFF000E
TEE_ERROR_OUT_OF_MEMORY = 0xFFFF000C
TEE_ERROR_SECURITY = 0xFFFF000F
TEE_ERROR_SHORT_BUFFER = 0xFFFF0010
TEE_ERROR_BUSY = 0xFFFF000D


class PoolsvcError(Exception):
    """Base of every error poolsvc raises on purpose."""

    #: The TEE return code the secure side answers with for this fault.
    tee_code: int = TEE_ERROR_GENERIC


class OutOfMemory(PoolsvcError):
    """A pool, allocator or table has no room for the request."""

    tee_code = TEE_ERROR_OUT_OF_MEMORY


class BadParameters(PoolsvcError):
    """An argument is malformed or out of range."""

    tee_code = TEE_ERROR_BAD_PARAMETERS


class AlignmentError(BadParameters):
    """An address or size that must be aligned is not."""


class SizeOverflow(BadParameters):
    """A size computation overflows its fixed-width type (u64 on the wire)."""


class SecureMemoryError(BadParameters):
    """A normal-world buffer or page list points into secure (or unknown) memory."""


class AddressError(BadParameters):
    """A physical or virtual address is outside every region, or not mapped."""


class DoubleFree(BadParameters):
    """Memory or an id is released that is not currently allocated."""


class NotSharedMemory(BadParameters):
    """A buffer to register is not backed by POSIX shared memory (or is read-only)."""


class ItemNotFound(PoolsvcError):
    """An id, cookie or session does not exist (or belongs to someone else)."""

    tee_code = TEE_ERROR_ITEM_NOT_FOUND


class NotSupported(PoolsvcError):
    """The configuration's capabilities do not offer this operation."""

    tee_code = TEE_ERROR_NOT_SUPPORTED


class SecurityViolation(PoolsvcError):
    """An access reaches past the memory the caller may touch."""

    tee_code = TEE_ERROR_SECURITY


class ShortBuffer(PoolsvcError):
    """An output buffer is too small; ``needed`` gives the size required."""

    tee_code = TEE_ERROR_SHORT_BUFFER

    def __init__(self, message: str, needed: int = 0) -> None:
        super().__init__(message)
        self.needed = needed


class Busy(PoolsvcError):
    """The object is in use (e.g. a cookie while a call still uses it)."""

    tee_code = TEE_ERROR_BUSY


class Closed(PoolsvcError):
    """An object (System, Context, Shm, Session, connection) is used after close."""

    tee_code = TEE_ERROR_BAD_STATE


class ConfigError(BadParameters):
    """A configuration field is invalid; the message names the field and value."""


class ProtocolError(PoolsvcError):
    """A wire message is malformed, truncated, oversized or of the wrong version."""

    tee_code = TEE_ERROR_COMMUNICATION


class CorruptionError(PoolsvcError):
    """A shared structure fails an integrity check (loop bound exceeded, bad magic)."""

    tee_code = TEE_ERROR_BAD_FORMAT


class InternalError(PoolsvcError):
    """Something that cannot happen happened: a bug in poolsvc."""


class TeeError(PoolsvcError):
    """A call into the secure world returned a non-zero code.

    ``code`` is the TEE return code and ``origin`` the TEE_ORIGIN_* value.
    """

    def __init__(self, message: str, code: int, origin: int) -> None:
        super().__init__(teecodes.annotate(message, code, origin))
        self.code = code
        self.origin = origin
        self.tee_code = code


__all__ = [name for name in dir() if name[0].isupper() and not name.startswith("TEE_")] + [
    name for name in dir() if name.startswith("TEE_")
]
