"""Comparing large byte buffers in tests without pytest's slow diff of the whole buffer.

``assert big == other`` makes pytest explain a failure by diffing both buffers,
which for hundreds of KiB takes minutes; :func:`assert_bytes` compares once and
reports only the first differing offset and a few bytes around it.
"""
from __future__ import annotations


def assert_bytes(actual: bytes | bytearray | memoryview, expected: bytes | bytearray | memoryview,
                 what: str) -> None:
    """Raise AssertionError naming ``what`` and the first differing offset unless equal."""
    a, b = bytes(actual), bytes(expected)
    if a == b:
        return
    if len(a) != len(b):
        raise AssertionError(f"{what}: {len(a)} bytes, expected {len(b)}")
    i = next(k for k in range(len(a)) if a[k] != b[k])
    raise AssertionError(f"{what}: first difference at offset {i:#x}: "
                         f"{a[i:i + 16].hex()} instead of {b[i:i + 16].hex()}")
