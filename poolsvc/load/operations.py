"""A load worker's operations: running each kind through the client API, timed and checked.

:class:`Operations` (inherited by :class:`~poolsvc.load.worker.Worker`) runs
one operation tuple (:mod:`poolsvc.load.trace`) against the daemon through
the public client API, times it into the figures of the current interval
(``samples``, ``counts``, ``hists``, ``errors``) and keeps the ledger
(:class:`~poolsvc.load.ledger.Ledger`) in step: a new buffer is held and
tagged, a freed one verified and forgotten, a lookup must give back the same
Shm, an invoke's secure-world digest must match the pattern.

A BATCH runs in two passes: each token is queued on the batch (its local
effects happen then, in token order; lookups and releases through the
``_BATCH_QUEUE`` table), and after the round trip each result is taken in by
its kind (lookups and releases through ``_BATCH_DONE``).  Allocs and frees,
the common tokens, skip the tables: the passes are the harness's hot loop.
A batched free gives up its pages only at its turn among the results, since
the daemon runs a batch in order: an alloc placed before the free in the
same batch must not get them.

An operation on a handle this process does not hold (a replayed allocation
that failed here) is *skipped* and counted.  A lost connection raises
:class:`ConnectionLost` after recording it as a violation.

Concurrency: one thread.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from typing import Any, Callable

from ..errors import Closed, NotSupported, OutOfMemory, PoolsvcError
from ..histogram import Histogram
from .ledger import KIND_OPS, WHOLE_ENDS, Held, Ledger, check_ends, fill_pattern, stamp_ends
from .mix import REGION_SIZE

Op = tuple  # an operation tuple, see poolsvc.load.trace
#: The Context (and Batch) method that makes a buffer of each kind.
METHODS = {kind: f"{op}_buf" for kind, op in KIND_OPS.items()}
_now = time.perf_counter_ns


class ConnectionLost(Exception):
    """The daemon's connection is gone: the worker reports and exits."""


