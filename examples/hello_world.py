#!/usr/bin/env python3
"""OP-TEE's "hello world" client, written with the GlobalPlatform TEEC names.

The same program runs against the embedded System (the default) and against a
pool service daemon (``POOLSVC_SOCKET=/path/to/sock python hello_world.py``,
or the socket path as the first argument), as a C client runs against
whichever TEE its libteec reaches.  It opens a session with the hello-world
trusted app, asks it to increment 42, and prints the result.
"""
from __future__ import annotations

import sys

from poolsvc.teec import (
    TEEC_LOGIN_PUBLIC,
    TEEC_NONE,
    TEEC_PARAM_TYPES,
    TEEC_SUCCESS,
    TEEC_UUID,
    TEEC_VALUE_INOUT,
    TEEC_CloseSession,
    TEEC_Context,
    TEEC_FinalizeContext,
    TEEC_InitializeContext,
    TEEC_InvokeCommand,
    TEEC_OpenSession,
    TEEC_Operation,
    TEEC_Session,
    origin_name,
    result_name,
)

TA_HELLO_WORLD_UUID = TEEC_UUID(0x8AAAF200, 0x2450, 0x11E4, bytes([0xAB, 0xE2, 0x00, 0x02, 0xA5, 0xD5, 0xC5, 0x1B]))
TA_HELLO_WORLD_CMD_INC_VALUE = 0


def errx(what: str, res: int, origin: int | None = None) -> None:
    where = f" (origin {origin_name(origin)})" if origin is not None else ""
    sys.exit(f"{what} failed with {result_name(res)}{where}")


def main() -> None:
    ctx = TEEC_Context()
    sess = TEEC_Session()
    res = TEEC_InitializeContext(sys.argv[1] if len(sys.argv) > 1 else None, ctx)
    if res != TEEC_SUCCESS:
        errx("TEEC_InitializeContext", res)

    res, err_origin = TEEC_OpenSession(ctx, sess, TA_HELLO_WORLD_UUID, TEEC_LOGIN_PUBLIC, None, None)
    if res != TEEC_SUCCESS:
        errx("TEEC_OpenSession", res, err_origin)

    op = TEEC_Operation()
    op.paramTypes = TEEC_PARAM_TYPES(TEEC_VALUE_INOUT, TEEC_NONE, TEEC_NONE, TEEC_NONE)
    op.params[0].value.a = 42

    print(f"Invoking TA to increment {op.params[0].value.a}")
    res, err_origin = TEEC_InvokeCommand(sess, TA_HELLO_WORLD_CMD_INC_VALUE, op)
    if res != TEEC_SUCCESS:
        errx("TEEC_InvokeCommand", res, err_origin)
    print(f"TA incremented value to {op.params[0].value.a}")

    TEEC_CloseSession(sess)
    TEEC_FinalizeContext(ctx)


if __name__ == "__main__":
    main()
