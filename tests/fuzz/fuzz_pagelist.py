#!/usr/bin/env python3
"""Coverage-guided fuzzing of the OP-TEE page-list kernels (``ext/pagelist.pyx``
against its twin ``poolsvc/_pure/pagelist.py``).

Run: ``python tests/fuzz/fuzz_pagelist.py [libFuzzer flags] [corpus dirs]``
(docs/fuzzing.md).  Seed corpus: ``tests/fuzz/corpus/pagelist/``.

Input layout (little-endian), :func:`encode` writes it::

    u64 buf_ptr, u64 size, u16 max_pages, u8 mode, u8 reserved
    nranges x (u64 base, u64 size)      nranges = (mode >> 1) & 3
    memory image                        the rest: up to 8 pages from MEMORY_BASE

``mode`` bit 0: pass the ranges as ``nonsecure`` (else None); bit 3: pass
``max_segment`` (``size``) to ``pagelist_segments``; bit 4: pass the ranges
as lists (the compiled kernel's slow path) instead of tuples; bit 6: pass
``max_pages`` negative (``-1 - max_pages``); bit 7: beyond 64 bits
(``max_pages + 2**64``; only when ``size`` is at most 4096 pages).

Each input checks, compiled against pure (same result or same error class
and message; any exception that is not a PoolsvcError is a finding):
``pagelist_parse`` over the image (and the order of the list pages it
reads), ``pagelist_parse_frames`` over each backend's FrameTable holding the
image (and its agreement with ``pagelist_parse``), ``pagelist_segments`` and
``pagelist_build`` / ``pagelist_build_into`` of the image's first words, and
the round trip: a list built by ``pagelist_build`` parses back to its pages.
"""
from __future__ import annotations

import struct

import fuzzlib
from fuzzlib import PAGE, Finding, agree, outcome

with fuzzlib.instrumented():
    import numpy as np

    from poolsvc import _core as compiled
    from poolsvc import _pure as pure
    from poolsvc.errors import AddressError

HEAD = struct.Struct("<QQHBB")
RANGE = struct.Struct("<QQ")
MEMORY_BASE = 0x80000000
MEMORY_PAGES = 8
#: ``max_pages`` is taken modulo this: every walk stays short (a list may loop).
MAX_PAGES_CAP = 4097
#: Words of the image given to ``pagelist_segments`` and ``pagelist_build``.
MAX_ENTRIES = 1100


def encode(buf_ptr: int, size: int, image: bytes, max_pages: int = 1 << 12,
           nonsecure: list[tuple[int, int]] | None = None, max_segment: bool = False) -> bytes:
    """One input (the layout of the module docstring)."""
    ranges = nonsecure or []
    mode = (1 if nonsecure is not None else 0) | (len(ranges) << 1) | (8 if max_segment else 0)
    return (HEAD.pack(buf_ptr, size, max_pages, mode, 0)
            + b"".join(RANGE.pack(b, s) for b, s in ranges) + image)


def decode(data: bytes) -> tuple[int, int, int, int, list[tuple[int, int]] | None, bytes]:
    """``(buf_ptr, size, max_pages, mode, nonsecure, image)`` of an input (zero-padded)."""
    data = data + bytes(max(0, HEAD.size - len(data)))
    buf_ptr, size, max_pages, mode, _ = HEAD.unpack_from(data)
    pos = HEAD.size
    ranges = []
    for _ in range((mode >> 1) & 3):
        chunk = data[pos:pos + RANGE.size]
        ranges.append(RANGE.unpack(chunk + bytes(RANGE.size - len(chunk))))
        pos += RANGE.size
    image = data[pos:pos + MEMORY_PAGES * PAGE]
    max_pages %= MAX_PAGES_CAP
    if mode & 0x40:
        max_pages = -1 - max_pages
    elif mode & 0x80 and size <= MAX_PAGES_CAP * PAGE:
        max_pages += 1 << 64
    nonsecure = None
    if mode & 1:
        nonsecure = [list(r) for r in ranges] if mode & 0x10 else ranges
    return buf_ptr, size, max_pages, mode, nonsecure, image


