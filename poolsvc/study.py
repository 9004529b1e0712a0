"""The contiguous-vs-scattered study behind ``poolsvc bench``.

For each fragmentation level (a seeded, reproducible ageing workload run on a
fresh System's dynamic RAM) and each buffer size, three strategies get memory
for the secure world:

``contiguous``  ``alloc_user_buf`` on a TEE with DYNAMIC_SHM: physically
                contiguous frames (``alloc_pages_exact`` semantics, at most
                ``1 << max_contig_order`` pages), registered with a page list;
``static``      ``alloc_user_buf`` on a TEE without DYNAMIC_SHM: a range of
                the reserved carve-out (genalloc first-fit), no registration;
``scattered``   ``register_user_buf`` of a POSIX shm buffer: single frames
                wherever they are free, a page list, REGISTER_SHM.

Per (level, size, strategy) it makes ``trials`` attempts and holds the last
successes in a FIFO window of a quarter of dynamic RAM (``dynamic_size // 4``
bytes: e.g. 64 buffers of 4 MiB on 1 GiB), as a workload that keeps buffers
alive would; the failure rate is the fraction of attempts refused, so it
measures how many buffers of that size the aged memory can hold at once.

Beside the measured times (allocation latency p50/p99, the page-list +
REGISTER_SHM set-up, the secure world's SHA-256 over the buffer) each cell
reports what the mechanism costs a real system, counted on every success:
frames taken, contiguous runs (scatterlist segments), kernel pages and the
bytes wasted rounding to them, page-list pages and bytes, messages to the
secure world per buffer lifetime (alloc + close) and pages pinned.  Those
counts transfer to hardware; the times are this model's.

Kernel page size (``page_size``: 4, 16 or 64 KiB, :mod:`poolsvc.kernelpages`).
With 4 KiB pages every strategy goes through the System's API as above.  With
larger pages a buffer is rounded to whole kernel pages and each kernel page is
a naturally aligned run of 4 or 16 frames; the page list still holds one
4 KiB entry per frame.  The dynamic strategies are then modelled at the
driver: ``contiguous`` takes one aligned run of kernel pages
(``KernelPageAllocator.alloc_exact``, up to arm64's MAX_ORDER for that page
size), ``scattered`` single kernel pages wherever an aligned block is free
(``alloc_pages``), both from the System's dynamic frames, then the 4 KiB page
list and REGISTER_SHM through the driver (UNREGISTER_SHM and the frames back
at close).  No storage is mapped to those frames, so those cells have no
SHA-256 figure, and their times leave out the storage bookkeeping of the API
path.  ``static`` stays ``alloc_user_buf``, of the size rounded to kernel
pages.

The static pool is also measured through the daemon
(:mod:`poolsvc.studypool`): alloc + close times and where it runs out, for
one client and for the pool, beside the same figures embedded.

Fragmentation: :class:`poolsvc.fragmentation.Ageing`, seeded, runs once on a
scratch frame allocator the size of dynamic RAM, level after level, until the
unusable free space index at order ``INDEX_ORDER`` (64 KiB) reaches each
level's target; each System then gets that layout (``copy_layout``).  Levels
are reported as the index reached.

Formatting (table, legend, summary, Markdown) is in :mod:`poolsvc.studyreport`;
plots in :mod:`poolsvc.plots`.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import kernelpages, pagelist
from ._backend import BACKEND, core
from .config import Config
from .constants import PAGE_SIZE, ShmFlags
from .errors import InternalError, PoolsvcError
from .fragmentation import INDEX_ORDER, Ageing, copy_layout, unusable_indices
from .histogram import percentiles_us
from .kernelpages import KernelPageAllocator
from .studypool import StaticFigure, measure_static_pool

if TYPE_CHECKING:  # pragma: no cover
    from .system import System

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Level:
    """One fragmentation level: the ageing runs until the index at ``INDEX_ORDER`` reaches ``target``."""

    name: str
    target: float


LEVELS = [
    Level("fresh", 0.0),
    Level("light", 0.10),
    Level("moderate", 0.50),
    Level("heavy", 0.90),
    Level("severe", 0.99),
]
SIZES = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]
QUICK_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]
QUICK_LEVELS = ["fresh", "moderate", "severe"]
STRATEGIES = ["contiguous", "static", "scattered"]
DEFAULT_TRIALS, QUICK_TRIALS = 400, 20


@dataclass
class Result:
    """One cell: a strategy at one size and fragmentation level.

    Times are medians/percentiles of the successes (µs); mechanism counts are
    medians over the successes (None when every attempt failed).
    """

    level: str
    size: int
    strategy: str
    trials: int
    failures: int
    p50_us: float | None
    p99_us: float | None
    setup_us: float | None  # page list + REGISTER_SHM as the driver does it, median
    access_mb_s: float | None  # the secure world's SHA-256 over the first buffer
    max_live: int  # most buffers held at once (the FIFO window caps it)
    frames: int | None  # frames the buffer takes
    segments: int | None  # contiguous runs = scatterlist entries
    longest_run_pages: int | None
    list_pages: int | None  # OP-TEE page-list pages built for REGISTER_SHM
    messages: int | None  # messages to the secure world per buffer (alloc + close)
    pinned_pages: int | None  # user kernel pages pinned while registered
    kernel_pages: int | None = None  # kernel pages the buffer takes (= frames with 4 KiB pages)
    waste_bytes: int | None = None  # bytes taken beyond the size asked: rounding to kernel pages
    failure_reason: str | None = None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.trials if self.trials else 0.0

    @property
    def list_bytes(self) -> int | None:
        return None if self.list_pages is None else self.list_pages * PAGE_SIZE


@dataclass
class LevelMetrics:
    level: str
    target: float
    index: float  # unusable free space index at INDEX_ORDER, as reached
    free_frames: int
    largest_free_run: int
    unusable_index: list[float]
    free_blocks_per_order: list[int]
    ageing_steps: int


@dataclass
class Report:
    machine: dict[str, Any]
    params: dict[str, Any]
    levels: list[LevelMetrics] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    static_pool: list[StaticFigure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from .studyreport import LEGEND, summary_lines

        results: list[dict[str, Any]] = []
        for r in self.results:
            d = asdict(r)
            d["failure_rate"] = r.failure_rate
            d["list_bytes"] = r.list_bytes
            results.append(d)
        return {"machine": self.machine, "params": self.params, "legend": LEGEND,
                "levels": [asdict(x) for x in self.levels], "results": results,
                "static_pool": [asdict(f) for f in self.static_pool],
                "summary": summary_lines(self)}

    @property
    def page_size(self) -> int:
        """The kernel page size the study modelled."""
        return int(self.params.get("page_size", PAGE_SIZE))

    def level(self, name: str) -> LevelMetrics:
        return next(lv for lv in self.levels if lv.level == name)

    def cell(self, level: str, size: int, strategy: str) -> Result | None:
        for r in self.results:
            if r.level == level and r.size == size and r.strategy == strategy:
                return r
        return None


def machine_description() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "backend": BACKEND, "numpy": np.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def age_levels(levels: list[Level], dynamic_size: int, seed: int,
               base_pa: int) -> list[tuple[Level, np.ndarray, int]]:
    """Run the ageing workload through ``levels`` (sorted by target) on a scratch allocator.

    Returns ``(level, used frame map, ageing steps so far)`` per level.
    """
    frames = core.FrameAllocator(base_pa, dynamic_size // PAGE_SIZE, 10)
    ageing = Ageing(frames, np.random.default_rng(seed))
    out = []
    for level in sorted(levels, key=lambda lv: lv.target):
        if level.target > 0:
            ageing.run_until(level.target)
        out.append((level, frames.used_map().copy(), ageing.steps))
    return out


@dataclass
class _Held:
    """One success: how to release it and what it costs the mechanism."""

    release: Callable[[], None]
    shm: Any  # the Shm (API path), None for a buffer modelled at the driver
    frames: int
    segments: int
    longest_run_pages: int
    kernel_pages: int
    waste: int
    list_pages: int
    pinned: int


class _Buffers:
    """Gets one strategy's buffers from one System: ``acquire(size, trial)`` -> :class:`_Held`.

    With 4 KiB kernel pages, or for the static pool, through the context's API;
    with larger pages, the dynamic strategies are modelled at the driver (see
    the module doc).  Raises PoolsvcError when the buffer is refused.
    """

    def __init__(self, system: System, ctx: Any, strategy: str, page_size: int,
                 client_buf: Any, window: Callable[[int], int]) -> None:
        self.system, self.ctx, self.strategy = system, ctx, strategy
        self.page_size = page_size
        self.client_buf = client_buf
        self.window = window
        self.model = page_size > PAGE_SIZE and strategy != "static"
        self.kernel = KernelPageAllocator(system.dynamic, page_size) if self.model else None
        self.cookies = itertools.count(_MODEL_COOKIES)

    def acquire(self, size: int, trial: int) -> _Held:
        if self.model:
            return self._modelled(size)
        asked = kernelpages.rounded(size, self.page_size)
        if self.strategy == "scattered":
            # each held buffer gets its own pages of the client object
            start = (trial % self.window(size)) * size
            shm = self.ctx.register_user_buf(self.client_buf[start:start + size])
        else:
            shm = self.ctx.alloc_user_buf(asked)
        registered = bool(shm.flags & ShmFlags.DYNAMIC)
        npages = len(shm.pages)
        run = shm.page_run
        segs = [(run[0], run[1] * PAGE_SIZE)] if run is not None else pagelist.segments(shm.pages)
        taken = npages * PAGE_SIZE
        return _Held(shm.close, shm, npages, len(segs), _longest_run(segs), taken // self.page_size,
                     taken - size, pagelist.list_pages_needed(npages) if registered else 0,
                     npages if shm.flags & ShmFlags.USER_MAPPED else 0)

    def _modelled(self, size: int) -> _Held:
        """A dynamic buffer of kernel pages above 4 KiB: frames, page list, REGISTER_SHM."""
        kernel, driver = self.kernel, self.system.driver
        assert kernel is not None
        count = -(-size // self.page_size)
        nframes = count * kernel.per
        cookie = next(self.cookies)
        if self.strategy == "scattered":
            kpages = kernel.alloc_pages(count)
            frames = kernelpages.list_entries(kpages, self.page_size)
            try:
                driver.register(frames, 0, size, cookie)
            except BaseException:
                kernel.free_pages(kpages)
                raise
            segs = pagelist.segments(frames)

            def release() -> None:
                driver.unregister(cookie)
                kernel.free_pages(kpages)
            pinned = count
        else:
            pa = kernel.alloc_exact(count)
            try:
                driver.register_run(pa, nframes, size, cookie)
            except BaseException:
                kernel.free_exact(pa, count)
                raise
            segs = [(pa, nframes * PAGE_SIZE)]

            def release() -> None:
                driver.unregister(cookie)
                kernel.free_exact(pa, count)
            pinned = 0
        return _Held(release, None, nframes, len(segs), _longest_run(segs), count,
                     count * self.page_size - size, pagelist.list_pages_needed(nframes), pinned)

    def warm_up(self, hold_bytes: int) -> None:
        """Grow the context's storage once and run a few hundred untimed operations, so
        that the first level measured does not also pay for cold caches and lazily
        built state.  (Storage growth is the model's cost, not the kernel's: frames
        are identities.)"""
        if self.strategy == "contiguous" and not self.model:
            self.ctx.arena.reserve(hold_bytes + (4 << 20))
        for trial in range(300):
            self.acquire(PAGE_SIZE, trial).release()


#: Cookies of the buffers modelled at the driver: far above the System's own.
_MODEL_COOKIES = 1 << 48

def _sha256_secure(ctx: Any, session: Any, digest: Any, shm: Any) -> float:
    """Seconds for the secure world's SHA-256 app to hash the whole buffer.

    The app reads the buffer through the frame table (zero-copy spans of
    storage); the digest is checked against hashlib on the normal-world view.
    """
    from .tee.driver import RegisteredMemref

    t0 = time.perf_counter()
    session.invoke(0, [RegisteredMemref(shm, 0, shm.size, "in"),
                       RegisteredMemref(digest, 0, 32, "out")])
    secs = time.perf_counter() - t0
    if bytes(digest.view()[:32]) != hashlib.sha256(shm.view()).digest():
        raise InternalError("the secure world's SHA-256 differs from hashlib's")
    return secs


def _longest_run(segments: list[tuple[int, int]]) -> int:
    return max((length for _, length in segments), default=0) // PAGE_SIZE


def _median(values: list[int]) -> int | None:
    return int(np.median(values)) if values else None


def _measure(system: System, buffers: _Buffers, size: int, trials: int,
             tee: tuple[Any, Any], level: str, hold_bytes: int) -> Result:
    """``trials`` attempts, holding the last ``hold_bytes // size`` successes (FIFO)."""
    stats = system.tee.stats
    lat: list[float] = []
    setup: list[float] = []
    costs: list[_Held] = []
    messages = 0
    failures = 0
    reason = None
    access = None
    held: list[_Held] = []
    max_live = 0
    window = max(1, hold_bytes // size)
    try:
        for trial in range(trials):
            if len(held) >= window:
                calls = stats.calls
                held.pop(0).release()
                messages += stats.calls - calls
            calls = stats.calls
            t0 = time.perf_counter()
            try:
                got = buffers.acquire(size, trial)
            except PoolsvcError as exc:
                failures += 1
                reason = f"{type(exc).__name__}: {exc}"
                continue
            lat.append(time.perf_counter() - t0)
            messages += stats.calls - calls
            if got.list_pages:
                setup.append(system.driver.last_register_seconds)
            costs.append(got)
            if access is None and got.shm is not None:
                secs = _sha256_secure(buffers.ctx, tee[0], tee[1], got.shm)
                access = size / secs / 1e6 if secs > 0 else None
            held.append(got)
            max_live = max(max_live, len(held))
        calls = stats.calls
        while held:
            held.pop(0).release()
        messages += stats.calls - calls
    finally:
        for got in held:
            got.release()

    def pct(values: list[float], q: float) -> float | None:
        return percentiles_us(values, (q / 100,))[0] if values else None

    def med(name: str) -> int | None:
        return _median([getattr(c, name) for c in costs])

    ok = len(lat)
    return Result(level, size, buffers.strategy, trials, failures, pct(lat, 50), pct(lat, 99),
                  pct(setup, 50), access, max_live, med("frames"), med("segments"),
                  med("longest_run_pages"), med("list_pages"), round(messages / ok) if ok else None,
                  med("pinned"), med("kernel_pages"), med("waste"), reason if failures else None)


def run_study(*, sizes: list[int] | None = None, levels: list[Level] | None = None,
              trials: int = DEFAULT_TRIALS, seed: int = 1, dynamic_size: int = 1 << 30,
              page_size: int = PAGE_SIZE, static_daemon: bool = True, transport: str = "shm",
              progress: Callable[[str], None] | None = None) -> Report:
    """Run the study; ``progress(label)`` is called once per finished cell.

    ``page_size``: the kernel page size, 4, 16 or 64 KiB (BadParameters
    otherwise); ``static_daemon``: also measure the static pool through a
    ``poolsvc serve`` subprocess on ``transport`` (:mod:`poolsvc.studypool`).
    """
    from .system import System  # the CLI imports this module to build --help: keep that light
    from .tee.ta import Sha256App

    kernelpages.check_page_size(page_size)
    sizes = sizes or SIZES
    levels = sorted(levels or LEVELS, key=lambda lv: lv.target)
    base = Config().dynamic_base
    static_size = Config().static_size
    report = Report(machine_description(),
                    {"sizes": sizes, "levels": [asdict(lv) for lv in levels], "trials": trials,
                     "seed": seed, "dynamic_size": dynamic_size, "strategies": STRATEGIES,
                     "index_order": INDEX_ORDER, "static_size": static_size, "page_size": page_size,
                     "static_daemon_transport": transport if static_daemon else None})
    max_size = max(sizes)
    hold_bytes = dynamic_size // 4
    client = shared_memory.SharedMemory(create=True, size=max(max_size, hold_bytes))
    try:
        for level, layout, steps in age_levels(levels, dynamic_size, seed, base):
            for strategy in STRATEGIES:
                cfg = Config(dynamic_size=dynamic_size, dynamic_shm=strategy != "static",
                             arena_step=64 * MiB)
                with System(cfg) as system:
                    copy_layout(layout, system.dynamic)
                    if strategy == "contiguous":
                        blocks = system.dynamic.free_blocks_per_order()
                        indices = unusable_indices(blocks)
                        report.levels.append(LevelMetrics(
                            level.name, level.target, indices[INDEX_ORDER], system.dynamic.free_frames,
                            system.dynamic.largest_free_run, indices, [int(b) for b in blocks], steps))
                    ctx = system.open_context(f"{strategy}-{level.name}")
                    buffers = _Buffers(system, ctx, strategy, page_size, client.buf,
                                       lambda size: max(1, hold_bytes // size))
                    buffers.warm_up(hold_bytes)
                    session = ctx.open_session(Sha256App.UUID)
                    digest = ctx.alloc_kernel_buf(32)
                    for size in sizes:
                        res = _measure(system, buffers, size, trials, (session, digest), level.name,
                                       hold_bytes)
                        report.results.append(res)
                        if progress:
                            progress(f"{level.name} {strategy} {human_size(size)}")
                    ctx.close()
    finally:
        client.close()
        client.unlink()
    if static_daemon:
        pool_sizes = sorted({kernelpages.rounded(s, page_size) for s in sizes if s <= static_size})
        report.static_pool = measure_static_pool(pool_sizes, trials, static_size, transport)
        if progress:
            progress("static pool through the daemon")
    return report


def human_size(n: int) -> str:
    """``4 KiB``, ``1 MiB``, ``1023.9 MiB``: whole units where exact, else MiB to one decimal."""
    if n >= MiB:
        return f"{n // MiB} MiB" if n % MiB == 0 else f"{n / MiB:.1f} MiB"
    return f"{n // KiB} KiB"
