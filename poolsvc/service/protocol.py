"""The pool service's wire protocol, shared by the daemon and its clients.

This module owns every byte layout that crosses the Unix socket: the frame
header, the message types and error codes (``IntEnum``), the handshake, the
bodies of each request and reply, and the mapping between error codes and
:mod:`poolsvc.errors` classes.  Nothing here does I/O; ``docs/protocol.md``
describes the same format for readers of the wire.

Framing (all integers little-endian)::

    frame   = header body
    header  = u32 length      bytes of body that follow (<= the negotiated max_frame)
              u16 type        a MsgType
              u16 flags       0 in version 1 (anything else is a ProtocolError)

A connection starts with HELLO (magic, version, role, name) and the daemon
answers WELCOME or ERROR(VERSION) and hangs up.  After that, every request
frame gets exactly one reply frame (OK or ERROR; BATCH_REPLY for BATCH), in
request order.  Clients may send several requests before reading the replies
(pipelining); the daemon stops reading a client whose unread replies exceed
its output bound.

A BATCH frame's body is a sequence of complete request frames (only the
types in :data:`BATCHABLE`); the reply is one BATCH_REPLY whose body holds
one OK or ERROR frame per request, in order.  Requests of a batch run one
after the other; a failing one does not stop the next (no atomicity).

File descriptors travel as ``SCM_RIGHTS`` ancillary data attached to the
first bytes of the frame they belong to: one with each REGISTER request, one
with each reply descriptor that has :attr:`DescBits.NEW_SEGMENT`.  A
receiver queues the descriptors it gets and hands them, in order, to the
frames that announce them.

Concurrency: pure functions and immutable tables; safe from any thread.
"""
from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Iterator

from .. import errors
from .._backend import core
from ..errors import PoolsvcError, ProtocolError

#: ``b"PSVC"`` read as a little-endian u32; the first field of HELLO.
MAGIC = 0x43565350
#: The base protocol version (socket transport only).  Clients that know
#: nothing else send it, and every daemon accepts it.
VERSION = 1
#: Version 2 adds a u32 ``features`` word to HELLO (after the role) and a
#: WELCOME_EXT after WELCOME's fixed part; with :attr:`Feature.SHM_SLOT`
#: granted, WELCOME carries the descriptor of the connection's shared-memory
#: request/reply slot (its layout: module ``slot``).
VERSION_2 = 2
#: Versions a daemon of this module accepts in HELLO.
VERSIONS = (VERSION, VERSION_2)
#: The newest version this module speaks.
LATEST_VERSION = VERSION_2

HEADER = struct.Struct("<IHH")
HEADER_SIZE = HEADER.size  # 8
_unpack_header = HEADER.unpack_from

#: Default bound on a request frame's body; the daemon announces its own.
DEFAULT_MAX_FRAME = 1 << 20
#: Bound on a reply frame's body that a client accepts (a registered 1 GiB
#: buffer's page array is 2 MiB).
MAX_REPLY_FRAME = 64 << 20
#: Default bound on the number of requests in one BATCH.
DEFAULT_MAX_BATCH = 4096
#: Longest client or context name, in UTF-8 bytes.
MAX_NAME = 64
#: Longest error message carried in an ERROR body, in UTF-8 bytes.
MAX_MESSAGE = 1024
#: Descriptors sent with one ``sendmsg`` (well below the kernel's SCM_MAX_FD, 253).
MAX_FDS_PER_SEND = 64
#: Descriptors a receiver may have queued but not yet consumed.
MAX_PENDING_FDS = 16
#: A descriptor's ``paddr`` field when the buffer's pages are not contiguous.
NO_PADDR = (1 << 64) - 1


