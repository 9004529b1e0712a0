#!/usr/bin/env python3
"""Coverage-guided fuzzing of the message decoder ``poolsvc/tee/msg.py``
(``struct optee_msg_arg``: ``unpack``, ``peek_num_params``).

Run: ``python tests/fuzz/fuzz_msg.py [libFuzzer flags] [corpus dirs]``
(docs/fuzzing.md).  Seed corpus: ``tests/fuzz/corpus/msg/``.

Input: the first byte picks how the message is passed (mod 4: bytes,
bytearray, a memoryview of format ``I``, a strided memoryview of every
other byte of the doubled message); the rest is the message.

The decoder has no compiled twin; each input checks that it raises nothing
but ProtocolError, that every way of passing the same bytes decodes the
same, that ``peek_num_params`` agrees with ``unpack``, and the round trip:
``unpack(data).pack()`` is the first ``arg_size(num_params)`` bytes of the
data.
"""
from __future__ import annotations

import fuzzlib
from fuzzlib import Finding, agree, outcome

with fuzzlib.instrumented():
    from poolsvc.tee import msg


def _passed(data: bytes, how: int):
    if how == 1:
        return bytearray(data)
    if how == 2 and len(data) % 4 == 0:
        return memoryview(data).cast("I")
    if how == 3:
        return memoryview(bytes(b for pair in zip(data, data) for b in pair))[::2]
    return data


def test_one_input(data: bytes) -> None:
    how, message = (data[0] % 4, data[1:]) if data else (0, b"")
    decoded = agree("unpack of the bytes and of the passed view",
                    outcome("unpack", msg.unpack, _passed(message, how)),
                    outcome("unpack", msg.unpack, message))
    num = outcome("peek_num_params", msg.peek_num_params, _passed(message, how))
    if decoded[0] != "ok":
        if decoded[1] != "ProtocolError":
            raise Finding(f"unpack raised {decoded[1]}, not ProtocolError: {decoded[2]}")
        return
    arg = msg.unpack(message)
    if num != ("ok", len(arg.params)):
        raise Finding(f"peek_num_params {num} but unpack found {len(arg.params)} parameters")
    if arg.pack() != message[:msg.arg_size(len(arg.params))] or arg.size != msg.arg_size(len(arg.params)):
        raise Finding(f"{arg} packs back to other bytes than it was decoded from")


def seeds() -> dict[str, bytes]:
    """Messages made with the project's encoder (``MsgArg.pack``)."""
    register = msg.MsgArg(cmd=4, params=[msg.MsgParam(0x20A, 0x40001010, 0x2FE0, 9)])
    invoke = msg.MsgArg(cmd=1, func=7, session=3, params=[msg.MsgParam(1, 2, 3, 4), msg.MsgParam(0xB, 0, 64, 5),
                                                           msg.MsgParam(), msg.MsgParam(2, 1 << 63, 0, 0)])
    return {
        "header-only": b"\0" + msg.MsgArg(cmd=0).pack(),
        "register": b"\1" + register.pack(),
        "invoke": b"\2" + invoke.pack(),
        "strided": b"\3" + register.pack(),
        "trailing": b"\0" + invoke.pack() + b"\xff" * 7,
    }


if __name__ == "__main__":
    fuzzlib.run(test_one_input)
