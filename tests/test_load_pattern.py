"""The owner-pattern kernels of the load harness: compiled ``ext/pattern.pyx`` against its
plain-Python twin ``poolsvc/_pure/pattern.py`` (the oracle), and the oracle against a
planted bug.

Each example writes patterns into fresh buffers with both implementations, corrupts
some bytes the same way in both, and reads them back: every written byte, every
answer and every error type must agree.  The compiled side is skipped when the
extension is not built.
"""
from __future__ import annotations

import importlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc import _pure
from poolsvc.errors import BadParameters


@pytest.fixture(scope="module")
def compiled() -> Any:
    try:
        return importlib.import_module("poolsvc._core")
    except ImportError as exc:  # pragma: no cover - depends on the build
        pytest.skip(f"compiled core not built: {exc}")


PREFIX = b"PLDT\x03\x00\x07\x00"
sizes = st.integers(1, 200)
#: (buffer size, handle) pairs of one batch, then corruptions: (buffer, offset fraction, xor)
batches = st.lists(st.tuples(sizes, st.integers(0, (1 << 64) - 1)), max_size=12)
flips = st.lists(st.tuples(st.integers(0, 11), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                 max_size=6)


def run_batch(impl: Any, pairs: list[tuple[int, int]], corrupt: list[tuple[int, float, int]],
              prefix: bytes = PREFIX) -> tuple[list[bytes], list[int]]:
    """Stamp the ends of a batch of buffers, corrupt some bytes, check: (bytes, answer)."""
    views = [bytearray(size) for size, _ in pairs]
    handles = [h for _, h in pairs]
    impl._pattern_stamp_ends(views, prefix, handles)
    for which, at, xor in corrupt:
        if which < len(views):
            view = views[which]
            view[int(at * len(view))] ^= xor
    return [bytes(v) for v in views], impl._pattern_check_ends(views, prefix, handles)


@given(batches, flips)
def test_batches_of_ends_agree_with_the_twin(compiled: Any, pairs: list[tuple[int, int]],
                                             corrupt: list[tuple[int, float, int]]) -> None:
    assert run_batch(compiled, pairs, corrupt) == run_batch(_pure, pairs, corrupt)


@given(st.binary(min_size=1, max_size=40), sizes, st.integers(-1, 199), st.integers(1, 255))
def test_a_whole_pattern_agrees_with_the_twin(compiled: Any, tag: bytes, size: int, at: int,
                                              xor: int) -> None:
    out = []
    for impl in (compiled, _pure):
        buf = bytearray(size)
        impl._pattern_fill(buf, tag)
        written = bytes(buf)
        if 0 <= at < size:
            buf[at] ^= xor
        out.append((written, impl._pattern_mismatch(buf, tag), impl._pattern_mismatch(memoryview(buf), tag)))
    assert out[0] == out[1]
    written, first, _ = out[0]
    assert written == (tag * size)[:size]
    assert first == (at if 0 <= at < size else -1)


def test_the_ends_are_those_of_the_whole_pattern() -> None:
    """The ends each size gets are the first and last 16 bytes of the tag repeated."""
    for impl in (_pure,):
        for size in range(1, 70):
            tag = PREFIX + (size * 977).to_bytes(8, "little")
            whole = (tag * size)[:size]
            [buf], bad = run_batch(impl, [(size, size * 977)], [])
            assert bad == []
            assert buf[:16] == whole[:16] and buf[-16:] == whole[-16:]
            if size > 32:
                assert buf[16:-16] == bytes(size - 32)


@pytest.mark.parametrize("impl_name", ["compiled", "pure"])
def test_bad_arguments_are_refused_before_any_write(compiled: Any, impl_name: str) -> None:
    impl = compiled if impl_name == "compiled" else _pure
    good, other = bytearray(40), bytearray(40)
    cases = [
        ([good, other], b"short", [1, 2]),
        ([good, other], PREFIX, [1]),
        ([good, other], PREFIX, [1, -1]),
        ([good, other], PREFIX, [1, 1 << 64]),
        ([good, b"read-only bytes is not writable....."], PREFIX, [1, 2]),
        ([good, 12], PREFIX, [1, 2]),
    ]
    for views, prefix, handles in cases:
        with pytest.raises(BadParameters):
            impl._pattern_stamp_ends(views, prefix, handles)
        assert good == bytearray(40)
    for tag in (b"", "text", None):
        with pytest.raises(BadParameters):
            impl._pattern_fill(good, tag)
        with pytest.raises(BadParameters):
            impl._pattern_mismatch(good, tag)
    with pytest.raises(BadParameters):
        impl._pattern_fill(b"read-only", b"x")
    with pytest.raises(BadParameters):
        impl._pattern_check_ends([good], PREFIX, [-3])


class _TailOffByOne:
    """A planted bug: the twin with the tail's phase taken one byte late."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_pure, name)

    @staticmethod
    def _pattern_stamp_ends(views: list[Any], prefix: bytes, handles: list[int]) -> None:
        _pure._pattern_stamp_ends(views, prefix, handles)
        for view, handle in zip(views, handles):
            n = len(view)
            if n > 32:
                tag = prefix + handle.to_bytes(8, "little")
                phase = (n + 1) % 16
                view[n - 16:] = (tag + tag)[phase:phase + 16]


def test_the_oracle_catches_a_planted_bug() -> None:
    """The comparison above tells the twin from a mutant that is wrong for some sizes only."""
    differ = [size for size in range(1, 70)
              if run_batch(_TailOffByOne(), [(size, 5)], []) != run_batch(_pure, [(size, 5)], [])]
    assert differ and all(size > 32 for size in differ)
