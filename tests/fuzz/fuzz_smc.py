#!/usr/bin/env python3
"""Coverage-guided fuzzing of the secure world's message entry (``ext/smc_entry.pyx``:
``SmcEntry``, against its twin in ``poolsvc/_pure/smc.py``) and of the message
decoder ``poolsvc/tee/msg.py`` on the same bytes.

Run: ``python tests/fuzz/fuzz_smc.py [libFuzzer flags] [corpus dirs]``
(docs/fuzzing.md).  Seed corpus: ``tests/fuzz/corpus/smc/``.

Input layout (little-endian), :func:`encode` writes it::

    u64 arg_pa, u8 caps, u8 mode, u8 cookies, u8 nonsecure, then the memory image

The image (up to 16 pages) is mapped from MEMORY_BASE in each backend's
FrameTable: the static carve-out is its first page, dynamic RAM the other
15 (pages past the image's end are unmapped; a short last page reads as
zeros).  ``mode`` bit 0: ``arg_pa`` is an offset into the image (else a
raw PA).  ``cookies`` bit 0: cookie 1 registered; bit 1: cookie 2 registered with a
call in flight; bit 2: cookie 3 is RPC memory.  ``nonsecure`` (mod 4) picks
the non-secure ranges.

Each input checks, compiled against pure (same result, or the same error
class and message): ``fetch1``, then ``register1`` / ``unregister1`` for
the command fetched; and a bound entry's ``entry(arg_pa)``: what it
raises, the cookie table after, the refusal counts, the call counter, the
calls to the generic path and to ``call_done``, and the memory after (the
answer written).  ``msg.unpack`` of the 64 bytes at ``arg_pa`` must give
the command and parameter the entry fetched.  REGISTER messages of more
than MAX_WALK pages (but within the 2**20-page limit) are skipped: a list
page may point to itself, and such walks only cost time.
"""
from __future__ import annotations

import struct

import fuzzlib
from fuzzlib import PAGE, Finding, agree, outcome

with fuzzlib.instrumented():
    from poolsvc import _core as compiled
    from poolsvc import _pure as pure
    from poolsvc.tee import msg

HEAD = struct.Struct("<QBBBB")
ARG1 = struct.Struct("<8I4Q")
MEMORY_BASE = 0x40000000
MEMORY_PAGES = 16
STATIC = (MEMORY_BASE, PAGE)
DYNAMIC = (MEMORY_BASE + PAGE, (MEMORY_PAGES - 1) * PAGE)
NONSECURE = [
    [(MEMORY_BASE, MEMORY_PAGES * PAGE), (0x20000000, 0x10000000)],
    [(MEMORY_BASE, 4 * PAGE)],
    [],
    [(0, 1 << 64)],
]
MAX_WALK = 4096
CAP_DYNAMIC_SHM = 1 << 2
CMD_REGISTER, CMD_UNREGISTER = 4, 5
ATTR_REGISTER, ATTR_UNREGISTER = 0x20A, 0x5


def encode(arg_pa: int, image: bytes, caps: int = CAP_DYNAMIC_SHM, relative: bool = True,
           cookies: int = 7, nonsecure: int = 0) -> bytes:
    """One input (the layout of the module docstring)."""
    return HEAD.pack(arg_pa, caps, int(relative), cookies, nonsecure) + image


def decode(data: bytes) -> tuple[int, int, int, int, bytes]:
    """``(arg_pa, caps, cookies, nonsecure index, image)`` of an input."""
    head = data[:HEAD.size]
    raw_pa, caps, mode, cookies, nonsecure = HEAD.unpack(head + bytes(HEAD.size - len(head)))
    arg_pa = MEMORY_BASE + raw_pa % (MEMORY_PAGES * PAGE) if mode & 1 else raw_pa
    return arg_pa, caps, cookies, nonsecure % len(NONSECURE), data[HEAD.size:HEAD.size + MEMORY_PAGES * PAGE]


