"""``struct optee_msg_arg`` and its parameters: packing and unpacking.

Layout (little-endian, facts of OP-TEE's message ABI):
  header, 32 bytes: u32 cmd, func, session, cancel_id, pad, ret, ret_origin,
  num_params; then ``num_params`` parameters of 32 bytes: u64 attr and three
  u64 words, read as ``tmem`` (buf_ptr, size, shm_ref), ``rmem`` (offs, size,
  shm_ref) or ``value`` (a, b, c) according to ``attr & 0xff``.

:func:`unpack` never trusts its input: a short buffer, or a ``num_params``
that does not match the bytes present, is a ``ProtocolError``.

:func:`uuid_to_value` / :func:`uuid_from_value` lay a UUID out in the two
words of a META value (OPEN_SESSION's TA and client identities).

``ARG1`` packs and unpacks a whole one-parameter message (64 bytes) as 12
words, ``RET`` the ``ret``/``ret_origin`` pair.  The driver's hot path
(REGISTER_SHM, UNREGISTER_SHM) does neither in Python: both ends are the
compiled ``core.SmcDriver`` / ``core.SmcEntry`` (``ext/smc_driver.pyx and ext/smc_entry.pyx``).
"""
from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass, field

from ..constants import ATTR_TYPE_MASK, MSG_ARG_HEADER_SIZE, MSG_PARAM_SIZE
from ..errors import ProtocolError

_HEADER = struct.Struct("<8I")

#: Largest number of parameters a message may carry (bounds the parsing work).
#: The most parameters a message may carry, OPTEE_MSG_MAX_NUM_PARAMS: as many as fit in
#: one 4 KiB page with the header (32 + 127 * 32 = 4096), the bound OP-TEE's
#: ``std_entry_with_parg`` / ``get_msg_arg`` and the Linux driver's page-sized message
#: buffers put on ``num_params``.
MAX_PARAMS = 127
#: ``OPTEE_SMC_RETURN_OK``: the message was processed (its answer is in ``ret``).
SMC_RETURN_OK = 0x0
#: ``OPTEE_SMC_RETURN_EBADCMD``: no such command; ``ret`` / ``ret_origin`` left unwritten.
SMC_RETURN_EBADCMD = 0x5
_U64 = (1 << 64) - 1
_LAYOUTS: dict[int, struct.Struct] = {}


def _layout(num_params: int) -> struct.Struct:
    """The struct of a whole message with ``num_params`` parameters (cached)."""
    layout = _LAYOUTS.get(num_params)
    if layout is None:
        layout = _LAYOUTS[num_params] = struct.Struct("<8I" + "4Q" * num_params)
    return layout


@dataclass
class MsgParam:
    """One parameter: ``attr`` and its three u64 words ``a``, ``b``, ``c``.

    For TMEM: a=buf_ptr, b=size, c=shm_ref. RMEM: a=offs, b=size, c=shm_ref.
    VALUE: a, b, c.
    """

    attr: int = 0
    a: int = 0
    b: int = 0
    c: int = 0

    @property
    def type(self) -> int:
        return self.attr & ATTR_TYPE_MASK


@dataclass
class MsgArg:
    """A decoded ``struct optee_msg_arg``."""

    cmd: int = 0
    func: int = 0
    session: int = 0
    cancel_id: int = 0
    pad: int = 0
    ret: int = 0
    ret_origin: int = 0
    params: list[MsgParam] = field(default_factory=list)

    def pack(self) -> bytes:
        """The wire bytes (num_params taken from ``len(params)``)."""
        params = self.params
        words: list[int] = [self.cmd, self.func, self.session, self.cancel_id, self.pad,
                            self.ret, self.ret_origin, len(params)]
        for p in params:
            words += (p.attr & _U64, p.a & _U64, p.b & _U64, p.c & _U64)
        return _layout(len(params)).pack(*words)

    @property
    def size(self) -> int:
        return MSG_ARG_HEADER_SIZE + MSG_PARAM_SIZE * len(self.params)


#: A message with one parameter (header + 32 bytes), the shape of REGISTER_SHM and
#: UNREGISTER_SHM: ``ARG1.pack_into(buf, 0, cmd, func, session, cancel_id, pad, ret,
#: ret_origin, 1, attr, a, b, c)``; ``ARG1.unpack(data)`` gives those 12 words.
ARG1 = _layout(1)

#: ``ret`` and ``ret_origin`` (u32 fields 5 and 6 of the header), at ``RET_OFFSET``.
RET = struct.Struct("<II")
RET_OFFSET = 20


def arg_size(num_params: int) -> int:
    """Bytes of a message with ``num_params`` parameters (OPTEE_MSG_GET_ARG_SIZE)."""
    return MSG_ARG_HEADER_SIZE + MSG_PARAM_SIZE * num_params


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """``data`` as a flat byte sequence: ``len`` in bytes, readable by ``struct``.

    A memoryview of any format, shape or stride is accepted (a strided one is
    copied); an object without the buffer protocol is a ProtocolError.
    """
    if isinstance(data, (bytes, bytearray)):
        return data
    try:
        view = memoryview(data)
    except TypeError:
        raise ProtocolError(f"a message is bytes, not {type(data).__name__}") from None
    try:
        return view.cast("B")
    except TypeError:  # not C-contiguous
        return view.tobytes()


def peek_num_params(data: bytes | bytearray | memoryview) -> int:
    """``num_params`` from a header (ProtocolError if the header is short)."""
    data = _as_bytes(data)
    if len(data) < MSG_ARG_HEADER_SIZE:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than its 32-byte header")
    return _HEADER.unpack_from(data, 0)[7]


def unpack(data: bytes | bytearray | memoryview) -> MsgArg:
    """Decode a message; ProtocolError if it is short, too long or over MAX_PARAMS."""
    data = _as_bytes(data)
    num = peek_num_params(data)
    if num > MAX_PARAMS:
        raise ProtocolError(f"num_params {num} exceeds the limit {MAX_PARAMS}")
    if len(data) < arg_size(num):
        raise ProtocolError(f"message of {len(data)} bytes is too short for {num} parameters "
                            f"({arg_size(num)} bytes)")
    w = _layout(num).unpack_from(data, 0)
    params = [MsgParam(w[i], w[i + 1], w[i + 2], w[i + 3]) for i in range(8, 8 + 4 * num, 4)]
    return MsgArg(w[0], w[1], w[2], w[3], w[4], w[5], w[6], params)


def uuid_to_value(uuid: uuidlib.UUID | str) -> tuple[int, int]:
    """``(a, b)`` of a META value carrying ``uuid`` (RFC 4122 octets, as ``export_uuid``)."""
    u = uuid if isinstance(uuid, uuidlib.UUID) else uuidlib.UUID(str(uuid))
    octets = u.bytes
    return int.from_bytes(octets[:8], "little"), int.from_bytes(octets[8:], "little")


def uuid_from_value(a: int, b: int) -> uuidlib.UUID:
    """The UUID whose octets are the little-endian bytes of ``a`` then ``b``."""
    return uuidlib.UUID(bytes=(a & _U64).to_bytes(8, "little") + (b & _U64).to_bytes(8, "little"))
