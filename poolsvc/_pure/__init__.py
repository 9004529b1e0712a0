"""Plain-Python reference implementations of poolsvc's compiled kernels.

Same names, signatures, results and errors as ``poolsvc._core`` (the contract
is ``docs/core.md``).  Written for clarity, not speed: the tests use them as
the oracle for the compiled core, the benchmarks as the baseline of the
speed-up ratios, and ``POOLSVC_PUREPYTHON=1`` runs the whole package on them.
"""
from .alloc import FrameAllocator, RangeAllocator
from .arena import ArenaPages, ArenaRun
from .copy import gather, scatter
from .fastpath import ShmRequests, serve_alloc, serve_shm_close
from .pagelist import (
    pagelist_build,
    pagelist_build_into,
    pagelist_parse,
    pagelist_parse_frames,
    pagelist_segments,
)
from .pattern import _pattern_check_ends, _pattern_fill, _pattern_mismatch, _pattern_stamp_ends
from .slotserve import ready_slots, ring_doorbell, serve_ready, serve_slot
from .smc import RegisteredShm, SmcDriver, SmcEntry
from .tables import AddressMap, FrameTable, IdTable
from .userpages import UserPages, buffer_address, page_run_start
from .clientwire import ClientSlot, ClientWire
from .wire import _batch_results, run_batch, split_frames

__all__ = [
    "_batch_results",
    "_pattern_check_ends",
    "_pattern_fill",
    "_pattern_mismatch",
    "_pattern_stamp_ends",
    "AddressMap",
    "ArenaPages",
    "ArenaRun",
    "ClientSlot",
    "ClientWire",
    "FrameAllocator",
    "FrameTable",
    "IdTable",
    "RangeAllocator",
    "RegisteredShm",
    "SmcDriver",
    "ShmRequests",
    "SmcEntry",
    "UserPages",
    "buffer_address",
    "gather",
    "pagelist_build",
    "pagelist_build_into",
    "pagelist_parse",
    "pagelist_parse_frames",
    "page_run_start",
    "pagelist_segments",
    "ready_slots",
    "ring_doorbell",
    "run_batch",
    "scatter",
    "serve_alloc",
    "serve_shm_close",
    "serve_ready",
    "serve_slot",
    "split_frames",
]