class _World:
    """One backend's secure world around the image: table, entry, cookie tables, recorders."""

    def __init__(self, mod, image: bytes, cookies: int, nonsecure: int) -> None:
        self.mod = mod
        npages = -(-len(image) // PAGE)
        self.storage = bytearray(image + bytes(npages * PAGE - len(image)))
        self.table = mod.FrameTable([(MEMORY_BASE, MEMORY_PAGES * PAGE)])
        if npages:
            self.table.attach(1, self.storage)
            self.table.map_range(MEMORY_BASE, npages, 1, 0)
        self.entry = mod.SmcEntry(self.table, NONSECURE[nonsecure], STATIC, DYNAMIC)
        self.registered: dict = {}
        if cookies & 1:
            self.registered[1] = mod.RegisteredShm(1, [MEMORY_BASE], 0, PAGE)
        if cookies & 2:
            self.registered[2] = mod.RegisteredShm(2, [MEMORY_BASE], 16, PAGE - 16, 1)
        self.rpc_shms: dict = {3: object()} if cookies & 4 else {}
        self.log: list = []
        self.errors: dict = {}

    # the bound world's callbacks
    def generic(self, arg_pa) -> None:
        self.log.append(("generic", arg_pa))

    def call_done(self) -> None:
        self.log.append(("call_done",))

    def state(self) -> tuple:
        shms = {c: (list(map(int, s.pages)), s.offset, s.size, s.inflight) for c, s in self.registered.items()}
        return ("ok", (shms, sorted(self.rpc_shms), self.errors, self.entry.calls, self.log, bytes(self.storage)))


def _walk_pages(words: tuple) -> int:
    """Pages a REGISTER message of these ARG1 words would walk (0 for none)."""
    buf_ptr, size = words[9], words[10]
    return (size + (buf_ptr & 0xFFF) - 1) // PAGE + 1 if size else 0


def test_one_input(data: bytes) -> None:
    arg_pa, caps, cookies, nonsecure, image = decode(data)
    at = arg_pa - MEMORY_BASE
    mapped = image + bytes(-len(image) % PAGE)         # the mapped pages, as the tables hold them
    message = mapped[at:at + ARG1.size] if 0 <= at else b""
    if len(message) == ARG1.size:
        words = ARG1.unpack(message)
        if words[0] == CMD_REGISTER and MAX_WALK < _walk_pages(words) <= 1 << 20:
            return
    worlds = [_World(mod, image, cookies, nonsecure) for mod in (compiled, pure)]
    cmd = agree("fetch1", *(outcome(f"{w.mod.__name__} fetch1", w.entry.fetch1, arg_pa) for w in worlds))
    if cmd == ("ok", CMD_REGISTER):
        agree("register1", *(outcome(f"{w.mod.__name__} register1", w.entry.register1, caps, w.registered,
                                     w.rpc_shms) for w in worlds))
    elif cmd == ("ok", CMD_UNREGISTER):
        agree("unregister1", *(outcome(f"{w.mod.__name__} unregister1", w.entry.unregister1, w.registered)
                               for w in worlds))
    if cmd[0] == "ok" and cmd[1] in (CMD_REGISTER, CMD_UNREGISTER):
        _check_msg_decoder(message, cmd[1])

    # the same message through a bound entry (call_with_arg), on fresh worlds
    worlds = [_World(mod, image, cookies, nonsecure) for mod in (compiled, pure)]
    for w in worlds:
        w.entry.bind(w.registered, w.rpc_shms, w.generic, w)
        w.entry.caps = caps
        w.entry.rpc = w
    agree("entry(arg_pa)", *(outcome(f"{w.mod.__name__} entry(arg_pa)", w.entry, arg_pa) for w in worlds))
    agree("entry(arg_pa): the world after", *(w.state() for w in worlds))


def _check_msg_decoder(message: bytes, cmd: int) -> None:
    """``msg.unpack`` of a message the entry fetched: the same command and parameter."""
    decoded = outcome("msg.unpack", msg.unpack, message)
    words = ARG1.unpack(message)
    if decoded[0] != "ok":
        raise Finding(f"msg.unpack refuses a message the entry fetched (cmd {cmd}): {decoded}")
    arg = msg.unpack(message)
    param = arg.params[0] if len(arg.params) == 1 else None
    if arg.cmd != cmd or param is None or (param.attr, param.a, param.b, param.c) != words[8:]:
        raise Finding(f"msg.unpack gives {arg} for the words {words}")


def seeds() -> dict[str, bytes]:
    """REGISTER / UNREGISTER messages made with the project's encoders (``msg.MsgArg``,
    ``pagelist_build``): valid ones, and each refusal the entry answers."""
    list_page = compiled.pagelist_build([0x20000000 + 2 * i * PAGE for i in range(3)], 0, MEMORY_BASE + 2 * PAGE)

    def message(cmd: int, attr: int, a: int, b: int, c: int) -> bytes:
        return msg.MsgArg(cmd=cmd, params=[msg.MsgParam(attr, a, b, c)]).pack()

    def image(first: bytes) -> bytes:
        """A message in the first dynamic page, the list page after it (trailing zeros implied)."""
        return (bytes(PAGE) + first + bytes(PAGE - len(first)) + list_page).rstrip(b"\0")

    register = message(CMD_REGISTER, ATTR_REGISTER, MEMORY_BASE + 2 * PAGE + 0x10, 3 * PAGE - 0x20, 9)
    in_use = message(CMD_REGISTER, ATTR_REGISTER, MEMORY_BASE + 2 * PAGE, PAGE, 3)
    return {
        "register": encode(PAGE, image(register)),
        "register-no-dynamic-shm": encode(PAGE, image(register), caps=0),
        "register-cookie-in-use": encode(PAGE, image(in_use)),
        "register-secure-list": encode(PAGE, image(register), nonsecure=1),
        "unregister": encode(PAGE, image(message(CMD_UNREGISTER, ATTR_UNREGISTER, 0, 0, 1))),
        "unregister-busy": encode(PAGE, image(message(CMD_UNREGISTER, ATTR_UNREGISTER, 0, 0, 2))),
        "static-window": encode(8, bytes(8) + message(CMD_UNREGISTER, ATTR_UNREGISTER, 0, 0, 1)),
        "generic": encode(PAGE, image(msg.MsgArg(cmd=0, params=[msg.MsgParam(1, 2, 3, 4)] * 2).pack())),
    }


if __name__ == "__main__":
    fuzzlib.run(test_one_input)
