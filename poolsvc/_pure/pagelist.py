"""Plain-Python reference of the compiled page-list kernels (``ext/pagelist.pyx``).

Owns: building an OP-TEE non-contiguous page list (as Linux's
``optee_fill_pages_list`` writes it), parsing one as the secure side does
(OP-TEE's ``msg_param_mobj_from_noncontig``; from a ``read_page`` callback or
straight from a ``FrameTable``), and merging a page array into
contiguous segments (the scatterlist rules).  Same checks, same order, same
error types as the compiled twin; ``docs/core.md`` is the contract.

Format: list pages of 4096 bytes, each 511 little-endian u64 page addresses
then a u64 ``next`` (the PA of the following list page).

Concurrency: pure functions; no shared state.
"""
from __future__ import annotations

import operator
import struct

import numpy as np

from ..errors import (
    AlignmentError,
    BadParameters,
    OutOfMemory,
    SecureMemoryError,
    SizeOverflow,
)
from .tables import (
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_LIMIT,
    FrameTable,
    as_page_array,
    clamp_i64,
    is_u64,
)

ENTRIES_PER_LIST_PAGE = PAGE_SIZE // 8 - 1   # 511
NEXT_OFFSET = ENTRIES_PER_LIST_PAGE * 8      # 4088
U64_MAX = U64_LIMIT - 1


