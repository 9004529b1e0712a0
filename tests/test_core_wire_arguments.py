"""Argument checks of ``run_batch`` / ``split_frames`` (ext/wire.pyx): the pure twin
refuses what the compiled one refuses (float limits, a ``max_output`` that is not an
int, handlers that are not a dict), with the limits checked before ``counts``.
"""
from __future__ import annotations

import collections
import struct

import pytest

from poolsvc.errors import PoolsvcError

# ---------------------------------------------------------------------------
# run_batch / split_frames: argument checks, compiled vs pure
# ---------------------------------------------------------------------------

def _frame(msg_type, body=b""):
    return struct.pack("<IHH", len(body), msg_type, 0) + body


_BODY = _frame(1, b"ab") + _frame(2, b"cde")
_HANDLERS = {1: lambda conn, body: body, 2: lambda conn, body: body[::-1]}


def _refuse(conn, msg_type, unbatchable):
    return b"refused"


def _on_error(conn, msg_type, exc):
    return b"error"


@pytest.mark.parametrize("args", [
    (_BODY, 10.0, 100, _HANDLERS, 1000, {}),                 # float limit
    (_BODY, 10, 100.0, _HANDLERS, 1000, {}),                 # float max_frame
    (b"", 10, 100, _HANDLERS, None, {}),                     # max_output None, nothing to run
    (_BODY, 10, 100, _HANDLERS, 3.5, {}),                    # float max_output
    (_BODY, 10, 100, collections.OrderedDict(_HANDLERS), 1000, {}),
    (b"", 10, 100, None, 1000, {}),
    (_BODY, -1, 100, _HANDLERS, 1000, []),                   # the limit is checked first
    (_BODY, True, 100, _HANDLERS, 1000, {}),                 # bool: an int
])
def test_run_batch_argument_checks_agree(compiled, pure, args):
    body, limit, max_frame, handlers, max_output, counts = args

    def outcome(mod):
        try:
            return ("ok", mod.run_batch(body, limit, max_frame, handlers, None, _refuse, _on_error,
                                        max_output, counts))
        except (PoolsvcError, TypeError) as exc:
            return ("err", type(exc).__name__, str(exc)
                    if isinstance(exc, PoolsvcError) else "")

    assert outcome(compiled) == outcome(pure)


@pytest.mark.parametrize("limit, max_frame", [(10.0, 100), (10, 100.0), ("1", 100), (True, 100),
                                               (2 ** 70, 2 ** 70), (-(2 ** 70), 100)])
def test_split_frames_argument_checks_agree(compiled, pure, limit, max_frame):
    def outcome(mod):
        try:
            return ("ok", mod.split_frames(_BODY, limit, max_frame))
        except (PoolsvcError, TypeError) as exc:
            return ("err", type(exc).__name__)

    assert outcome(compiled) == outcome(pure)
