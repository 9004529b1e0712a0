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
frames taken, contiguous runs (scatterlist segments), page-list pages and
bytes, messages to the secure world per buffer lifetime (alloc + close) and
pages pinned.  Those counts transfer to hardware; the times are this model's.

Fragmentation: :class:`poolsvc.fragmentation.Ageing`, seeded, runs once on a
scratch frame allocator the size of dynamic RAM, level after level, until the
unusable free space index at order ``INDEX_ORDER`` (64 KiB) reaches each
level's target; each System then gets that layout (``copy_layout``).  Levels
are reported as the index reached.

Formatting (table, legend, summary, Markdown) is in this module; plots in
:mod:`poolsvc.plots`.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import pagelist
from ._backend import BACKEND, core
from .config import Config
from .constants import PAGE_SIZE, ShmFlags
from .errors import InternalError, PoolsvcError
from .fragmentation import INDEX_ORDER, Ageing, copy_layout, unusable_indices

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
    pinned_pages: int | None  # user pages pinned while registered
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

    def to_json(self) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        for r in self.results:
            d = asdict(r)
            d["failure_rate"] = r.failure_rate
            d["list_bytes"] = r.list_bytes
            results.append(d)
        return {"machine": self.machine, "params": self.params, "legend": LEGEND,
                "levels": [asdict(x) for x in self.levels], "results": results,
                "summary": summary_lines(self)}

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


def _warm_up(ctx: Any, strategy: str, client_buf: Any, hold_bytes: int) -> None:
    """Grow the context's storage once, so no measured trial pays for pre-faulting it.

    (Storage growth is the model's cost, not the kernel's: frames are identities.)
    """
    if strategy == "contiguous":
        ctx.arena.reserve(hold_bytes + (4 << 20))
    # a few hundred untimed operations, so that the first level measured does not
    # also pay for cold caches and lazily built state
    for _ in range(300):
        if strategy == "scattered":
            ctx.register_user_buf(client_buf[:4096]).close()
        else:
            ctx.alloc_user_buf(4096).close()


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


def _measure(system: System, ctx: Any, strategy: str, size: int, trials: int,
             client_buf: Any, tee: tuple[Any, Any], level: str, hold_bytes: int) -> Result:
    """``trials`` attempts, holding the last ``hold_bytes // size`` successes (FIFO)."""
    stats = system.tee.stats
    lat: list[float] = []
    setup: list[float] = []
    frames: list[int] = []
    segments: list[int] = []
    longest: list[int] = []
    list_pages: list[int] = []
    pinned: list[int] = []
    messages = 0
    failures = 0
    reason = None
    access = None
    held: list[Any] = []
    max_live = 0
    window = max(1, hold_bytes // size)
    try:
        for trial in range(trials):
            if len(held) >= window:
                calls = stats.calls
                held.pop(0).close()
                messages += stats.calls - calls
            calls = stats.calls
            t0 = time.perf_counter()
            try:
                if strategy == "scattered":
                    # each held buffer gets its own pages of the client object
                    start = (trial % window) * size
                    shm = ctx.register_user_buf(client_buf[start:start + size])
                else:
                    shm = ctx.alloc_user_buf(size)
            except PoolsvcError as exc:
                failures += 1
                reason = f"{type(exc).__name__}: {exc}"
                continue
            lat.append(time.perf_counter() - t0)
            messages += stats.calls - calls
            registered = bool(shm.flags & ShmFlags.DYNAMIC)
            npages = len(shm.pages)
            if registered:
                setup.append(system.last_register_seconds)
            run = shm.page_run
            segs = [(run[0], run[1] * PAGE_SIZE)] if run is not None else pagelist.segments(shm.pages)
            frames.append(npages)
            segments.append(len(segs))
            longest.append(_longest_run(segs))
            list_pages.append(pagelist.list_pages_needed(npages) if registered else 0)
            pinned.append(npages if shm.flags & ShmFlags.USER_MAPPED else 0)
            if access is None:
                secs = _sha256_secure(ctx, tee[0], tee[1], shm)
                access = size / secs / 1e6 if secs > 0 else None
            held.append(shm)
            max_live = max(max_live, len(held))
        calls = stats.calls
        for shm in held:
            shm.close()
        messages += stats.calls - calls
        held = []
    finally:
        for shm in held:
            shm.close()

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(np.array(values) * 1e6, q)) if values else None

    ok = len(lat)
    return Result(level, size, strategy, trials, failures, pct(lat, 50), pct(lat, 99), pct(setup, 50),
                  access, max_live, _median(frames), _median(segments), _median(longest),
                  _median(list_pages), round(messages / ok) if ok else None, _median(pinned),
                  reason if failures else None)