class MsgType(IntEnum):
    """Frame types.  Requests go client to daemon; replies the other way."""

    # handshake and replies
    HELLO = 1          # request: magic, version, role, name
    WELCOME = 2        # reply to HELLO: the daemon's layout and limits
    OK = 3             # reply: success; body depends on the request
    ERROR = 4          # reply: an error code, a TEE code and a message
    BATCH = 5          # request: a sequence of request frames
    BATCH_REPLY = 6    # reply to BATCH: one OK/ERROR frame per request
    GOODBYE = 7        # request: close the context; the daemon then hangs up
    PING = 8           # request: echoed back in OK (round-trip measurements)
    DOORBELL = 9       # either way, shm-slot connections only: "look at the slot"; no reply;
                       # also carries the SCM_RIGHTS descriptors of replies given in the slot
    # shared memory
    ALLOC = 16         # request: kind (AllocKind), size
    REGISTER = 17      # request: kind (RegisterKind), file offset, length; one fd
    SHM_CLOSE = 18     # request: cookie; drops one reference
    SHM_FROM_ID = 19   # request: id; takes one reference
    # sessions with trusted applications
    OPEN_SESSION = 24  # request: uuid (16 bytes)
    INVOKE = 25        # request: session, func, parameters
    CLOSE_SESSION = 26  # request: session
    CANCEL = 27        # request (any role): session, cancel id; cancels a call of the
                       # caller's process (TEE_IOC_CANCEL); OK says nothing of the app
    # observability
    STATS = 32         # request (any role): OK with a JSON document


#: Request types that may appear inside a BATCH.
BATCHABLE = frozenset({MsgType.ALLOC, MsgType.SHM_CLOSE, MsgType.SHM_FROM_ID, MsgType.PING})
#: Most parameters of one OPEN_SESSION or INVOKE (what reaches a trusted app).
MAX_PARAMS = 4


class Role(IntEnum):
    """What a connection is for, chosen in HELLO."""

    CONTEXT = 1   # one Context of the daemon's System lives as long as the connection
    MONITOR = 2   # no Context: STATS, PING and CANCEL only (``poolsvc stat``)


class Feature(IntFlag):
    """Features a version-2 HELLO asks for and WELCOME_EXT grants."""

    SHM_SLOT = 1   # a shared-memory request/reply slot for this connection (its fd comes with WELCOME)
    #: with SHM_SLOT: an eventfd the client writes to wake a sleeping daemon (the
    #: second descriptor of WELCOME), instead of a DOORBELL frame on the socket
    EVENTFD_BELL = 2


class AllocKind(IntEnum):
    """Which ``alloc_*_buf`` an ALLOC request calls."""

    USER = 0
    KERNEL = 1
    PRIV = 2


class RegisterKind(IntEnum):
    """Which ``register_*_buf`` a REGISTER request calls."""

    USER = 0
    KERNEL = 1


class Backing(IntEnum):
    """Where a described shm's bytes live."""

    ARENA = 0    # the context's own storage segment (mapped by the client via SCM_RIGHTS)
    STATIC = 1   # the reserved carve-out, shared by all clients: never sent
    USER = 2     # the client's own registered object


class DescBits(IntFlag):
    """Bits of a descriptor's ``bits`` field."""

    CONTIGUOUS = 1    # pages are first_pa, first_pa + 4096, ...
    REGISTERED = 2    # known to the secure world by cookie
    NEW_SEGMENT = 4   # a storage descriptor accompanies this reply (seg_bytes long)
    PAGES_FOLLOW = 8  # npages u64 page addresses follow the descriptor


class ErrorCode(IntEnum):
    """Error codes of ERROR replies; each maps to one :mod:`poolsvc.errors` class."""

    PROTOCOL = 1           # malformed frame or body
    VERSION = 2            # wrong magic or version in HELLO
    UNKNOWN_TYPE = 3       # a MsgType this daemon does not serve in this state
    BAD_PARAMETERS = 16
    ALIGNMENT = 17
    SIZE_OVERFLOW = 18
    SECURE_MEMORY = 19
    ADDRESS = 20
    DOUBLE_FREE = 21
    NOT_SHARED_MEMORY = 22
    CONFIG = 23
    OUT_OF_MEMORY = 32
    LIMIT = 33             # a per-client bound of the daemon (raised as OutOfMemory)
    ITEM_NOT_FOUND = 34
    NOT_SUPPORTED = 35
    SECURITY = 36
    SHORT_BUFFER = 37
    BUSY = 38
    CLOSED = 39
    TEE = 40
    CORRUPTION = 41
    INTERNAL = 63


