"""Plain-Python reference of the compiled gather / scatter (``ext/copy.pyx``).

Owns: copying a buffer described by ``(pages, offset)`` between the frames
of a :class:`~poolsvc._pure.tables.FrameTable` and a contiguous buffer.  Every
page is checked before any byte moves; same checks, order and error types as
the compiled twin (``docs/core.md``).

Concurrency: none; the table belongs to one thread for the call.
"""
from __future__ import annotations

from ..errors import AlignmentError, BadParameters
from .tables import PAGE_MASK, PAGE_SIZE, FrameTable, as_page_array, clamp_i64


def _setup(table, pages, offset, size, buf, writable: bool):
    """Checks shared by gather and scatter: ``(flat view, [frame views])``."""
    if not isinstance(table, FrameTable):
        raise TypeError(f"table must be a poolsvc._pure FrameTable, not {type(table).__name__}")
    if not 0 <= clamp_i64(offset) <= PAGE_MASK:
        raise BadParameters(f"offset {offset} is not in 0..4095")
    count = clamp_i64(size)
    if count < 0:
        raise BadParameters(f"size {size} is negative")
    entries = [int(p) for p in as_page_array(pages)]
    npg = -(-(offset + count) // PAGE_SIZE)
    if npg > len(entries):
        raise BadParameters(f"{size} bytes at offset {offset} span {npg} pages; "
                            f"only {len(entries)} given")
    what = "out" if writable else "src"
    try:
        flat = memoryview(buf)
    except TypeError as exc:
        raise BadParameters(f"{what} is not a contiguous buffer: {exc}") from None
    if (writable and flat.readonly) or not flat.c_contiguous:
        raise BadParameters(f"{what} is not a {'writable ' if writable else ''}contiguous buffer")
    flat = flat.cast("B") if (flat.ndim != 1 or flat.format != "B") else flat
    if len(flat) < count:
        raise BadParameters(f"{what} holds {len(flat)} bytes; {count} needed")
    views = []
    done, start = 0, offset
    for i in range(npg if count else 0):
        if entries[i] & PAGE_MASK:
            raise AlignmentError(f"page {i} is {entries[i]:#x}, not 4 KiB-aligned")
        chunk = min(PAGE_SIZE - start, count - done)
        views.append(table.frame_view(entries[i], start + chunk)[start:])
        done += chunk
        start = 0
    return flat, views


def gather(table, pages, offset, size, out) -> int:
    """Copy the buffer ``(pages, offset)`` of ``size`` bytes into ``out``; returns ``size``."""
    flat, views = _setup(table, pages, offset, size, out, True)
    done = 0
    for view in views:
        flat[done:done + len(view)] = view
        done += len(view)
    return done


def scatter(table, pages, offset, size, src) -> int:
    """Copy ``size`` bytes of ``src`` into the buffer ``(pages, offset)``; returns ``size``."""
    flat, views = _setup(table, pages, offset, size, src, False)
    done = 0
    for view in views:
        view[:] = flat[done:done + len(view)]
        done += len(view)
    return done