class Operations(Ledger):
    """Runs operation tuples (state set by the worker's constructor)."""

    ctx: Any
    session: Any
    digest: Any
    digest_view: Any
    area: Any
    area_view: Any
    area_fd: int
    #: Latencies (ns) of the single operations of this interval, by operation: one
    #: list append per operation (the histograms are built from them per report line).
    samples: defaultdict[str, list[int]]
    #: Operations counted by batches (a single operation counts as its sample).
    counts: dict[str, int]
    errors: dict[str, int]
    hists: dict[str, Histogram]
    #: The Context method making a buffer of each allocated kind (``"u"``, ``"k"``, ``"p"``).
    alloc_fns: dict[str, Callable[[int], Any]]
    skipped: int
    draining: bool
    pending_release: list[Held]

    # -- figures ---------------------------------------------------------------------------------
    def _time(self, op: str, ns: int) -> None:
        """Count one operation ``op`` that took ``ns`` nanoseconds."""
        self.samples[op].append(ns)

    def _time_batched(self, op: str, ns: int, n: int, weight: int) -> None:
        """Count ``n`` operations ``op`` and ``weight`` latencies of ``ns`` each."""
        h = self.hists.get(op)
        if h is None:
            h = self.hists[op] = Histogram()
        h.add(ns, weight)
        self.counts[op] = self.counts.get(op, 0) + n

    def _error(self, op: str, exc: BaseException) -> None:
        """Count an error of ``op``; an OutOfMemory starts a drain, a lost connection ends
        the worker (:class:`ConnectionLost`)."""
        key = f"{op}:{type(exc).__name__}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if isinstance(exc, OutOfMemory):
            self.draining = True
        elif isinstance(exc, Closed):
            self.violate(f"{op}: connection to the daemon lost: {exc}")
            raise ConnectionLost(str(exc))

    def run_op(self, op: Op) -> int:
        """Run one operation tuple; returns the operations it stands for."""
        code = op[0]
        if code == "b":
            self.op_batch(op[1])
            return op[2]
        if code == "a":
            self.op_alloc(op[1], op[2], op[3])
        elif code == "f":
            self.op_free(op[1])
        else:
            self._SINGLE[code](self, *op[1:])
        return 1

    # -- single operations -------------------------------------------------------------------------
    def op_alloc(self, kind: str, size: int, handle: int) -> bool:
        op = KIND_OPS[kind]
        fn = self.alloc_fns[kind]
        t0 = _now()
        try:
            shm = fn(size)
        except PoolsvcError as exc:
            self.samples[op].append(_now() - t0)
            self._error(op, exc)
            return False
        self.samples[op].append(_now() - t0)
        self._hold(shm, kind, size, handle)
        return True

    def op_register(self, kind: str, size: int, offset: int, handle: int) -> bool:
        op = KIND_OPS[kind]
        if self.area is None or not self.free_regions:
            self.skipped += 1
            return False
        region = self.free_regions.pop()
        start = region * REGION_SIZE + offset
        tag = self._tag(handle)
        fill_pattern(self.area_view[start:start + size], tag)
        fn = getattr(self.ctx, METHODS[kind])
        t0 = _now()
        try:
            shm = fn(self.area_view[start:start + size], fd=self.area_fd)
        except PoolsvcError as exc:
            self._time(op, _now() - t0)
            self.free_regions.append(region)
            self._error(op, exc)
            return False
        self._time(op, _now() - t0)
        self._hold(shm, kind, size, handle, region)
        return True

    def op_free(self, handle: int) -> None:
        held = self.live.get(handle)
        if held is None:
            self.skipped += 1
            return
        self._verify(held, "free")
        self._forget(held)
        shm = held.shm
        t0 = _now()
        try:
            shm.close()
            if held.extra_refs:  # the references batched lookups took
                for _ in range(held.extra_refs):
                    shm.close()
        except PoolsvcError as exc:
            self._error("free", exc)
        self.samples["free"].append(_now() - t0)

    def op_lookup(self, handle: int) -> None:
        held = self.live.get(handle)
        if held is None or held.shm.id <= 0:
            self.skipped += 1
            return
        t0 = _now()
        try:
            again = self.ctx.shm_from_id(held.shm.id)
        except PoolsvcError as exc:
            self._time("lookup", _now() - t0)
            self._error("lookup", exc)
            return
        self._time("lookup", _now() - t0)
        if again is not held.shm:
            self.violate(f"lookup of id {held.shm.id} (buffer {handle}) returned cookie "
                         f"{again.cookie:#x}, not {held.shm.cookie:#x}")
        again.close()

    def op_invoke(self, handle: int) -> None:
        from ..tee.driver import RegisteredMemref
        from ..tee.ta import Sha256App

        held = self.live.get(handle)
        if held is None or held.kind == "p":
            self.skipped += 1
            return
        length = held.size if held.full else min(16, held.size)
        t0 = _now()
        try:
            self.session.invoke(Sha256App.DIGEST, [RegisteredMemref(held.shm, 0, length, "in"),
                                                   RegisteredMemref(self.digest, 0, 32, "out")])
        except PoolsvcError as exc:
            self._time("invoke", _now() - t0)
            self._error("invoke", exc)
            return
        self._time("invoke", _now() - t0)
        if self.digest_view is None or held.view is None:
            self.unverified += 1
            return
        pattern = self._pattern(held)
        expected = hashlib.sha256(pattern if length == held.size else pattern[:length]).digest()
        if self.digest_view[:32] != expected:
            self.violate(f"invoke: SHA-256 of buffer {handle} ({KIND_OPS[held.kind]}, {length} bytes) "
                         f"in the secure world is {bytes(self.digest_view[:32]).hex()[:16]}..., "
                         f"the owner wrote bytes hashing to {expected.hex()[:16]}...; "
                         f"{self._whose(bytes(held.view[:16]))}")

    _SINGLE: dict[str, Callable[..., Any]] = {
        "a": op_alloc, "r": op_register, "f": op_free, "l": op_lookup, "i": op_invoke}

    # -- batches -------------------------------------------------------------------------------------
    def op_batch(self, tokens: list[Op]) -> None:
        """Run one BATCH of ``("a", K, SIZE, H)``, ``("f", H)``, ``("l", H)``, ``("x", H)``."""
        b = self.ctx.batch()
        plan = self._batch_plan(b, tokens)
        if not plan:
            return
        t0 = _now()
        try:
            results = b.run()
        except PoolsvcError as exc:
            for entry in plan:
                if entry[0] == "f":
                    self._give_pages(entry[1])
            self._error("batch", exc)
            return
        ns = _now() - t0
        self._time_batched("batch", ns, 0, 1)
        self._batch_take(plan, results, ns // len(plan))

    def _batch_plan(self, b: Any, tokens: list[Op]) -> list[Op]:
        """Queue each token on ``b``; the plan: the alloc tokens themselves and
        ``("f"|"l"|"x", Held)`` entries (tokens on buffers not held are skipped).

        Allocs and frees, the common tokens, are queued here without the table,
        in one pass: a free leaves the live set at once (its pages at its turn
        among the results, :meth:`_batch_take`), and the ends of every freed
        buffer are checked together after the pass (one kernel call), before
        anything is sent.
        """
        queue = self._BATCH_QUEUE
        allocs = {kind: getattr(b, method) for kind, method in METHODS.items() if kind in "ukp"}
        close = b.close
        live = self.live
        live_get = live.get
        live_pop = live.pop
        live_list = self.live_list
        plan: list[Op] = []
        append = plan.append
        # buffers whose ends the kernel checks (written by a batch: views and handles)
        ends_held: list[Held] = []
        ends_views: list[Any] = []
        ends_handles: list[int] = []
        skipped = 0
        for tok in tokens:
            code = tok[0]
            if code == "a":
                allocs[tok[1]](tok[2])
                append(tok)
                continue
            if code != "f":
                entry = queue[code](self, b, tok)
                if entry is None:
                    skipped += 1
                else:
                    append(entry)
                continue
            held = live_get(tok[1])
            if held is None:
                skipped += 1
                continue
            view = held.view
            if view is None or held.full:
                self._verify(held, "free")
            else:
                ends_held.append(held)
                ends_views.append(view)
                ends_handles.append(held.handle)
            # Ledger._forget without its pages (they go at the free's turn): out of live
            # and live_list (the last one takes its place)
            live_pop(held.handle)
            last = live_list.pop()
            if last is not held:
                live_list[held.index] = last
                last.index = held.index
            held.view = None  # (released with the Shm, when the batch closes it)
            if held.region >= 0:
                self.free_regions.append(held.region)
            shm = held.shm
            close(shm)
            if held.extra_refs:  # the references its batched lookups took
                for _ in range(held.extra_refs):
                    close(shm)
            append(("f", held))
        if skipped:
            self.skipped += skipped
        if ends_views:
            for at in check_ends(ends_views, self.tag_prefix, ends_handles):
                held = ends_held[at]
                held.view = ends_views[at]
                self._changed(held, "free")
                held.view = None
        return plan

    def _batch_take(self, plan: list[Op], results: list[Any], per_op: int) -> None:
        """Take in a batch's results in order; one histogram entry per operation kind,
        each at ``per_op`` nanoseconds.

        A buffer from an alloc and a free's result are taken in here without the
        table, in one pass: the new buffer's pages are claimed and it joins the live
        set at its turn, a free's pages are given up at its turn; the ends of every
        new buffer are written together after the pass (one kernel call).
        """
        done = self._BATCH_DONE
        nxt = iter(results).__next__
        made = {"u": 0, "k": 0, "p": 0}
        freed = 0
        tally: dict[str, int] = {}
        live = self.live
        live_list = self.live_list
        owner = self.pages
        owner_get = owner.get
        claim = self._claim_pages
        stamp_views: list[Any] = []
        stamp_handles: list[int] = []
        for entry in plan:
            code = entry[0]
            result = nxt()
            if code == "a":  # a new buffer (or the alloc's error)
                _, kind, size, handle = entry
                made[kind] += 1
                if isinstance(result, PoolsvcError):
                    self._error(KIND_OPS[kind], result)
                    continue
                if size <= WHOLE_ENDS:
                    self._hold(result, kind, size, handle, full=False)
                    continue
                try:
                    view = result.view()
                except NotSupported:  # a private buffer of the static pool: no view
                    self._hold(result, kind, size, handle, full=False)
                    continue
                held = Held(result, kind, size, handle, -1, view)
                if kind != "p":  # Ledger._claim_pages, written out for one page
                    run = result.page_run
                    if run is not None and run[1] == 1:
                        pa = run[0]
                        held.pages = (pa,)
                        other = owner_get(pa)
                        if other is not None:
                            self.violate(f"page {pa:#x} of new buffer {handle} already belongs to "
                                         f"this client's live buffer {other}")
                        owner[pa] = handle
                    else:
                        claim(held, result)
                live[handle] = held  # Ledger._enlist
                held.index = len(live_list)
                live_list.append(held)
                stamp_views.append(view)
                stamp_handles.append(handle)
            elif code == "f":
                held = entry[1]
                if held.extra_refs:
                    for _ in range(held.extra_refs):  # the results of closing its lookups' references
                        nxt()
                    held.extra_refs = 0
                if held.pages:  # the free's turn: its pages may now go to a later alloc
                    self._give_pages(held)
                if isinstance(result, PoolsvcError):
                    self._error("free", result)
                freed += 1
            else:
                op = done[code](self, entry, result, nxt)
                if op is not None:
                    tally[op] = tally.get(op, 0) + 1
        if stamp_views:
            stamp_ends(stamp_views, self.tag_prefix, stamp_handles)
        for kind, n in made.items():
            if n:
                op = KIND_OPS[kind]
                tally[op] = tally.get(op, 0) + n
        if freed:
            tally["free"] = tally.get("free", 0) + freed
        for op, n in tally.items():
            self._time_batched(op, per_op, n, n)

    # Queueing a token (allocs and frees: in _batch_plan): its local effects, in token
    # order; the plan entry, or None to skip.
    def _queue_lookup(self, b: Any, tok: Op) -> Op | None:
        held = self.live.get(tok[1])
        if held is None or held.shm.id <= 0:
            return None
        b.shm_from_id(held.shm.id)
        return ("l", held)

    def _queue_release(self, b: Any, tok: Op) -> Op | None:
        held = self.live.get(tok[1])
        if held is None or held.extra_refs <= 0:
            return None
        held.extra_refs -= 1
        b.close(held.shm)
        return ("x", held)

    _BATCH_QUEUE: dict[str, Callable[..., Any]] = {"l": _queue_lookup, "x": _queue_release}

    # Taking in a result (allocs' and frees': in _batch_take): the operation name it counts
    # under, or None.
    def _done_lookup(self, entry: Op, result: Any, nxt: Callable[[], Any]) -> str:
        held = entry[1]
        if isinstance(result, PoolsvcError):
            self._error("lookup", result)
        elif result is not held.shm:
            self.violate(f"batched lookup of id {held.shm.id} returned cookie "
                         f"{result.cookie:#x}, not {held.shm.cookie:#x}")
            result.close()
        else:
            held.extra_refs += 1
            self.pending_release.append(held)
        return "lookup"

    def _done_release(self, entry: Op, result: Any, nxt: Callable[[], Any]) -> None:
        if isinstance(result, PoolsvcError):
            self._error("free", result)

    _BATCH_DONE: dict[str, Callable[..., Any]] = {"l": _done_lookup, "x": _done_release}