def run_study(*, sizes: list[int] | None = None, levels: list[Level] | None = None,
              trials: int = DEFAULT_TRIALS, seed: int = 1, dynamic_size: int = 1 << 30,
              progress: Callable[[str], None] | None = None) -> Report:
    """Run the study; ``progress(label)`` is called once per finished cell."""
    from .system import System  # the CLI imports this module to build --help: keep that light
    from .tee.ta import Sha256App

    sizes = sizes or SIZES
    levels = sorted(levels or LEVELS, key=lambda lv: lv.target)
    base = Config().dynamic_base
    report = Report(machine_description(),
                    {"sizes": sizes, "levels": [asdict(lv) for lv in levels], "trials": trials,
                     "seed": seed, "dynamic_size": dynamic_size, "strategies": STRATEGIES,
                     "index_order": INDEX_ORDER, "static_size": Config().static_size})
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
                    _warm_up(ctx, strategy, client.buf, hold_bytes)
                    session = ctx.open_session(Sha256App.UUID)
                    digest = ctx.alloc_kernel_buf(32)
                    for size in sizes:
                        res = _measure(system, ctx, strategy, size, trials, client.buf,
                                       (session, digest), level.name, hold_bytes)
                        report.results.append(res)
                        if progress:
                            progress(f"{level.name} {strategy} {human_size(size)}")
                    ctx.close()
    finally:
        client.close()
        client.unlink()
    return report


def human_size(n: int) -> str:
    """``4 KiB``, ``1 MiB``, ``1023.9 MiB``: whole units where exact, else MiB to one decimal."""
    if n >= MiB:
        return f"{n // MiB} MiB" if n % MiB == 0 else f"{n / MiB:.1f} MiB"
    return f"{n // KiB} KiB"


def level_label(lv: LevelMetrics) -> str:
    """``moderate (index 0.50)``: a level's name and the index it reached."""
    return f"{lv.level} (index {lv.index:.2f})"


#: What each column means (printed above the table, saved in the JSON and the report).
LEGEND: dict[str, str] = {
    "level": f"fragmentation level; index = unusable free space index at order {INDEX_ORDER} "
             f"({(PAGE_SIZE << INDEX_ORDER) // KiB} KiB): the fraction of free memory that cannot serve "
             "such a request (Linux mm/vmstat.c); 0 = fresh, 1 = none can",
    "size": "buffer size requested",
    "strategy": "contiguous = alloc_user_buf from dynamic RAM (alloc_pages_exact, then REGISTER_SHM); "
                "static = alloc_user_buf from the reserved carve-out (no registration); "
                "scattered = register_user_buf of the caller's pages (page list, REGISTER_SHM)",
    "p50/p99 us": "allocation (or registration) latency of the successful attempts, microseconds, "
                  "this model in Python: compare strategies with each other, not with a kernel",
    "fail": "fraction of attempts refused while the last successes stay alive (a FIFO window "
            "of a quarter of dynamic RAM)",
    "live": "most buffers of that size held at once",
    "frames": "4 KiB frames the buffer takes (median)",
    "segs": "contiguous runs of those frames = scatterlist entries a device would need (median)",
    "list pg": "OP-TEE page-list pages built for REGISTER_SHM (511 entries each; bytes = pages x 4096)",
    "msgs": "messages to the secure world per buffer: REGISTER_SHM at alloc + UNREGISTER_SHM at close",
    "pinned": "user pages pinned while registered (pin_user_pages)",
    "setup us": "page-list build + REGISTER_SHM round trip through the simulated secure world (median)",
    "sha MB/s": "the secure world's SHA-256 app reading the first buffer through the frame table",
    "copied": "bytes copied: none in any cell (embedded, every buffer is shared zero-copy; shadow "
              "copies happen only through the daemon, for memory it cannot share)",
}


def _f(x: float | int | None, fmt: str = "{:.1f}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def format_legend() -> str:
    width = max(len(k) for k in LEGEND)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in LEGEND.items())


