"""A load-test client process: drives one context of the daemon and checks its own buffers.

Run by the runner as ``python -m poolsvc.load.worker SPEC_JSON``; it talks
to the daemon only through ``poolsvc.connect(path)`` (the public client
API), and to the runner only through its stdout, one JSON object per line:

- ``{"k": "ready", "pid": ..., "pool": ...}`` once connected;
- ``{"k": "tick", ...}`` every ``tick`` seconds: operation counts, errors by
  type, latency histograms and violations *since the previous line*;
- ``{"k": "exit", ...}`` the last delta, after every buffer was freed.

What it checks (each failure is a *violation* line, never an exception):

- every buffer it allocates or registers gets a pattern naming its owner
  (slot, generation, handle): the whole buffer for single operations, the
  first and last 16 bytes for batched ones; before each free the pattern is
  read back, and ``invoke`` has the secure world's SHA-256 app hash the
  buffer and compares the digest with the pattern's.  Bytes written by
  another client mean one physical frame had two owners;
- in the dynamic pool, no page address of a new buffer belongs to one of its
  own live buffers;
- ``lookup`` by id gives back the same buffer.

Generation: with ``replay`` empty, the worker draws operations from the mix
(seeded ``random.Random``) as tuples and, with ``trace`` set, writes each one
as a trace line (:mod:`poolsvc.load.trace`: ``format_op``; text is made only
then).  With ``replay`` set it parses that file's lines into the same tuples
(``parse_op``) and runs them instead, skipping those whose buffer does not exist here (an
allocation that failed under this configuration), and with
``replay_end == "kill"`` SIGKILLs itself after the last line, as the
recorded process was.

Concurrency: one thread.  Bounded: the loop ends at ``deadline`` (wall
clock) or after ``ops`` operations, whichever is first; a lost connection
ends it at once (exit status 3).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import signal
import struct
import sys
import time
from bisect import bisect_right
from typing import Any

from ..constants import PAGE_SIZE
from ..errors import Closed, NotSupported, OutOfMemory, PoolsvcError
from .histogram import Histogram
from .mix import BATCHABLE, REGION_SIZE, OpMix, SizeDist
from .trace import format_op, parse_op

TAG = struct.Struct("<4sHHQ")
TAG_MAGIC = b"PLDT"
KIND_OPS = {"u": "alloc_user", "k": "alloc_kernel", "p": "alloc_priv",
            "U": "register_user", "K": "register_kernel"}
ALLOC_KINDS = {"alloc_user": "u", "alloc_kernel": "k", "alloc_priv": "p"}
EXIT_LOST = 3
Op = tuple  # an operation tuple, see poolsvc.load.trace


def page_addresses(shm: Any) -> Any:
    """The physical address of each page of ``shm``, as ints: the values of
    ``shm.pages``, without building its numpy array when the buffer is one
    run (``Shm.page_run``)."""
    run = shm.page_run
    if run is not None:
        first, count = run
        return range(first, first + count * PAGE_SIZE, PAGE_SIZE)
    return shm.pages.tolist()


class Held:
    """One buffer this worker holds: the Shm and what it must contain.

    ``head``/``tail``: the 16 bytes the owner wrote at each end (both
    patterns), kept so that a check does not rebuild them; ``index``: the
    buffer's place in ``Worker.live_list``; ``busy``: the number of the
    batch being generated that already uses it.
    """

    __slots__ = ("shm", "kind", "size", "handle", "full", "view", "region", "extra_refs",
                 "index", "busy", "head", "tail", "pages")

    def __init__(self, shm: Any, kind: str, size: int, handle: int, region: int = -1) -> None:
        self.shm = shm
        self.kind = kind
        self.size = size
        self.handle = handle
        self.full = False
        self.view: Any = None
        self.region = region
        self.extra_refs = 0
        self.index = -1
        self.busy = 0
        self.head = self.tail = b""
        self.pages: Any = ()


class Worker:
    """One client of the daemon: the operations, their timing and their checks."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import poolsvc

        self.spec = spec
        self.slot = int(spec["slot"])
        self.gen = int(spec["gen"])
        self.rng = random.Random(f"{spec['seed']}/{self.slot}/{self.gen}")
        self.mix = OpMix.parse(spec["mix"])
        self.size = SizeDist.parse(spec["sizes"]).sampler(self.rng)
        self.batch_size = int(spec["batch"])
        self.max_live = int(spec["max_live"])
        self.exhaust = bool(spec["exhaust"])
        self.deadline = float(spec["deadline"])
        self.budget = int(spec["ops"]) or (1 << 62)
        self.tick_s = float(spec.get("tick", 0.25))
        self.out = sys.stdout
        # figures since the previous report line
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.hists: dict[str, Histogram] = {}
        self.violations: list[str] = []
        self.done = 0
        self.skipped = 0
        self.unverified = 0
        # what this worker holds: live[h] is live_list[live[h].index], and
        # pages[pa] == h for each page pa of each live buffer h (dynamic pool, u/k)
        self.live: dict[int, Held] = {}
        self.live_list: list[Held] = []
        self.pages: dict[int, int] = {}
        self.next_handle = 1
        self.pending_release: list[Held] = []
        self.draining = False
        self.serial = 0
        self.trace = None
        if spec.get("trace"):
            from .trace import TraceWriter
            self.trace = TraceWriter(spec["trace"])
        # the daemon
        self.client = poolsvc.connect(spec["socket"], name=f"load-{self.slot}.{self.gen}",
                                      timeout=float(spec.get("timeout", 30)))
        self.ctx = self.client.open_context(f"load-{self.slot}.{self.gen}")
        self.dynamic = self.client.pool == "dynamic"
        self.can_register = bool(self.client.gen_caps & 0x4)
        self.session: Any = None
        self.digest: Any = None
        self.digest_view = None
        self._open_sha256()
        self._open_area()

    # -- set-up ----------------------------------------------------------------------------------
    def _open_sha256(self) -> None:
        from ..tee.ta import Sha256App

        self.session = self.ctx.open_session(Sha256App.UUID)
        self.digest = self.ctx.alloc_kernel_buf(32)
        try:
            self.digest_view = self.digest.view()
        except NotSupported:  # static pool: the digest cannot be read back
            self.digest_view = None

    def _open_area(self) -> None:
        """This worker's own POSIX shm object for registrations, unlinked at once."""
        self.regions = max(4, min(64, self.max_live if not self.exhaust else 64))
        self.free_regions = list(range(self.regions - 1, -1, -1))
        self.area = None
        self.area_fd = -1
        if not self.can_register:
            return
        import posix_ipc

        name = f"/poolsvc-{os.getpid()}-load{self.rng.getrandbits(48):012x}"
        obj = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600,
                                     size=self.regions * REGION_SIZE)
        try:
            obj.unlink()  # section 8: unlink early, so that a SIGKILL leaves nothing in /dev/shm
            self.area = mmap.mmap(obj.fd, self.regions * REGION_SIZE)
            self.area_fd = os.dup(obj.fd)
        finally:
            obj.close_fd()
        self.area_view = memoryview(self.area)

    # -- reporting ----------------------------------------------------------------------------------
    def _time(self, op: str, ns: int, n: int = 1, weight: int = 1) -> None:
        """Count ``n`` operations ``op`` and ``weight`` latencies of ``ns`` each."""
        h = self.hists.get(op)
        if h is None:
            h = self.hists[op] = Histogram()
        h.add(ns, weight)
        self.counts[op] = self.counts.get(op, 0) + n

    def _error(self, op: str, exc: BaseException) -> None:
        key = f"{op}:{type(exc).__name__}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if isinstance(exc, Closed):
            self.violate(f"{op}: connection to the daemon lost: {exc}")
            self.report("tick")
            raise SystemExit(EXIT_LOST)

    def violate(self, text: str) -> None:
        self.violations.append(f"client {self.slot}.{self.gen} (pid {os.getpid()}): {text}")

    def report(self, kind: str) -> None:
        doc = {"k": kind, "t": time.time(), "n": self.counts, "e": self.errors,
               "h": {op: h.to_wire() for op, h in self.hists.items()}, "v": self.violations,
               "live": len(self.live), "skipped": self.skipped, "unverified": self.unverified}
        if self.trace is not None:
            self.trace.flush()
        self.out.write(json.dumps(doc, separators=(",", ":")) + "\n")
        self.out.flush()
        self.counts, self.errors, self.hists, self.violations = {}, {}, {}, []
        self.skipped = self.unverified = 0

    # -- patterns --------------------------------------------------------------------------------
    # A buffer's pattern is its owner's 16-byte tag repeated from byte 0, cut at its
    # size.  Single operations write and check all of it, batched ones its first and
    # last 16 bytes (``Held.head`` and ``Held.tail``, set when written).
    def _tag(self, handle: int) -> bytes:
        return TAG.pack(TAG_MAGIC, self.slot, self.gen & 0xFFFF, handle)

    def _pattern(self, held: Held) -> bytes:
        tag = self._tag(held.handle)
        return (tag * (held.size // 16 + 1))[:held.size]

    def _write(self, held: Held, full: bool) -> None:
        view = held.view
        if view is None:
            return
        size = held.size
        if full or size <= 32:
            view[:size] = self._pattern(held)
            held.full = True
        else:
            tag = self._tag(held.handle)
            phase = size & 15  # the tail starts at size - 16, phase (size - 16) % 16 of the tag
            held.head = tag
            held.tail = tail = (tag + tag)[phase:phase + 16]
            view[:16] = tag
            view[size - 16:size] = tail

    def _verify(self, held: Held, what: str) -> None:
        """Read the pattern back through this process's view; a violation if it changed."""
        view = held.view
        if view is None:
            self.unverified += 1
            return
        size = held.size
        if held.full:  # (tobytes: a memoryview compares bytewise, 100x slower)
            ok = view[:size].tobytes() == self._pattern(held)
        else:
            ok = view[:16] == held.head and view[size - 16:size] == held.tail
        if not ok:
            self.violate(f"{what}: buffer {held.handle} ({KIND_OPS[held.kind]}, {held.size} bytes, "
                         f"cookie {held.shm.cookie:#x}) changed under its owner: "
                         f"{self._whose(bytes(view[:16]))}")

    def _whose(self, head: bytes) -> str:
        magic, slot, gen, handle = TAG.unpack(head)
        if magic != TAG_MAGIC:
            return f"first bytes are {head.hex()}"
        return (f"it now starts with the tag of client {slot}.{gen} buffer {handle} "
                "(one frame, two owners)")

    # -- holding -----------------------------------------------------------------------------------
    def _hold(self, shm: Any, kind: str, size: int, handle: int, region: int = -1,
              full: bool = True) -> Held:
        held = Held(shm, kind, size, handle, region)
        if kind in "UK":  # registered: the pattern was written into our area before
            held.full = True
            held.view = shm.view()
        else:
            try:
                held.view = shm.view()
            except NotSupported:
                held.view = None
            if self.dynamic and kind != "p":
                held.pages = pages = page_addresses(shm)
                owner = self.pages
                for pa in pages:
                    other = owner.get(pa)
                    if other is not None:
                        self.violate(f"page {pa:#x} of new buffer {handle} already belongs to this "
                                     f"client's live buffer {other}")
                    owner[pa] = handle
            self._write(held, full)
        self.live[handle] = held
        held.index = len(self.live_list)
        self.live_list.append(held)
        return held

    def _forget(self, held: Held, pages: bool = True) -> None:
        """Drop ``held`` from the live set; ``pages``: its pages too (else the caller
        gives them up with :meth:`_give_pages`, as a batch does at its free's turn)."""
        if self.live.pop(held.handle, None) is held:
            live_list = self.live_list
            last = live_list.pop()
            if last is not held:
                live_list[held.index] = last
                last.index = held.index
        if pages:
            self._give_pages(held)
        if held.view is not None:
            held.view.release()
            held.view = None
        if held.region >= 0:
            self.free_regions.append(held.region)

    def _give_pages(self, held: Held) -> None:
        """Forget that ``held``'s pages are this client's (those still mapped to it)."""
        handle = held.handle
        owner = self.pages
        for pa in held.pages:
            if owner.get(pa) == handle:
                del owner[pa]

    def _pick(self, need_id: bool = False, no_priv: bool = False, serial: int = -1) -> Held | None:
        """A random live buffer, or None (after 8 draws that did not fit).

        ``need_id``: with an id (lookup); ``no_priv``: not alloc_priv (invoke);
        ``serial``: not already used by the batch being generated.
        """
        live_list = self.live_list
        rnd = self.rng.random
        for _ in range(8):
            n = len(live_list)
            if not n:
                return None
            held = live_list[int(rnd() * n)]
            if held.busy != serial and (not need_id or held.shm.id > 0) and \
                    (not no_priv or held.kind != "p"):
                return held
        return None

    # -- single operations -------------------------------------------------------------------------
    def op_alloc(self, kind: str, size: int, handle: int) -> bool:
        op = KIND_OPS[kind]
        fn = (self.ctx.alloc_user_buf if kind == "u" else self.ctx.alloc_kernel_buf if kind == "k"
              else self.ctx.alloc_priv_buf)
        t0 = time.perf_counter_ns()
        try:
            shm = fn(size)
        except PoolsvcError as exc:
            self._time(op, time.perf_counter_ns() - t0)
            self._error(op, exc)
            if isinstance(exc, OutOfMemory):
                self.draining = True
            return False
        self._time(op, time.perf_counter_ns() - t0)
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
        self.area_view[start:start + size] = (tag * (size // 16 + 1))[:size]
        fn = self.ctx.register_user_buf if kind == "U" else self.ctx.register_kernel_buf
        t0 = time.perf_counter_ns()
        try:
            shm = fn(self.area_view[start:start + size], fd=self.area_fd)
        except PoolsvcError as exc:
            self._time(op, time.perf_counter_ns() - t0)
            self.free_regions.append(region)
            self._error(op, exc)
            if isinstance(exc, OutOfMemory):
                self.draining = True
            return False
        self._time(op, time.perf_counter_ns() - t0)
        self._hold(shm, kind, size, handle, region)
        return True

    def op_free(self, handle: int) -> None:
        held = self.live.get(handle)
        if held is None:
            self.skipped += 1
            return
        self._verify(held, "free")
        self._forget(held)
        t0 = time.perf_counter_ns()
        try:
            held.shm.close()
            for _ in range(held.extra_refs):
                held.shm.close()
        except PoolsvcError as exc:
            self._error("free", exc)
        self._time("free", time.perf_counter_ns() - t0)

    def op_lookup(self, handle: int) -> None:
        held = self.live.get(handle)
        if held is None or held.shm.id <= 0:
            self.skipped += 1
            return
        t0 = time.perf_counter_ns()
        try:
            again = self.ctx.shm_from_id(held.shm.id)
        except PoolsvcError as exc:
            self._time("lookup", time.perf_counter_ns() - t0)
            self._error("lookup", exc)
            return
        self._time("lookup", time.perf_counter_ns() - t0)
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
        t0 = time.perf_counter_ns()
        try:
            self.session.invoke(Sha256App.DIGEST, [RegisteredMemref(held.shm, 0, length, "in"),
                                                   RegisteredMemref(self.digest, 0, 32, "out")])
        except PoolsvcError as exc:
            self._time("invoke", time.perf_counter_ns() - t0)
            self._error("invoke", exc)
            return
        self._time("invoke", time.perf_counter_ns() - t0)
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

    # -- batches -------------------------------------------------------------------------------------
    def op_batch(self, tokens: list[Op]) -> None:
        """Run one BATCH of ``("a", K, SIZE, H)``, ``("f", H)``, ``("l", H)``, ``("x", H)``."""
        b = self.ctx.batch()
        alloc = {"u": b.alloc_user_buf, "k": b.alloc_kernel_buf, "p": b.alloc_priv_buf}
        close = b.close
        live, live_list, owner = self.live, self.live_list, self.pages
        live_get, live_pop, owner_get = live.get, live.pop, owner.get
        plan: list[tuple[Any, ...]] = []  # the alloc tokens themselves, ("f"|"l"|"x", Held)
        append = plan.append
        for tok in tokens:
            code = tok[0]
            if code == "a":
                alloc[tok[1]](tok[2])
                append(tok)
                continue
            held = live_get(tok[1])
            if held is None or (code == "x" and held.extra_refs <= 0) or (code == "l" and held.shm.id <= 0):
                self.skipped += 1
                continue
            if code == "f":
                view = held.view
                if view is None or held.full or view[:16] != held.head or \
                        view[held.size - 16:held.size] != held.tail:
                    self._verify(held, "free")  # (the ends matched: nothing for it to find)
                # Its pages stay this client's until the free's turn in the batch (the
                # results loop below): the daemon runs the operations in order, so an
                # alloc placed before this free must not get them.
                if held.region < 0 and held.view is not None:
                    # self._forget(held, pages=False), inlined for a buffer this worker allocated
                    if live_pop(held.handle, None) is held:
                        last = live_list.pop()
                        if last is not held:
                            live_list[held.index] = last
                            last.index = held.index
                    held.view.release()
                    held.view = None
                else:
                    self._forget(held, pages=False)
                close(held.shm)
                for _ in range(held.extra_refs):
                    close(held.shm)
                append(("f", held))
            elif code == "l":
                b.shm_from_id(held.shm.id)
                append(("l", held))
            elif code == "x":
                held.extra_refs -= 1
                close(held.shm)
                append(("x", held))
        if not plan:
            return
        t0 = time.perf_counter_ns()
        try:
            results = b.run()
        except PoolsvcError as exc:
            for entry in plan:
                if entry[0] == "f":
                    self._give_pages(entry[1])
            self._error("batch", exc)
            return
        ns = time.perf_counter_ns() - t0
        self._time("batch", ns, 0)
        per_op = ns // len(plan)
        nxt = iter(results).__next__
        frees = lookups = 0
        allocs = {"u": 0, "k": 0, "p": 0}
        hold = self._hold
        # what _hold(shm, kind, size, handle, full=False) does, inlined for the common
        # case (a dynamic-pool buffer of more than 32 bytes with a view); else _hold
        pack, slot, gen = TAG.pack, self.slot, self.gen & 0xFFFF
        fast = self.dynamic
        for entry in plan:
            code = entry[0]
            result = nxt()
            if code == "f":
                held = entry[1]
                for _ in range(held.extra_refs):
                    nxt()
                held.extra_refs = 0
                if held.pages:  # the free's turn: its pages may now go to a later alloc
                    handle = held.handle
                    for pa in held.pages:
                        if owner_get(pa) == handle:
                            del owner[pa]
                if isinstance(result, PoolsvcError):
                    self._error("free", result)
                frees += 1
            elif code == "a":
                allocs[entry[1]] += 1
                if isinstance(result, PoolsvcError):
                    self._error(KIND_OPS[entry[1]], result)
                    if isinstance(result, OutOfMemory):
                        self.draining = True
                elif fast and entry[2] > 32:
                    kind, size, handle = entry[1], entry[2], entry[3]
                    try:
                        view = result.view()
                    except NotSupported:
                        hold(result, kind, size, handle, full=False)
                        continue
                    held = Held(result, kind, size, handle)
                    held.view = view
                    if kind != "p":
                        held.pages = pages = page_addresses(result)
                        for pa in pages:
                            if owner_get(pa) is not None:
                                self.violate(f"page {pa:#x} of new buffer {handle} already belongs "
                                             f"to this client's live buffer {owner_get(pa)}")
                            owner[pa] = handle
                    tag = pack(TAG_MAGIC, slot, gen, handle)
                    phase = size & 15
                    held.head = tag
                    held.tail = tail = (tag + tag)[phase:phase + 16]
                    view[:16] = tag
                    view[size - 16:size] = tail
                    live[handle] = held
                    held.index = len(live_list)
                    live_list.append(held)
                else:
                    hold(result, entry[1], entry[2], entry[3], full=False)
            elif code == "l":
                lookups += 1
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
            elif isinstance(result, PoolsvcError):  # x: the release of a lookup's reference
                self._error("free", result)
        # one histogram entry per operation kind: each operation's latency is per_op
        if frees:
            self._time("free", per_op, frees, frees)
        if lookups:
            self._time("lookup", per_op, lookups, lookups)
        for kind, n in allocs.items():
            if n:
                self._time(KIND_OPS[kind], per_op, n, n)

    # -- generation ------------------------------------------------------------------------------
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
            if self.exhaust or len(self.live) > 0:
                victims = [h for h in list(self.live) if self.rng.random() < 0.5] or list(self.live)[:1]
                releases: list[Op] = [("x", h.handle) for h in self.pending_release]
                self.pending_release = []
                ops: list[Op]
                if self.batch_size > 1:
                    toks = releases + [("f", h) for h in victims]
                    ops = []
                    for i in range(0, len(toks), self.batch_size):
                        part = toks[i:i + self.batch_size]
                        ops.append(("b", part, sum(t[0] != "x" for t in part)))
                else:
                    ops = [("f", h) for h in victims]
                if ops:  # nothing held (every buffer already freed): draw from the mix
                    return ops
        op = choose()
        if self.batch_size > 1 and op in BATCHABLE and choose_batch:
            return [self._gen_batch(choose_batch)]
        return [self._gen_single(op)]

    def _full(self) -> bool:
        return not self.exhaust and len(self.live) >= self.max_live

    def _gen_single(self, op: str) -> Op:
        if op == "free" or (self._full() and op != "invoke" and op != "lookup"):
            held = self._pick()
            if held is not None:
                return ("f", held.handle)
            op = "alloc_user"
        if op.startswith("alloc"):
            return self._gen_alloc(op)
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

        A buffer appears at most once among a batch's frees and lookups
        (``Held.busy``): a free later in the batch would run first locally.
        """
        toks: list[Op] = [("x", h.handle) for h in self.pending_release]
        self.pending_release = []
        self.serial = serial = self.serial + 1
        # each operation's token code: "f", "l", or the kind of an alloc ("u", "k", "p")
        codes = [{"free": "f", "lookup": "l"}.get(n) or ALLOC_KINDS[n] for n in choose_batch.names]
        codes.append(codes[-1])  # random() * total rounded up to total: the last one
        cum, total = choose_batch.cum, choose_batch.total
        rnd = self.rng.random
        size = self.size
        live_list = self.live_list
        append = toks.append
        bounded = not self.exhaust
        max_live = self.max_live
        planned = len(self.live)
        handle = self.next_handle
        for _ in range(self.batch_size):
            op = codes[bisect_right(cum, rnd() * total)]
            free = op == "f" or (bounded and planned >= max_live and op != "l")
            if free or op == "l":
                # self._pick(need_id=not free, serial=serial), inlined (the hot path)
                n = len(live_list)  # (constant here: frees take effect when the batch runs)
                for _ in range(8 if n else 0):
                    held = live_list[int(rnd() * n)]
                    if held.busy != serial and (free or held.shm.id > 0):
                        break
                else:  # nothing fit: allocate instead
                    held = None
                if held is not None:
                    held.busy = serial
                    if free:
                        append(("f", held.handle))
                        planned -= 1
                    else:
                        append(("l", held.handle))
                    continue
                op = "u"  # nothing fit: alloc_user
            append(("a", op, size(), handle))
            handle += 1
            planned += 1
        self.next_handle = handle
        return ("b", toks, len(toks) - sum(1 for t in toks if t[0] == "x"))

    # -- running ---------------------------------------------------------------------------------
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
        elif code == "l":
            self.op_lookup(op[1])
        elif code == "i":
            self.op_invoke(op[1])
        elif code == "r":
            self.op_register(op[1], op[2], op[3], op[4])
        return 1

    def run_line(self, line: str) -> int:
        """Run one trace line; returns the operations it stands for."""
        return self.run_op(parse_op(line))

    def run(self) -> int:
        self.out.write(json.dumps({"k": "ready", "pid": os.getpid(), "pool": self.client.pool}) + "\n")
        self.out.flush()
        next_tick = time.monotonic() + self.tick_s
        replay = self.spec.get("replay")
        if replay:
            with open(replay, encoding="ascii") as fh:
                replayed = iter([parse_op(line) for line in fh if line.strip()])
        else:
            choose = self.mix.chooser(self.rng, None if not self.exhaust else
                                      frozenset(o for o, _ in self.mix.weights if o != "free"))
            if not choose:
                choose = self.mix.chooser(self.rng)
            choose_batch = self.mix.chooser(self.rng, BATCHABLE if not self.exhaust else
                                            BATCHABLE - {"free"})
            replayed = None
        queue: list[Op] = []
        trace = self.trace
        while self.done < self.budget:
            if replayed is not None:
                op = next(replayed, None)
                if op is None:
                    break
            else:
                if time.time() >= self.deadline:
                    break
                if not queue:
                    queue = self.generate(choose, choose_batch)
                    queue.reverse()
                op = queue.pop()
                if trace is not None:
                    trace.add(format_op(op))
            self.done += self.run_op(op)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self.tick_s
                self.report("tick")
        if replay and self.spec.get("replay_end") == "kill":
            self.report("tick")
            os.kill(os.getpid(), signal.SIGKILL)
        self.finish()
        return 0

    def finish(self) -> None:
        """Free everything (verifying each buffer), close the session, hang up, report."""
        for held in self.pending_release:
            if held.extra_refs > 0 and held.handle in self.live:
                held.extra_refs -= 1
                held.shm.close()
        self.pending_release = []
        for handle in list(self.live):
            self.op_free(handle)
        try:
            if self.session is not None:
                self.session.close()
            if self.digest is not None:
                if self.digest_view is not None:
                    self.digest_view.release()
                self.digest.close()
            self.ctx.close()
            self.client.close()
        except PoolsvcError as exc:
            self._error("close", exc)
        if self.area is not None:
            self.area_view.release()
            self.area.close()
            os.close(self.area_fd)
        self.report("exit")
        if self.trace is not None:
            self.trace.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        worker = Worker(spec)
    except PoolsvcError as exc:
        sys.stdout.write(json.dumps({"k": "tick", "t": time.time(), "n": {}, "e": {}, "h": {},
                                     "v": [f"client {spec.get('slot')}.{spec.get('gen')} could not "
                                           f"start: {type(exc).__name__}: {exc}"],
                                     "live": 0, "skipped": 0, "unverified": 0}) + "\n")
        sys.stdout.flush()
        return EXIT_LOST
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