_CODE_OF: dict[type, ErrorCode] = {
    errors.ProtocolError: ErrorCode.PROTOCOL,
    errors.BadParameters: ErrorCode.BAD_PARAMETERS,
    errors.AlignmentError: ErrorCode.ALIGNMENT,
    errors.SizeOverflow: ErrorCode.SIZE_OVERFLOW,
    errors.SecureMemoryError: ErrorCode.SECURE_MEMORY,
    errors.AddressError: ErrorCode.ADDRESS,
    errors.DoubleFree: ErrorCode.DOUBLE_FREE,
    errors.NotSharedMemory: ErrorCode.NOT_SHARED_MEMORY,
    errors.ConfigError: ErrorCode.CONFIG,
    errors.OutOfMemory: ErrorCode.OUT_OF_MEMORY,
    errors.ItemNotFound: ErrorCode.ITEM_NOT_FOUND,
    errors.NotSupported: ErrorCode.NOT_SUPPORTED,
    errors.SecurityViolation: ErrorCode.SECURITY,
    errors.ShortBuffer: ErrorCode.SHORT_BUFFER,
    errors.Busy: ErrorCode.BUSY,
    errors.Closed: ErrorCode.CLOSED,
    errors.TeeError: ErrorCode.TEE,
    errors.CorruptionError: ErrorCode.CORRUPTION,
    errors.InternalError: ErrorCode.INTERNAL,
}
_CLASS_OF: dict[ErrorCode, type] = {code: cls for cls, code in _CODE_OF.items()}
_CLASS_OF[ErrorCode.VERSION] = errors.ProtocolError
_CLASS_OF[ErrorCode.UNKNOWN_TYPE] = errors.ProtocolError
_CLASS_OF[ErrorCode.LIMIT] = errors.OutOfMemory


class LimitExceeded(errors.OutOfMemory):
    """Daemon-side marker for a per-client bound; travels as ErrorCode.LIMIT."""


class VersionMismatch(ProtocolError):
    """Daemon-side marker for a bad HELLO; travels as ErrorCode.VERSION."""


class UnknownType(ProtocolError):
    """Daemon-side marker for an unknown or misplaced type; travels as UNKNOWN_TYPE."""


_CODE_OF[LimitExceeded] = ErrorCode.LIMIT
_CODE_OF[VersionMismatch] = ErrorCode.VERSION
_CODE_OF[UnknownType] = ErrorCode.UNKNOWN_TYPE


def code_of(exc: BaseException) -> ErrorCode:
    """The ErrorCode of an exception (its most specific known class; else INTERNAL)."""
    for cls in type(exc).__mro__:
        code = _CODE_OF.get(cls)
        if code is not None:
            return code
    return ErrorCode.INTERNAL