def _pages_of(image: bytes) -> dict[int, bytes]:
    """The image's whole pages by PA (a short last page is zero-padded)."""
    padded = image + bytes(-len(image) % PAGE)
    return {MEMORY_BASE + k * PAGE: padded[k * PAGE:(k + 1) * PAGE] for k in range(len(padded) // PAGE)}


def _reader(pages: dict[int, bytes], log: list[int]):
    def read_page(pa: int) -> bytes:
        log.append(pa)
        page = pages.get(pa)
        if page is None:
            raise AddressError(f"no list page at {pa:#x}")
        return page
    return read_page


def _table(mod, pages: dict[int, bytes]):
    """A FrameTable of backend ``mod`` over the memory window holding ``pages``."""
    table = mod.FrameTable([(MEMORY_BASE, MEMORY_PAGES * PAGE)])
    table.attach(1, bytearray(b"".join(pages.values()) or bytes(PAGE)))
    if pages:
        table.map_range(MEMORY_BASE, len(pages), 1, 0)
    return table


def _check_parse(buf_ptr, size, max_pages, nonsecure, image) -> None:
    pages = _pages_of(image)
    logs: dict[str, list[int]] = {"compiled": [], "pure": []}
    parsed = agree("pagelist_parse",
                   outcome("compiled pagelist_parse", compiled.pagelist_parse, buf_ptr, size,
                           _reader(pages, logs["compiled"]), nonsecure, max_pages),
                   outcome("pure pagelist_parse", pure.pagelist_parse, buf_ptr, size,
                           _reader(pages, logs["pure"]), nonsecure, max_pages))
    agree("pagelist_parse: list pages read", ("ok", logs["compiled"]), ("ok", logs["pure"]))
    framed = agree("pagelist_parse_frames",
                   outcome("compiled pagelist_parse_frames", compiled.pagelist_parse_frames, buf_ptr,
                           size, _table(compiled, pages), nonsecure, max_pages),
                   outcome("pure pagelist_parse_frames", pure.pagelist_parse_frames, buf_ptr, size,
                           _table(pure, pages), nonsecure, max_pages))
    # the same walk through a table: the same pages, or an error of the same class
    # (an unreadable list page is the callback's AddressError in one, the table's in the other)
    if framed[:2] != parsed[:2]:
        raise Finding(f"pagelist_parse_frames {framed[:2]} but pagelist_parse {parsed[:2]}")


def _check_build(buf_ptr, size, max_pages, mode, image) -> None:
    words = np.frombuffer(image[:len(image) // 8 * 8], dtype="<u8")
    entries = words[:1 + abs(max_pages) % MAX_ENTRIES].astype(np.uint64)
    max_segment = size if mode & 8 else None
    agree("pagelist_segments",
          outcome("compiled pagelist_segments", compiled.pagelist_segments, entries, max_segment),
          outcome("pure pagelist_segments", pure.pagelist_segments, entries, max_segment))
    offset, list_pa = size & 0x1FFF, buf_ptr
    built = agree("pagelist_build",
                  outcome("compiled pagelist_build", compiled.pagelist_build, entries, offset, list_pa),
                  outcome("pure pagelist_build", pure.pagelist_build, entries, offset, list_pa))
    outs = {"compiled": bytearray(len(image)), "pure": bytearray(len(image))}
    agree("pagelist_build_into",
          outcome("compiled pagelist_build_into", compiled.pagelist_build_into, entries, offset, list_pa,
                  outs["compiled"]),
          outcome("pure pagelist_build_into", pure.pagelist_build_into, entries, offset, list_pa,
                  outs["pure"]))
    agree("pagelist_build_into: bytes written", ("ok", outs["compiled"]), ("ok", outs["pure"]))
    if built[0] != "ok":
        return
    data = built[1]
    n = len(entries)
    lists = {list_pa + k * PAGE: data[k * PAGE:(k + 1) * PAGE] for k in range(len(data) // PAGE)}
    for mod in (compiled, pure):
        back = outcome(f"{mod.__name__} round trip", mod.pagelist_parse, list_pa | offset,
                       n * PAGE - offset, _reader(lists, []), None, n)
        if back != ("ok", ("array", "uint64", entries.tolist())):
            raise Finding(f"{mod.__name__}: a built list of {n} pages at {list_pa:#x} parses back "
                          f"as {back!r:.300}")


def test_one_input(data: bytes) -> None:
    buf_ptr, size, max_pages, mode, nonsecure, image = decode(data)
    _check_parse(buf_ptr, size, max_pages, nonsecure, image)
    _check_build(buf_ptr, size, max_pages, mode, image)


def seeds() -> dict[str, bytes]:
    """Valid inputs made with the project's own encoder (``pagelist_build``)."""
    out = {}
    for name, npages, offset, size_cut, nonsecure in [
        ("one-page", 1, 0, 0, None),
        ("offset", 3, 0x123, 0, [(MEMORY_BASE, MEMORY_PAGES * PAGE), (0x20000000, 0x100000)]),
        ("full-list-page", 511, 0, 0, None),
        ("two-list-pages", 700, 8, 1, [(MEMORY_BASE, MEMORY_PAGES * PAGE), (0x20000000, 0x1000000)]),
    ]:
        buffer_pages = [0x20000000 + 2 * i * PAGE for i in range(npages)]
        # a short last page reads as zeros: the seed keeps the list up to its last non-zero byte
        image = compiled.pagelist_build(buffer_pages, offset, MEMORY_BASE).rstrip(b"\0")
        size = npages * PAGE - offset - size_cut
        out[name] = encode(MEMORY_BASE | offset, size, image, max_pages=npages, nonsecure=nonsecure,
                           max_segment=npages % 2 == 1)
    return out


if __name__ == "__main__":
    fuzzlib.run(test_one_input)
