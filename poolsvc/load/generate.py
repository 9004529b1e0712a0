"""A load worker's generation: which operations it runs next, drawn from the mix.

:class:`Generator` (inherited by :class:`~poolsvc.load.worker.Worker`) turns
the seeded ``random.Random`` and the mix into operation tuples
(:mod:`poolsvc.load.trace` describes them): single operations, BATCH
tuples of ``batch_size`` tokens, and after an OutOfMemory the frees of a
random half of what the client holds.  It reads the ledger (what is live,
which registration regions are free) but changes nothing in it: the
operations do, when they run.  Handles are numbered here, one per new
buffer, in generation order, so a trace names buffers the same way under any
configuration.

Concurrency: one thread.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any

from .ledger import Held, Ledger
from .mix import BATCHABLE, REGION_SIZE

#: Draws a batched lookup makes for a buffer with an id before it allocates instead.
_TRIES = range(8)

#: Kind code of each allocation operation.
ALLOC_KINDS = {"alloc_user": "u", "alloc_kernel": "k", "alloc_priv": "p"}
Op = tuple  # an operation tuple, see poolsvc.load.trace


class Generator(Ledger):
    """Draws the next operations (state set by the worker's constructor)."""

    rng: Any
    size: Any
    batch_size: int
    max_live: int
    exhaust: bool
    next_handle: int
    pending_release: list[Held]
    draining: bool
    area: Any

    def _new_handle(self) -> int:
        h = self.next_handle
        self.next_handle += 1
        return h

    def _gen_alloc(self, op: str) -> Op:
        return ("a", ALLOC_KINDS[op], self.size(), self._new_handle())

    def generate(self, choose: Any, choose_batch: Any) -> list[Op]:
        """The next operation(s) to run, drawn from the mix."""
        if self.draining:  # after an OutOfMemory: free a random half of what we hold
            self.draining = False
            ops = self._gen_drain()
            if ops:  # nothing held (every buffer already freed): draw from the mix
                return ops
        op = choose()
        if self.batch_size > 1 and op in BATCHABLE and choose_batch:
            return [self._gen_batch(choose_batch)]
        return [self._gen_single(op)]

    def _gen_drain(self) -> list[Op]:
        """The frees of a random half of the live buffers (at least one), batched when
        the run batches, after the releases of earlier batched lookups."""
        if not self.exhaust and not self.live:
            return []
        victims = [h for h in list(self.live) if self.rng.random() < 0.5] or list(self.live)[:1]
        releases: list[Op] = [("x", h.handle) for h in self.pending_release]
        self.pending_release = []
        if self.batch_size <= 1:
            return [("f", h) for h in victims]
        toks = releases + [("f", h) for h in victims]
        ops: list[Op] = []
        for i in range(0, len(toks), self.batch_size):
            part = toks[i:i + self.batch_size]
            ops.append(("b", part, sum(t[0] != "x" for t in part)))
        return ops

    def _pick(self, need_id: bool = False, no_priv: bool = False) -> Held | None:
        """A random live buffer, or None (after 8 draws that did not fit).

        ``need_id``: with an id (lookup); ``no_priv``: not alloc_priv (invoke).
        """
        live_list = self.live_list
        rnd = self.rng.random
        for _ in range(8):
            n = len(live_list)
            if not n:
                return None
            held = live_list[int(rnd() * n)]
            if (not need_id or held.shm.id > 0) and (not no_priv or held.kind != "p"):
                return held
        return None

    def _gen_single(self, op: str) -> Op:
        if op == "free" or (not self.exhaust and len(self.live) >= self.max_live  # full
                            and op != "invoke" and op != "lookup"):
            held = self._pick()
            if held is not None:
                return ("f", held.handle)
            op = "alloc_user"
        kind = ALLOC_KINDS.get(op)
        if kind is not None:
            handle = self.next_handle
            self.next_handle = handle + 1
            return ("a", kind, self.size(), handle)
        if op.startswith("register"):
            if self.area is None or not self.free_regions:
                return self._gen_alloc("alloc_user")
            size = self.size()
            size = min(size, REGION_SIZE - 4096)
            offset = self.rng.randrange(0, REGION_SIZE - size + 1) if size < REGION_SIZE else 0
            offset = min(offset, REGION_SIZE - size)
            return ("r", "U" if op == "register_user" else "K", size, offset, self._new_handle())
        if op == "lookup":
            held = self._pick(need_id=True)
            return ("l", held.handle) if held is not None else self._gen_alloc("alloc_user")
        held = self._pick(no_priv=True)
        return ("i", held.handle) if held is not None else self._gen_alloc("alloc_kernel")

    def _gen_batch(self, choose_batch: Any) -> Op:
        """One batch: the releases of earlier lookups, then ``batch_size`` operations.

        A buffer appears at most once among a batch's frees and lookups: a free
        later in the batch would run first locally.  The candidates are a copy
        of the live list from which each buffer used is swapped out, so that a
        free takes one draw.
        """
        toks: list[Op] = [("x", h.handle) for h in self.pending_release]
        releases = len(toks)
        self.pending_release = []
        # each operation's token code: "f", "l", or the kind of an alloc ("u", "k", "p")
        codes = [{"free": "f", "lookup": "l"}.get(n) or ALLOC_KINDS[n] for n in choose_batch.names]
        codes.append(codes[-1])  # random() * total rounded up to total: the last one
        cum, total = choose_batch.cum, choose_batch.total
        rnd = self.rng.random
        size = self.size
        append = toks.append
        bounded = not self.exhaust
        max_live = self.max_live
        planned = len(self.live)
        handle = self.next_handle
        # pool[:left]: live buffers not yet in this batch (frees take effect when it runs)
        pool = self.live_list[:]
        left = len(pool)
        for _ in range(self.batch_size):
            op = codes[bisect_right(cum, rnd() * total)]
            free = op == "f" or (bounded and planned >= max_live and op != "l")
            if (free or op == "l") and left:
                # a random candidate (with an id for a lookup: at most 8 draws); the hot
                # path, so written out here rather than through _pick
                for _ in _TRIES:
                    at = int(rnd() * left)
                    held = pool[at]
                    if free or held.shm.id > 0:
                        left -= 1
                        pool[at] = pool[left]
                        break
                else:
                    held = None
                if held is not None:
                    if free:
                        append(("f", held.handle))
                        planned -= 1
                    else:
                        append(("l", held.handle))
                    continue
            if free or op == "l":
                op = "u"  # nothing fit: alloc_user
            append(("a", op, size(), handle))
            handle += 1
            planned += 1
        self.next_handle = handle
        return ("b", toks, len(toks) - releases)