# ---------------------------------------------------------------------------------------
# Body layouts
# ---------------------------------------------------------------------------------------
#: HELLO: magic, version, role; then the client's name (UTF-8, <= MAX_NAME bytes).
HELLO = struct.Struct("<IHH")
#: WELCOME: version, pool (0 dynamic, 1 static), daemon pid, context id (0 for
#: MONITOR), sec_caps, gen_caps, max_batch, max_frame, dynamic base and size,
#: static base and size; then the context's name (UTF-8).
WELCOME = struct.Struct("<HHIIIIIIQQQQ")
#: Version 2 HELLO: magic, version, role, features (Feature); then the name.
HELLO2 = struct.Struct("<IHHI")
#: Version 2 WELCOME, after WELCOME's fixed part and before the context's
#: name: features granted (Feature), size of the slot object (0 without one).
WELCOME_EXT = struct.Struct("<II")
#: ERROR: code, reserved, TEE return code, extra (ShortBuffer.needed or
#: TeeError.origin); then the message (UTF-8, <= MAX_MESSAGE bytes).
ERROR = struct.Struct("<HHIQ")
#: ALLOC: kind (AllocKind), size (signed so that a negative size reaches the
#: System and gets its own error).
ALLOC = struct.Struct("<Iq")
#: REGISTER: kind (RegisterKind), offset of the buffer in the object, length.
REGISTER = struct.Struct("<IQQ")
#: SHM_CLOSE request: the shm's cookie.  CLOSE_SESSION request: the session id.
COOKIE = struct.Struct("<Q")
#: SHM_FROM_ID request: the id.
SHM_ID = struct.Struct("<q")
#: SHM_CLOSE reply: 1 when this was the last reference, token of a storage
#: segment the client should unmap (0 for none).
CLOSED = struct.Struct("<II")
#: Shm descriptor (OK reply to ALLOC, REGISTER, SHM_FROM_ID): cookie, id, size,
#: first page address, paddr (NO_PADDR when scattered), byte offset of the
#: buffer in its storage segment, segment size when NEW_SEGMENT, offset in
#: the first page, number of pages, segment token (0: none), flags (ShmFlags),
#: backing (Backing), bits (DescBits).  ``npages`` u64 follow with PAGES_FOLLOW.
DESC = struct.Struct("<QqQQQQQIIIHBB")
#: INVOKE request head: session id, function, reserved.  Then the parameters:
#: a u64 count (<= 4) and ``count`` PARAM records.  OPEN_SESSION request: the
#: app's UUID (16 bytes, RFC 4122 order), login (u64), then the parameters.
#: CLOSE_SESSION request: the session id (COOKIE).  CANCEL request: session
#: id, cancel id, reserved (0).
SESSION = struct.Struct("<QII")
#: One session parameter: kind word (ParamKind in bits 0-7, direction 0 in /
#: 1 out / 2 inout in bits 8-9, PARAM_WHOLE), then three u64 words:
#: VALUE a, b, 0; MEMREF cookie (one of the client's own shms), offset, size;
#: NULL_MEMREF 0, 0, size.
PARAM = struct.Struct("<I4xQQQ")
#: MEMREF covering the whole shm from ``offset`` (the size word is ignored).
PARAM_WHOLE = 1 << 16
#: Session reply (OPEN_SESSION: after the u64 session id, 0 when refused):
#: TEE return code, origin, number of OUTPUT records that follow.  A non-zero
#: code travels in an OK reply, so that its outputs (e.g. the size a
#: SHORT_BUFFER needs) reach the client.
RESULT = struct.Struct("<III")
#: One parameter's output: OutputKind, then (a, b) of a value or (size, 0).
OUTPUT = struct.Struct("<I4xQQ")


class ParamKind(IntEnum):
    """Kinds of session parameter on the wire."""

    NONE = 0
    VALUE = 1
    MEMREF = 2
    NULL_MEMREF = 3


class OutputKind(IntEnum):
    """What a parameter gave back."""

    NONE = 0
    VALUE = 1
    SIZE = 2


# ---------------------------------------------------------------------------------------
# The shm slot (version 2, Feature.SHM_SLOT): its layout is in ``slot``
# ---------------------------------------------------------------------------------------
#: The DOORBELL frame (empty body).
DOORBELL_FRAME = HEADER.pack(0, 9, 0)


def frame(msg_type: int, body: bytes | bytearray | memoryview = b"") -> bytes:
    """One frame: the header for ``body`` followed by ``body``."""
    return HEADER.pack(len(body), msg_type, 0) + body


