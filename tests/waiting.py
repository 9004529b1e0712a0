"""Waiting on a condition with a deadline, for tests that watch another thread or process.

Tests never assert after a fixed sleep: they poll the state they expect with
:func:`wait_until`, which returns as soon as it holds (fast on an idle machine) and
fails with a message only when the deadline passes (patient on a loaded one).
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.01,
               what: str = "the condition") -> T:
    """Poll ``condition()`` until it returns a true value, and return that value.

    ``timeout``: seconds before giving up; ``interval``: seconds between polls.
    Raises AssertionError naming ``what`` when the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s (last value {value!r})")
        time.sleep(interval)