def _list_pages(npages: int) -> int:
    return -(-npages // ENTRIES_PER_LIST_PAGE)


def _check_build_args(pages, offset, list_pa) -> list[int]:
    """The common checks of build and build_into, in the contract's order."""
    entries = [int(p) for p in as_page_array(pages)]
    if not entries:
        raise BadParameters("a page list needs at least one page")
    if not 0 <= clamp_i64(offset) <= PAGE_MASK:
        raise BadParameters(f"offset {offset} is not in 0..4095")
    if not is_u64(list_pa):
        raise BadParameters(f"list_pa {list_pa:#x} is not a 64-bit physical address")
    if list_pa & PAGE_MASK:
        raise AlignmentError(f"list_pa {list_pa:#x} is not 4 KiB-aligned")
    if list_pa + _list_pages(len(entries)) * PAGE_SIZE > U64_MAX:
        raise SizeOverflow(f"{_list_pages(len(entries))} list pages at {list_pa:#x} "
                           "run past 2**64")
    for i, pa in enumerate(entries):
        if pa & PAGE_MASK:
            raise AlignmentError(f"page-list entry {i} is {pa:#x}, not 4 KiB-aligned")
    return entries


def _page_list_bytes(entries: list[int], list_pa: int) -> bytes:
    out = bytearray()
    for k in range(_list_pages(len(entries))):
        chunk = entries[k * ENTRIES_PER_LIST_PAGE:(k + 1) * ENTRIES_PER_LIST_PAGE]
        page = bytearray(PAGE_SIZE)                       # zero: unused slots, next
        for i, pa in enumerate(chunk):
            page[8 * i:8 * i + 8] = pa.to_bytes(8, "little")
        if len(chunk) == ENTRIES_PER_LIST_PAGE:           # full: next = own PA + 4096
            own_pa = list_pa + k * PAGE_SIZE
            page[NEXT_OFFSET:] = (own_pa + PAGE_SIZE).to_bytes(8, "little")
        out += page
    return bytes(out)


def pagelist_build(pages, offset, list_pa) -> bytes:
    """The OP-TEE non-contiguous page list of a buffer (see the compiled twin)."""
    return _page_list_bytes(_check_build_args(pages, offset, list_pa), list_pa)


def pagelist_build_into(pages, offset, list_pa, out) -> int:
    """``pagelist_build`` written into the writable buffer ``out``; bytes written."""
    data = _page_list_bytes(_check_build_args(pages, offset, list_pa), list_pa)
    try:
        view = memoryview(out)
    except TypeError as exc:
        raise BadParameters(f"out is not a writable contiguous buffer: {exc}") from None
    if view.readonly or not view.c_contiguous:
        raise BadParameters("out is not a writable contiguous buffer")
    view = view.cast("B") if (view.ndim != 1 or view.format != "B") else view
    if len(view) < len(data):
        raise BadParameters(f"out holds {len(view)} bytes; the list needs {len(data)}")
    view[:len(data)] = data
    return len(data)


def _inside(ranges, pa: int) -> bool:
    return any(base <= pa and pa + PAGE_SIZE <= base + size for base, size in ranges)


def pagelist_parse(buf_ptr, size, read_page, nonsecure=None, max_pages=1 << 20) -> np.ndarray:
    """The pages of a buffer described by a page list, checked as OP-TEE does."""
    if not is_u64(buf_ptr):
        raise BadParameters(f"buf_ptr {buf_ptr:#x} is not a u64")
    if not is_u64(size):
        raise BadParameters(f"size {size:#x} is not a u64")
    offset = buf_ptr & PAGE_MASK
    if size + offset > U64_MAX:
        raise SizeOverflow(f"size {size:#x} + offset {offset:#x} overflows u64")
    if size == 0:
        raise BadParameters("size is 0: the buffer has no pages")
    num_pages = (size + offset - 1) // PAGE_SIZE + 1
    if num_pages * 8 > U64_MAX:
        # unreachable with 64-bit sizes (num_pages < 2**52), kept as OP-TEE has it
        raise SizeOverflow(f"{num_pages} pages * 8 bytes overflows u64")
    limit = clamp_i64(max_pages)
    if limit < 0 or num_pages > limit:
        raise OutOfMemory(f"{num_pages} pages exceed the limit of {max_pages}")
    try:
        result = np.empty(num_pages, dtype=np.uint64)
    except (MemoryError, ValueError):
        raise OutOfMemory(f"cannot allocate {num_pages} page entries") from None
    ranges = None
    if nonsecure is not None:
        try:
            ranges = [(operator.index(b), operator.index(s)) for b, s in nonsecure]
        except (TypeError, ValueError, AttributeError) as exc:
            raise BadParameters(f"nonsecure must be (base, size) pairs of ints: {exc}") from None
        for base, rsize in ranges:
            if base < 0 or rsize < 0 or base + rsize > U64_LIMIT:
                raise BadParameters(f"nonsecure range {base:#x}+{rsize:#x} is outside the "
                                    "64-bit address space")

    page_pa = buf_ptr & ~PAGE_MASK
    next_pa = 0
    done = 0
    k = 0
    while done < num_pages:        # bounded: each list page yields >= 1 entry
        if done > 0:
            if next_pa & PAGE_MASK:
                raise AlignmentError(f"next pointer of list page {k - 1} ({page_pa:#x}) "
                                     f"is {next_pa:#x}, not 4 KiB-aligned")
            page_pa = next_pa
        if ranges is not None and not _inside(ranges, page_pa):
            raise SecureMemoryError(f"list page {k} at {page_pa:#x} is not in "
                                    "non-secure memory")
        data = read_page(page_pa)
        try:
            view = memoryview(data)
        except TypeError as exc:
            raise BadParameters(f"read_page({page_pa:#x}) did not return a contiguous "
                                f"buffer: {exc}") from None
        if not view.c_contiguous:
            raise BadParameters(f"read_page({page_pa:#x}) did not return a contiguous buffer")
        raw = view.tobytes()
        if len(raw) < PAGE_SIZE:
            raise BadParameters(f"read_page({page_pa:#x}) returned {len(raw)} bytes, "
                                "fewer than 4096")
        chunk = min(ENTRIES_PER_LIST_PAGE, num_pages - done)
        for j, (pa,) in enumerate(struct.iter_unpack("<Q", raw[:8 * chunk])):
            result[done + j] = pa
        if chunk == ENTRIES_PER_LIST_PAGE:
            next_pa = int.from_bytes(raw[NEXT_OFFSET:PAGE_SIZE], "little")
        for i in range(done, done + chunk):
            pa = int(result[i])
            if pa & PAGE_MASK:
                raise AlignmentError(f"page-list entry {i} is {pa:#x}, not 4 KiB-aligned")
            if ranges is not None and not _inside(ranges, pa):
                raise SecureMemoryError(f"page-list entry {i} ({pa:#x}) is not in "
                                        "non-secure memory")
        done += chunk
        k += 1
    return result


def pagelist_parse_frames(buf_ptr, size, table, nonsecure=None, max_pages=1 << 20) -> np.ndarray:
    """``pagelist_parse`` with list page ``pa`` read as ``table.read(pa, 4096)``."""
    if not isinstance(table, FrameTable):
        raise BadParameters(f"table must be a FrameTable, not {type(table).__name__}")
    return pagelist_parse(buf_ptr, size, lambda pa: table.read(pa, PAGE_SIZE), nonsecure, max_pages)


def pagelist_segments(pages, max_segment=None) -> list[tuple[int, int]]:
    """Merge runs of physically consecutive pages into ``(pa, length)`` segments."""
    entries = [int(p) for p in as_page_array(pages)]
    cap = None
    if max_segment is not None:
        if clamp_i64(max_segment) < PAGE_SIZE:
            raise BadParameters(f"max_segment {max_segment} is below one page (4096)")
        cap = operator.index(max_segment) >> PAGE_SHIFT     # whole pages
    if not entries:
        return []
    for i, pa in enumerate(entries):
        if pa & PAGE_MASK:
            raise AlignmentError(f"page {i} is {pa:#x}, not 4 KiB-aligned")
    segments = []
    start, run = entries[0], 1
    for prev, pa in zip(entries, entries[1:]):
        if pa == prev + PAGE_SIZE and (cap is None or run < cap):
            run += 1
        else:
            segments.append((start, run * PAGE_SIZE))
            start, run = pa, 1
    segments.append((start, run * PAGE_SIZE))
    return segments