def parse_header(buf: bytes | bytearray | memoryview, pos: int, max_frame: int) -> tuple[int, int]:
    """``(length, type)`` of the header at ``buf[pos:pos+8]``.

    Raises ProtocolError for a truncated header, an oversized length or non-zero
    flags; the type is returned as an int (unknown types are the dispatcher's business).
    """
    if pos < 0 or len(buf) - pos < HEADER.size:
        raise ProtocolError(f"truncated header: {len(buf) - pos} bytes at {pos}, a header is {HEADER.size}")
    length, msg_type, flags = HEADER.unpack_from(buf, pos)
    if length > max_frame:
        raise ProtocolError(f"frame of type {msg_type} announces {length} bytes, "
                            f"more than the limit {max_frame}")
    if flags:
        raise ProtocolError(f"frame of type {msg_type} has flags {flags:#x}; version {VERSION} "
                            "defines none")
    return length, msg_type


#: ``split_frames(body, limit, max_frame) -> [(type, start, end), ...]``: the frames of a
#: BATCH or BATCH_REPLY body, every header checked before anything is returned
#: (ProtocolError for a truncated frame, an oversized one, non-zero flags, or
#: more than ``limit`` frames).  A compiled kernel (``ext/wire.pyx``; twin
#: ``poolsvc/_pure/wire.py``), shared by both sides.
split_frames = core.split_frames


def iter_frames(body: bytes | memoryview, limit: int, max_frame: int) -> Iterator[tuple[int, memoryview]]:
    """The ``(type, body)`` of each complete frame in a BATCH or BATCH_REPLY body.

    Raises ProtocolError for a truncated frame, an oversized one, or more than
    ``limit`` frames (before yielding anything).
    """
    view = memoryview(body)
    for msg_type, start, end in split_frames(view, limit, max_frame):
        yield msg_type, view[start:end]


# ---------------------------------------------------------------------------------------
# Errors on the wire
# ---------------------------------------------------------------------------------------
def error_body(exc: BaseException) -> bytes:
    """The ERROR body for an exception (unknown exceptions become INTERNAL)."""
    code = code_of(exc)
    tee_code = getattr(exc, "tee_code", errors.TEE_ERROR_GENERIC) & 0xFFFFFFFF
    extra = 0
    if isinstance(exc, errors.ShortBuffer):
        extra = exc.needed
    elif isinstance(exc, errors.TeeError):
        extra = exc.origin
    text = str(exc) if isinstance(exc, PoolsvcError) else f"{type(exc).__name__}: {exc}"
    message = text.encode("utf-8", "replace")[:MAX_MESSAGE]
    return ERROR.pack(code, 0, tee_code, extra & 0xFFFFFFFFFFFFFFFF) + message


def error_from_body(body: bytes | memoryview) -> PoolsvcError:
    """The exception an ERROR body stands for (ProtocolError if the body is malformed)."""
    if len(body) < ERROR.size:
        return ProtocolError(f"ERROR reply of {len(body)} bytes is shorter than {ERROR.size}")
    code, _, tee_code, extra = ERROR.unpack_from(body)
    message = bytes(body[ERROR.size:]).decode("utf-8", "replace")
    try:
        cls = _CLASS_OF[ErrorCode(code)]
    except ValueError:
        return ProtocolError(f"unknown error code {code} ({message})")
    if cls is errors.ShortBuffer:
        return errors.ShortBuffer(message, extra)
    if cls is errors.TeeError:
        return errors.TeeError(message, tee_code, extra)
    return cls(message)


def encode_name(name: str) -> bytes:
    """A name as UTF-8, refused (BadParameters) when longer than MAX_NAME bytes."""
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME:
        raise errors.BadParameters(f"name {name!r} is {len(raw)} bytes of UTF-8, more than {MAX_NAME}")
    return raw


def decode_name(raw: bytes | memoryview) -> str:
    """A name from the wire (ProtocolError when too long or not UTF-8)."""
    if len(raw) > MAX_NAME:
        raise ProtocolError(f"name of {len(raw)} bytes is longer than {MAX_NAME}")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"name {bytes(raw)!r} is not UTF-8") from exc


def type_name(msg_type: int) -> str:
    """``MsgType`` name of a type number, or ``"type-N"`` when unknown."""
    try:
        return MsgType(msg_type).name
    except ValueError:
        return f"type-{msg_type}"