def format_levels(report: Report) -> str:
    lines = [f"  {'level':<9} {'index':>6} {'free MiB':>9} {'largest free run':>17} "
             f"{'index@order 10 (4 MiB)':>23}"]
    for lv in report.levels:
        lines.append(f"  {lv.level:<9} {lv.index:>6.2f} {lv.free_frames * PAGE_SIZE / MiB:>9.1f} "
                     f"{human_size(lv.largest_free_run * PAGE_SIZE):>17} {lv.unusable_index[-1]:>23.2f}")
    return "\n".join(lines)


def format_table(report: Report) -> str:
    """The legend, the levels and the results as fixed-width text."""
    lines = ["columns:", format_legend(), "",
             f"fragmentation of dynamic RAM after ageing (index = unusable free space index at "
             f"order {INDEX_ORDER}):", format_levels(report), ""]
    head = (f"{'level':<9} {'index':>5} {'size':>7} {'strategy':<10} {'p50 us':>8} {'p99 us':>8} "
            f"{'fail':>6} {'live':>6} {'frames':>6} {'segs':>6} {'list pg':>7} {'msgs':>4} "
            f"{'pinned':>6} {'setup us':>8} {'sha MB/s':>8}")
    lines += [head, "-" * len(head)]
    index = {lv.level: lv.index for lv in report.levels}
    for r in report.results:
        lines.append(
            f"{r.level:<9} {index.get(r.level, 0.0):>5.2f} {human_size(r.size):>7} {r.strategy:<10} "
            f"{_f(r.p50_us):>8} {_f(r.p99_us):>8} {r.failure_rate:>6.1%} {r.max_live:>6} "
            f"{_f(r.frames, '{:d}'):>6} {_f(r.segments, '{:d}'):>6} {_f(r.list_pages, '{:d}'):>7} "
            f"{_f(r.messages, '{:d}'):>4} {_f(r.pinned_pages, '{:d}'):>6} {_f(r.setup_us):>8} "
            f"{_f(r.access_mb_s, '{:.0f}'):>8}")
    return "\n".join(lines)


def summary_lines(report: Report) -> list[str]:
    """The study's answer, in the mechanism's terms: one sentence per finding."""
    out: list[str] = []
    sizes = sorted({r.size for r in report.results})
    levels = report.levels
    # 1. where contiguous allocation starts failing
    for lv in levels:
        cells = [report.cell(lv.level, s, "contiguous") for s in sizes]
        failing = [c for c in cells if c is not None and c.failures]
        if not failing:
            out.append(f"contiguous at {level_label(lv)}: every size served.")
            continue
        first = failing[0]
        total = [c for c in failing if c.failure_rate == 1.0]
        if total and total[0] is first:
            text = f"contiguous at {level_label(lv)}: refuses every attempt from {human_size(first.size)}"
        else:
            text = (f"contiguous at {level_label(lv)}: starts failing at {human_size(first.size)} "
                    f"({first.failure_rate:.0%} refused)")
            if total:
                text += f", refuses every attempt from {human_size(total[0].size)}"
        if total and total[0].failure_reason and "order" in total[0].failure_reason:
            text += ", above MAX_ORDER as alloc_pages_exact"
        out.append(text + f" (largest free run {human_size(lv.largest_free_run * PAGE_SIZE)}).")
    # 2. what scattered pages cost, at the most fragmented level, against contiguous on a fresh system
    if levels:
        worst, best = levels[-1], levels[0]
        per_size, refused = [], []
        for size in sizes:
            sc = report.cell(worst.level, size, "scattered")
            if sc is None:
                continue
            if sc.frames is None:
                refused.append(f"{human_size(size)} is refused ({sc.failure_reason}): its page list needs "
                               f"{pagelist.list_pages_needed(size // PAGE_SIZE)} contiguous list pages, "
                               f"allocated as Linux does")
                continue
            per_size.append(f"{human_size(size)} = {sc.frames} frame{'s' if sc.frames != 1 else ''} in "
                            f"{sc.segments} run{'s' if sc.segments != 1 else ''}, "
                            f"{sc.list_pages} list page{'s' if sc.list_pages != 1 else ''}, "
                            f"set-up {_f(sc.setup_us)} µs")
        if per_size:
            sample = next((r for r in report.results if r.level == worst.level and r.strategy == "scattered"
                           and r.messages is not None), None)
            fresh = [r for r in report.results if r.level == best.level and r.strategy == "contiguous"
                     and r.setup_us is not None]
            text = (f"scattered at {level_label(worst)}: " + "; ".join(per_size) +
                    f". Every buffer: {sample.messages if sample else 2} messages to the secure world, "
                    f"one pinned page per frame, 0 bytes copied.")
            if fresh:
                text += (f" Contiguous buffers on a {best.level} system: 1 run, the same list pages and "
                         f"messages, nothing pinned, set-up {_f(min(r.setup_us or 0 for r in fresh))}-"
                         f"{_f(max(r.setup_us or 0 for r in fresh))} µs.")
            out.append(text)
        out += [f"scattered at {level_label(worst)}: {line}." for line in refused]
    # 3. where the static pool runs out
    static = [r for r in report.results if r.strategy == "static"]
    if static:
        pool = report.params.get("static_size", 0)
        by_size: dict[int, list[Result]] = {}
        for r in static:
            by_size.setdefault(r.size, []).append(r)
        parts = []
        for size in sizes:
            same_size = by_size.get(size, [])
            if not same_size:
                continue
            held = max(c.max_live for c in same_size)
            worst_rate = max(c.failure_rate for c in same_size)
            parts.append(f"{human_size(size)} never refused" if worst_rate == 0 else
                         f"{human_size(size)}: {held} held at most, {worst_rate:.0%} of attempts refused")
        same = len({(r.size, r.failures) for r in static}) == len(by_size)
        out.append(f"static pool ({human_size(pool)}) runs out by capacity, not fragmentation "
                   f"({'the same at every level' if same else 'varies by level'}): " + "; ".join(parts) + ".")
    return out


