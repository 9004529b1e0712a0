"""The argument types of poolsvc/commands/argtypes.py: accepted spellings and refusals."""
from __future__ import annotations

import argparse

import pytest

from poolsvc.commands import argtypes


def test_accepted_values():
    assert argtypes.positive_int("1_000") == 1000 and argtypes.positive_int("0x10") == 16
    assert argtypes.nonnegative_int("0") == 0
    assert argtypes.positive_float("0.5") == 0.5 and argtypes.nonnegative_float("0") == 0.0
    assert argtypes.size("16MiB") == 16 << 20 and argtypes.size("0x1000") == 4096
    assert argtypes.size_list("4KiB, 1MiB,") == [4096, 1 << 20]
    assert argtypes.choice_of(4, 16, 64)("16") == 16


@pytest.mark.parametrize("func, text", [
    (argtypes.positive_int, "0"), (argtypes.positive_int, "-3"), (argtypes.positive_int, "x"),
    (argtypes.nonnegative_int, "-1"), (argtypes.positive_float, "0"), (argtypes.positive_float, "nan"),
    (argtypes.nonnegative_float, "-0.1"), (argtypes.nonnegative_float, "inf"), (argtypes.size, "0"),
    (argtypes.size, "-4KiB"), (argtypes.size_list, " , "), (argtypes.choice_of(4, 16, 64), "8"),
])
def test_refused_values(func, text):
    with pytest.raises(argparse.ArgumentTypeError):
        func(text)
