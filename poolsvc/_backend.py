"""Selects the implementation of the compiled kernels.

``POOLSVC_PUREPYTHON=1`` selects the plain-Python reference implementations in
``poolsvc._pure``; anything else requires the compiled extension
``poolsvc._core``.  There is never a silent fallback: if the extension is
missing, importing poolsvc fails with an error that says how to build it.

Both modules export the same names with the same behaviour (the tests use the
pure one as an oracle for the compiled one):
``RangeAllocator, FrameAllocator, FrameTable, IdTable, AddressMap,
pagelist_build, pagelist_build_into, pagelist_parse, pagelist_parse_frames, pagelist_segments,
gather, scatter, SmcDriver, SmcEntry, RegisteredShm, split_frames, run_batch, ArenaPages,
ArenaRun, ShmRequests, serve_alloc, serve_shm_close, serve_slot, ring_doorbell, ready_slots,
serve_ready, ClientSlot, ClientWire``, the client Batch's private ``_batch_results``, and the load
harness's private ``_pattern_fill, _pattern_mismatch, _pattern_stamp_ends, _pattern_check_ends``.
"""
from __future__ import annotations

import os
from types import ModuleType

PURE: bool = os.environ.get("POOLSVC_PUREPYTHON", "") not in ("", "0")


def _load() -> ModuleType:
    if PURE:
        from . import _pure

        return _pure
    try:
        from . import _core
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "poolsvc's compiled core (poolsvc._core) is not built: "
            f"{exc}. Build it with `pip install -e .` (or `python setup.py "
            "build_ext --inplace`) from the project root, or set "
            "POOLSVC_PUREPYTHON=1 to use the plain-Python reference kernels."
        ) from exc
    return _core


core: ModuleType = _load()
BACKEND: str = "pure-python" if PURE else "compiled"
