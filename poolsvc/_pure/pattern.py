"""Plain-Python reference of the compiled owner-pattern kernels (``ext/pattern.pyx``).

Owns: writing a buffer's pattern (its tag repeated from byte 0, cut at the
buffer's length) and reading it back, whole or by its *ends* (the first and
last 16 bytes, all of it for at most 32 bytes), one buffer or a list of them
per call; a batch names the tag of buffer ``i`` as ``prefix +
handles[i].to_bytes(8, "little")``.  Same results, checks and error types as
the compiled twin; the names are private there and here (the load harness's
kernels, not poolsvc's API).

Concurrency: none; the caller's buffers belong to its thread for the call.
"""
from __future__ import annotations

from typing import Any

from ..errors import BadParameters

#: Bytes of a batch tag (an 8-byte prefix, then the handle as a u64) and of its prefix.
TAG_SIZE = 16
PREFIX_SIZE = 8


def _flat(buf: Any, writable: bool) -> memoryview:
    """``buf`` as a flat byte view (BadParameters if it is not a fitting buffer)."""
    try:
        view = memoryview(buf)
    except TypeError as exc:
        raise BadParameters(f"{type(buf).__name__} is not a {'writable ' if writable else ''}"
                            f"contiguous buffer: {exc}") from None
    if (writable and view.readonly) or not view.c_contiguous:
        raise BadParameters(f"{type(buf).__name__} is not a {'writable ' if writable else ''}"
                            "contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_tag(tag: Any) -> None:
    if type(tag) is not bytes or not tag:
        raise BadParameters(f"tag must be non-empty bytes, got {tag!r}")


def _pattern(tag: bytes, n: int) -> bytes:
    return (tag * (n // len(tag) + 1))[:n]


def _pattern_fill(buf: Any, tag: bytes) -> None:
    """Write ``tag`` repeated from byte 0 over the whole of ``buf`` (cut at its end)."""
    _check_tag(tag)
    view = _flat(buf, True)
    view[:] = _pattern(tag, len(view))


def _pattern_mismatch(buf: Any, tag: bytes) -> int:
    """The first offset where ``buf`` differs from ``tag`` repeated from byte 0, or -1."""
    _check_tag(tag)
    data = _flat(buf, False).tobytes()
    if data == _pattern(tag, len(data)):
        return -1
    return next(i for i, (a, b) in enumerate(zip(data, _pattern(tag, len(data)))) if a != b)


def _u64(value: Any) -> int:
    if type(value) is not int and not hasattr(value, "__index__") or isinstance(value, bool):
        raise BadParameters(f"handle {value!r} is not a u64")
    value = value.__index__()
    if not 0 <= value < 1 << 64:
        raise BadParameters(f"handle {value!r} is not a u64")
    return int(value)


def _tag_args(views: Any, prefix: Any, handles: Any) -> None:
    if type(views) is not list or type(handles) is not list:
        raise TypeError("views and handles must be lists")
    if type(prefix) is not bytes or len(prefix) != PREFIX_SIZE:
        raise BadParameters(f"prefix must be {PREFIX_SIZE} bytes, got {prefix!r}")
    if len(views) != len(handles):
        raise BadParameters(f"{len(views)} buffers but {len(handles)} handles")


def _ends(n: int, tag: bytes) -> tuple[bytes, bytes]:
    """The first and the last 16 bytes of the pattern of ``n`` > 32 bytes."""
    phase = n % TAG_SIZE
    return tag, (tag + tag)[phase:phase + TAG_SIZE]


def _pattern_stamp_ends(views: list[Any], prefix: bytes, handles: list[int]) -> None:
    """Write the ends of each ``views[i]``'s pattern, with the tag ``prefix`` +
    ``handles[i]`` (u64, little-endian); a buffer of at most 32 bytes gets all of it."""
    _tag_args(views, prefix, handles)
    checked = [(_u64(h), _flat(v, True)) for h, v in zip(handles, views)]
    for handle, view in checked:
        tag = prefix + handle.to_bytes(8, "little")
        n = len(view)
        if n <= 2 * TAG_SIZE:
            view[:] = _pattern(tag, n)
        else:
            head, tail = _ends(n, tag)
            view[:TAG_SIZE] = head
            view[n - TAG_SIZE:] = tail


def _pattern_check_ends(views: list[Any], prefix: bytes, handles: list[int]) -> list[int]:
    """The indices ``i``, in order, whose ``views[i]`` ends differ from the pattern of
    the tag ``prefix`` + ``handles[i]`` (all of it for at most 32 bytes)."""
    _tag_args(views, prefix, handles)
    bad: list[int] = []
    for i, (view, handle) in enumerate(zip(views, handles)):
        tag = prefix + _u64(handle).to_bytes(8, "little")
        data = _flat(view, False)
        n = len(data)
        if n <= 2 * TAG_SIZE:
            same = data.tobytes() == _pattern(tag, n)
        else:
            head, tail = _ends(n, tag)
            same = data[:TAG_SIZE] == head and data[n - TAG_SIZE:] == tail
        if not same:
            bad.append(i)
    return bad
