"""OP-TEE non-contiguous page lists: build, parse, segments.

The public face of the page-list kernels (``poolsvc._backend.core``: the
compiled core, or the pure-Python reference with ``POOLSVC_PUREPYTHON=1``).

Format (``OPTEE_MSG_ATTR_NONCONTIG``): list pages of 4096 bytes, each holding
511 little-endian u64 physical addresses of 4 KiB pages followed by one u64,
the physical address of the next list page.  The parameter's ``buf_ptr`` is
the PA of the first list page OR'd with the buffer's offset in its first page;
the buffer spans ``num_pages(size, offset)`` pages.  Lists are built, as Linux
builds them, in physically contiguous list pages: a list page that fills gets
``next`` = its own PA + 4096; unused slots are zero.

Concurrency: pure functions, safe from any thread.

Example::

    >>> import numpy as np
    >>> from poolsvc import pagelist
    >>> pages = np.array([0x50003000, 0x50001000], dtype=np.uint64)
    >>> blob = pagelist.build(pages, 0x10, list_pa=0x60000000)
    >>> len(blob), pagelist.buf_ptr(0x60000000, 0x10) == 0x60000010
    (4096, True)
    >>> pagelist.parse(0x60000010, 8000, lambda pa: blob).tolist() == pages.tolist()
    True
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import numpy as np

from ._backend import core
from .constants import PAGE_MASK, PAGE_SIZE, PAGELIST_ENTRIES_PER_PAGE
from .errors import AlignmentError, BadParameters

__all__ = [
    "ENTRIES_PER_LIST_PAGE",
    "build",
    "build_into",
    "buf_ptr",
    "list_pages_needed",
    "num_pages",
    "parse",
    "segments",
]

#: Page addresses per list page; the 512th u64 slot holds ``next``.
ENTRIES_PER_LIST_PAGE = PAGELIST_ENTRIES_PER_PAGE  # 511

#: Default cap on the pages one list may describe (``parse``'s ``max_pages``).
DEFAULT_MAX_PAGES = 1 << 20


def build(pages, offset: int, list_pa: int) -> bytes:
    """Build the page list of a buffer.

    Params:
        pages: PAs of the buffer's 4 KiB pages, in buffer order (non-empty 1-D
            array-like convertible to ``uint64``; a C-contiguous ``uint64``
            array avoids a copy).
        offset: the buffer's first byte within ``pages[0]`` (0..4095).  It goes
            into ``buf_ptr``, not into the list, but is checked here.
        list_pa: page-aligned PA of the first list page; the list occupies
            ``list_pages_needed(len(pages))`` contiguous pages from there.
    Returns:
        ``list_pages_needed(len(pages)) * 4096`` bytes.
    Raises:
        BadParameters: no pages, ``offset`` out of range, ``list_pa`` not a u64.
        AlignmentError: ``list_pa`` or an entry not 4 KiB-aligned (the message
            gives the entry's index and value).
        SizeOverflow: the list would run past the end of the address space.
    """
    return core.pagelist_build(pages, offset, list_pa)


def build_into(pages, offset: int, list_pa: int, out) -> int:
    """Build the page list of a buffer into the writable buffer ``out``.

    Params: as :func:`build`, plus ``out``, a writable contiguous buffer of at
    least ``list_pages_needed(len(pages)) * 4096`` bytes.
    Returns: the number of bytes written.
    Raises: the errors of :func:`build`; BadParameters when ``out`` is not a
    writable contiguous buffer or is too short.  Nothing is written on error.
    """
    return core.pagelist_build_into(pages, offset, list_pa, out)


def parse(buf_ptr: int, size: int, read_page: Callable[[int], bytes],
          nonsecure: Iterable[tuple[int, int]] | None = None,
          max_pages: int = DEFAULT_MAX_PAGES) -> np.ndarray:
    """Parse a page list as the secure side does (OP-TEE's
    ``msg_param_mobj_from_noncontig``).

    Params:
        buf_ptr: PA of the first list page | the buffer's offset (low 12 bits).
        size: the buffer's length in bytes.
        read_page: ``read_page(pa)`` returns at least 4096 bytes: the list page
            at ``pa``.  It is called once per list page, in list order.
        nonsecure: None for no region check, else ``(base, size)`` ranges; every
            list page and every entry page must lie within one of them.
        max_pages: the most pages a list may describe.
    Returns:
        ``ndarray[uint64]`` of the ``num_pages(size, buf_ptr & 0xfff)`` entries.
    Raises (checks in this order):
        BadParameters: ``buf_ptr`` or ``size`` not a u64.
        SizeOverflow: ``size + offset`` overflows u64.
        BadParameters: ``size == 0``.
        SizeOverflow: ``num_pages * 8`` overflows u64 (unreachable with u64
            sizes; kept as OP-TEE has it).
        OutOfMemory: more than ``max_pages`` pages.
        then, walking the list: SecureMemoryError (a list page outside
        ``nonsecure``; checked before it is read), BadParameters
        (``read_page`` returned fewer than 4096 bytes), AlignmentError (a
        ``next`` pointer or an entry not 4 KiB-aligned), SecureMemoryError (an
        entry page outside ``nonsecure``).  Exceptions of ``read_page``
        propagate unchanged.
    """
    return core.pagelist_parse(buf_ptr, size, read_page, nonsecure, max_pages)


def parse_frames(buf_ptr: int, size: int, table: Any,
                 nonsecure: Iterable[tuple[int, int]] | None = None,
                 max_pages: int = DEFAULT_MAX_PAGES) -> np.ndarray:
    """:func:`parse`, reading each list page straight from a ``FrameTable``
    (``table.read(pa, 4096)``, no Python callback): the secure world's path.

    Same checks, order and errors as :func:`parse`; an unmapped list page is
    the table's ``AddressError``.
    """
    return core.pagelist_parse_frames(buf_ptr, size, table, nonsecure, max_pages)


def segments(pages, max_segment: int | None = None) -> list[tuple[int, int]]:
    """Merge runs of physically consecutive pages into ``(pa, length)`` segments.

    The Linux scatterlist rules: ``pages[i+1] == pages[i] + 4096`` continues a
    segment; ``max_segment`` (bytes) is rounded down to whole pages and caps
    each segment.

    Params: ``pages`` 1-D array-like of page-aligned PAs; ``max_segment`` None
    (no cap) or bytes ``>= 4096``.
    Returns: list of ``(pa, length_in_bytes)``; ``[]`` for no pages.
    Raises: BadParameters (``max_segment`` below one page); AlignmentError (an
    entry misaligned).
    """
    return core.pagelist_segments(pages, max_segment)


def num_pages(size: int, offset: int) -> int:
    """Pages spanned by ``size`` bytes starting ``offset`` bytes into a page.

    ``(size + offset - 1) // 4096 + 1`` for ``size > 0`` (the OP-TEE formula);
    0 for ``size == 0``.
    Raises BadParameters when ``size < 0`` or ``offset`` is not in 0..4095.
    """
    size, offset = operator.index(size), operator.index(offset)
    if size < 0:
        raise BadParameters(f"size {size} is negative")
    if not 0 <= offset <= PAGE_MASK:
        raise BadParameters(f"offset {offset} is not in 0..4095")
    if size == 0:
        return 0
    return (size + offset - 1) // PAGE_SIZE + 1


def list_pages_needed(npages: int) -> int:
    """List pages (4096 bytes each) a list of ``npages`` entries occupies:
    ``ceil(npages / 511)``.  Raises BadParameters when ``npages < 0``."""
    npages = operator.index(npages)
    if npages < 0:
        raise BadParameters(f"npages {npages} is negative")
    return -(-npages // ENTRIES_PER_LIST_PAGE)


def buf_ptr(list_pa: int, offset: int) -> int:
    """The ``buf_ptr`` of a NONCONTIG parameter: ``list_pa | offset``.

    Raises AlignmentError when ``list_pa`` is not 4 KiB-aligned and
    BadParameters when ``offset`` is not in 0..4095 or ``list_pa`` not a u64.
    """
    list_pa, offset = operator.index(list_pa), operator.index(offset)
    if not 0 <= list_pa < 1 << 64:
        raise BadParameters(f"list_pa {list_pa:#x} is not a 64-bit physical address")
    if list_pa & PAGE_MASK:
        raise AlignmentError(f"list_pa {list_pa:#x} is not 4 KiB-aligned")
    if not 0 <= offset <= PAGE_MASK:
        raise BadParameters(f"offset {offset} is not in 0..4095")
    return list_pa | offset