def format_summary(report: Report) -> str:
    return "summary:\n" + "\n".join(f"  - {line}" for line in summary_lines(report))


def format_markdown(report: Report) -> str:
    """A self-contained report: machine, legend, levels, summary, results, plots."""
    m, p = report.machine, report.params
    out = ["# poolsvc bench: contiguous, static pool or scattered pages", "",
           f"Measured {m.get('date_utc', '')} UTC on {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
           f"numpy {m['numpy']}, {m['backend']} core; seed {p['seed']}, {p['trials']} attempts per cell, "
           f"{human_size(p['dynamic_size'])} of dynamic RAM. Times are this model's; counts transfer to "
           f"hardware.", "", "## Summary", ""]
    out += [f"- {line}" for line in summary_lines(report)]
    out += ["", "## Columns", ""] + [f"- **{k}**: {v}" for k, v in LEGEND.items()]
    out += ["", "## Fragmentation levels", "",
            f"| level | index (order {INDEX_ORDER}) | target | free MiB | largest free run | index, order 10 |",
            "|---|---:|---:|---:|---:|---:|"]
    for lv in report.levels:
        out.append(f"| {lv.level} | {lv.index:.3f} | {lv.target:.2f} | {lv.free_frames * PAGE_SIZE / MiB:.1f} | "
                   f"{human_size(lv.largest_free_run * PAGE_SIZE)} | {lv.unusable_index[-1]:.3f} |")
    out += ["", "## Results", "",
            "| level | size | strategy | p50 µs | p99 µs | failed | live | frames | segments | list pages | "
            "messages | pinned | set-up µs | SHA-256 MB/s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.results:
        out.append(f"| {r.level} | {human_size(r.size)} | {r.strategy} | {_f(r.p50_us, none='–')} | "
                   f"{_f(r.p99_us, none='–')} | {r.failure_rate:.1%} | {r.max_live} | "
                   f"{_f(r.frames, '{:d}', '–')} | {_f(r.segments, '{:d}', '–')} | "
                   f"{_f(r.list_pages, '{:d}', '–')} | {_f(r.messages, '{:d}', '–')} | "
                   f"{_f(r.pinned_pages, '{:d}', '–')} | {_f(r.setup_us, none='–')} | "
                   f"{_f(r.access_mb_s, '{:.0f}', '–')} |")
    out += ["", "## Plots", "", "![latency p50 with p99 band](latency.png)", "",
            "![failure rate by size and fragmentation](failure.png)", ""]
    return "\n".join(out)
