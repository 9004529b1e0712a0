"""Names of TEE return codes and origins, for messages a reader can act on.

:class:`TeeResult` lists the GlobalPlatform TEE return codes (TEE Client API
and TEE Internal Core API, ``TEE_SUCCESS`` and ``TEE_ERROR_*``; OP-TEE answers
with these values).  Origins are :class:`poolsvc.constants.Origin`
(``TEEC_ORIGIN_*``).  :func:`describe` names a (code, origin) pair;
:func:`annotate` rewrites a message's ``0xffff0008 (origin 3)`` into
``TEE_ERROR_ITEM_NOT_FOUND (0xffff0008) from TEEC_ORIGIN_TEE (3)``.

This module imports only :mod:`poolsvc.constants`, so :mod:`poolsvc.errors`
can use it at import time.
"""
from __future__ import annotations

import re
from enum import IntEnum

from .constants import Origin


class TeeResult(IntEnum):
    """GlobalPlatform ``TEE_Result`` values (u32)."""

    TEE_SUCCESS = 0x00000000
    TEE_ERROR_CORRUPT_OBJECT = 0xF0100001
    TEE_ERROR_CORRUPT_OBJECT_2 = 0xF0100002
    TEE_ERROR_STORAGE_NOT_AVAILABLE = 0xF0100003
    TEE_ERROR_STORAGE_NOT_AVAILABLE_2 = 0xF0100004
    TEE_ERROR_GENERIC = 0xFFFF0000
    TEE_ERROR_ACCESS_DENIED = 0xFFFF0001
    TEE_ERROR_CANCEL = 0xFFFF0002
    TEE_ERROR_ACCESS_CONFLICT = 0xFFFF0003
    TEE_ERROR_EXCESS_DATA = 0xFFFF0004
    TEE_ERROR_BAD_FORMAT = 0xFFFF0005
    TEE_ERROR_BAD_PARAMETERS = 0xFFFF0006
    TEE_ERROR_BAD_STATE = 0xFFFF0007
    TEE_ERROR_ITEM_NOT_FOUND = 0xFFFF0008
    TEE_ERROR_NOT_IMPLEMENTED = 0xFFFF0009
    TEE_ERROR_NOT_SUPPORTED = 0xFFFF000A
    TEE_ERROR_NO_DATA = 0xFFFF000B
    TEE_ERROR_OUT_OF_MEMORY = 0xFFFF000C
    TEE_ERROR_BUSY = 0xFFFF000D
    TEE_ERROR_COMMUNICATION = 0xFFFF000E
    TEE_ERROR_SECURITY = 0xFFFF000F
    TEE_ERROR_SHORT_BUFFER = 0xFFFF0010
    TEE_ERROR_EXTERNAL_CANCEL = 0xFFFF0011
    TEE_ERROR_OVERFLOW = 0xFFFF300F
    TEE_ERROR_TARGET_DEAD = 0xFFFF3024
    TEE_ERROR_STORAGE_NO_SPACE = 0xFFFF3041
    TEE_ERROR_MAC_INVALID = 0xFFFF3071
    TEE_ERROR_SIGNATURE_INVALID = 0xFFFF3072
    TEE_ERROR_TIME_NOT_SET = 0xFFFF5000
    TEE_ERROR_TIME_NEEDS_RESET = 0xFFFF5001


def code_name(code: int) -> str:
    """``TEE_ERROR_ITEM_NOT_FOUND`` for 0xFFFF0008; ``unknown TEE code 0x...`` otherwise."""
    try:
        return TeeResult(code & 0xFFFFFFFF).name
    except ValueError:
        return f"unknown TEE code {code & 0xFFFFFFFF:#x}"


def origin_name(origin: int) -> str:
    """``TEEC_ORIGIN_TEE`` for 3; ``unknown origin N`` otherwise."""
    try:
        return f"TEEC_ORIGIN_{Origin(origin).name}"
    except ValueError:
        return f"unknown origin {origin}"


def describe(code: int, origin: int) -> str:
    """``TEE_ERROR_ITEM_NOT_FOUND (0xffff0008) from TEEC_ORIGIN_TEE (3)``."""
    code_text, origin_text = code_name(code), origin_name(origin)
    if not code_text.startswith("unknown"):
        code_text += f" ({code & 0xFFFFFFFF:#x})"
    if not origin_text.startswith("unknown"):
        origin_text += f" ({origin})"
    return f"{code_text} from {origin_text}"


_NUMBERS = re.compile(r"(0x[0-9a-fA-F]+) \(origin (\d+)\)")


def annotate(message: str, code: int, origin: int) -> str:
    """``message`` with its ``<code> (origin <n>)`` named by :func:`describe`.

    A message that does not carry the code that way gets the description
    appended after a colon; one that already names the code is left alone.
    """
    match = _NUMBERS.search(message)
    if match and int(match.group(1), 16) == code & 0xFFFFFFFF and int(match.group(2)) == origin:
        return message[:match.start()] + describe(code, origin) + message[match.end():]
    if code_name(code) in message:
        return message
    return f"{message}: {describe(code, origin)}"
