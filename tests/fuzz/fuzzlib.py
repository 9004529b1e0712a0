"""What every coverage-guided fuzz harness in tests/fuzz/ shares.

Owns: putting this checkout first on ``sys.path`` (a harness runs as a
script, ``python tests/fuzz/fuzz_X.py``, whose ``sys.path[0]`` is this
directory), importing poolsvc under atheris' bytecode instrumentation (the
pure-Python twins in ``poolsvc/_pure`` and the Python shell give the
coverage; the compiled core is exercised, not instrumented), running a
call into an *outcome* that two backends' outcomes can be compared by, and
the libFuzzer entry point.

The rules a harness enforces (each break is a finding: atheris prints it,
writes the input to ``crash-*`` and exits non-zero):

- a parser given bad input raises a :class:`poolsvc.errors.PoolsvcError`
  subclass; any other exception escaping it (IndexError, struct.error,
  OverflowError, ...) is a finding;
- the compiled kernel and its pure-Python twin agree: the same result, or
  the same error class with the same message;
- a crash (a signal in the compiled core) or a hang (libFuzzer's
  ``-timeout``) is a finding by itself.

Concurrency: a harness is one process, one thread.
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
from typing import Any, Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402  (after the path fix: the checkout, not an installed copy)

PAGE = 4096
#: The harnesses, ``tests/fuzz/fuzz_<target>.py``.
TARGETS = ("msg", "pagelist", "protocol", "smc", "wire")
#: The seed corpus kept in the repository: one folder per target.
CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"


class Finding(AssertionError):
    """A fuzz finding: an untyped exception, a disagreement, a broken round trip."""


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Import poolsvc inside this block to give atheris its coverage (Python bytecode)."""
    with atheris.instrument_imports(include=["poolsvc"]):
        yield


def _plain(value: Any) -> Any:
    """``value`` in a form ``==`` compares across backends (arrays as lists)."""
    if hasattr(value, "dtype") and hasattr(value, "tolist"):
        return ("array", str(value.dtype), value.tolist())
    if isinstance(value, (list, tuple)):
        return type(value).__name__, [_plain(v) for v in value]
    if isinstance(value, dict):
        return "dict", sorted((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def outcome(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple:
    """``("ok", result)`` or ``("error", class name, message)`` of ``call(*args)``.

    Raises Finding when the call raises anything but a PoolsvcError.
    """
    from poolsvc.errors import PoolsvcError

    try:
        return ("ok", _plain(call(*args, **kwargs)))
    except PoolsvcError as exc:
        return ("error", type(exc).__name__, str(exc))
    except Exception as exc:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
        raise Finding(f"{what}: untyped {name}: {exc}") from exc


def agree(what: str, compiled: tuple, pure: tuple) -> tuple:
    """``compiled`` (an outcome) after checking that ``pure`` is the same; Finding otherwise."""
    if compiled != pure:
        raise Finding(f"{what}: the backends disagree\n  compiled: {_short(compiled)}\n"
                      f"  pure:     {_short(pure)}")
    return compiled


def _short(value: Any, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def run(test_one_input: Callable[[bytes], None]) -> None:
    """The libFuzzer entry point: ``sys.argv`` holds libFuzzer's flags and corpus dirs."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
