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
It records the allocation latency (p50, p99), the failure rate, the set-up
cost (page-list build and REGISTER_SHM, as the driver does them), the memory
overhead (list pages and rounding), the secure-side access cost (the SHA-256
trusted app over the buffer) and the buffer's page-list segments and longest
contiguous run.

The ageing workload: allocate blocks of 1..``2**max_block_order`` pages
(geometric sizes) until ``fill`` of dynamic RAM is used, then free random
blocks until only ``keep`` is; the freed holes are what fragments memory.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy as np

from . import pagelist
from ._backend import BACKEND
from .config import Config
from .constants import PAGE_SIZE
from .errors import InternalError, PoolsvcError
from .fragmentation import unusable_indices
from .system import System
from .tee.ta import Sha256App

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Level:
    """One fragmentation level of the ageing workload."""

    name: str
    fill: float  # occupancy reached before the frees
    keep: float  # occupancy left after the frees
    max_block_order: int = 3


LEVELS = [
    Level("fresh", 0.0, 0.0),
    Level("light", 0.60, 0.45),                       # a 40% tail stays untouched
    Level("moderate", 0.95, 0.45),                    # a 5% tail stays untouched
    Level("heavy", 1.00, 0.50),                       # holes only: runs of freed blocks
    Level("severe", 1.00, 0.60, max_block_order=0),   # single-page holes
]
SIZES = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]
QUICK_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]
STRATEGIES = ["contiguous", "static", "scattered"]


@dataclass
class Result:
    level: str
    size: int
    strategy: str
    trials: int
    failures: int
    p50_us: float | None
    p99_us: float | None
    setup_us: float | None  # page list + REGISTER_SHM as the driver does it, median
    build_us: float | None  # page list build alone, median
    overhead_bytes: int | None  # list pages + rounding
    access_mb_s: float | None  # SHA-256 through the frame table
    segments: int | None
    longest_run_pages: int | None
    failure_reason: str | None = None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.trials if self.trials else 0.0


@dataclass
class LevelMetrics:
    level: str
    free_frames: int
    largest_free_run: int
    unusable_index: list[float]
    free_blocks_per_order: list[int]


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
            results.append(d)
        return {"machine": self.machine, "params": self.params,
                "levels": [asdict(x) for x in self.levels], "results": results}


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
            "platform": platform.platform(), "backend": BACKEND, "numpy": np.__version__}


class Ager:
    """The seeded ageing workload on a System's dynamic frame allocator.

    The aged blocks are kept in numpy arrays, not Python objects: hundreds of
    thousands of tuples would make the garbage collector's full passes land
    inside the timed allocations.
    """

    def __init__(self, dynamic: Any, rng: np.random.Generator, level: Level) -> None:
        self.dynamic = dynamic
        self.rng = rng
        self.level = level
        self.pas = np.zeros(0, dtype=np.uint64)
        self.sizes = np.zeros(0, dtype=np.int64)

    def _blocks(self, count: int) -> np.ndarray:
        orders = np.minimum(self.rng.geometric(0.5, size=count) - 1, self.level.max_block_order)
        return (1 << orders).astype(np.int64)

    def run(self) -> None:
        dyn, lv = self.dynamic, self.level
        if lv.fill <= 0:
            return
        target = int(dyn.nframes * lv.fill)
        pas: list[int] = []
        sizes: list[int] = []
        while dyn.used_frames < target:
            for n in self._blocks(4096).tolist():
                if dyn.used_frames >= target:
                    break
                try:
                    pas.append(dyn.alloc_contig(n))
                except PoolsvcError:
                    target = 0
                    break
                sizes.append(n)
        self.pas = np.array(pas, dtype=np.uint64)
        self.sizes = np.array(sizes, dtype=np.int64)
        del pas, sizes
        keep = int(dyn.nframes * lv.keep)
        alive = np.ones(len(self.pas), dtype=bool)
        for i in self.rng.permutation(len(self.pas)).tolist():
            if dyn.used_frames <= keep:
                break
            dyn.free_contig(int(self.pas[i]), int(self.sizes[i]))
            alive[i] = False
        self.pas, self.sizes = self.pas[alive], self.sizes[alive]


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


def _longest_run(pages: np.ndarray) -> int:
    if len(pages) == 0:
        return 0
    breaks = np.flatnonzero(np.diff(pages.astype(np.int64)) != PAGE_SIZE)
    edges = np.concatenate([[-1], breaks, [len(pages) - 1]])
    return int(np.max(np.diff(edges)))


def _measure(system: System, ctx: Any, strategy: str, size: int, trials: int,
             client_buf: Any, tee: tuple[Any, Any], level: str, hold_bytes: int) -> Result:
    """``trials`` attempts, holding the last ``hold_bytes // size`` successes (FIFO)."""
    lat: list[float] = []
    setup: list[float] = []
    build: list[float] = []
    failures = 0
    reason = None
    first_ok: Any = None
    access = None
    held: list[Any] = []
    window = max(1, hold_bytes // size)
    try:
        for trial in range(trials):
            if len(held) >= window:
                held.pop(0).close()
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
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if strategy != "static":
                tb = time.perf_counter()
                pagelist.build(shm.pages, shm.offset, system.config.dynamic_base)
                build.append(time.perf_counter() - tb)
                setup.append(system.last_register_seconds)
            if first_ok is None:
                npages = len(shm.pages)
                list_bytes = pagelist.list_pages_needed(npages) * PAGE_SIZE if strategy != "static" else 0
                rounding = npages * PAGE_SIZE - size if strategy != "static" else shm.size - size
                first_ok = {
                    "overhead": list_bytes + max(rounding, 0),
                    "segments": len(pagelist.segments(shm.pages)),
                    "longest": _longest_run(shm.pages),
                }
                secs = _sha256_secure(ctx, tee[0], tee[1], shm)
                access = size / secs / 1e6 if secs > 0 else None
            held.append(shm)
    finally:
        for shm in held:
            shm.close()

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(np.array(values) * 1e6, q)) if values else None

    return Result(level, size, strategy, trials, failures, pct(lat, 50), pct(lat, 99),
                  pct(setup, 50), pct(build, 50),
                  first_ok["overhead"] if first_ok else None, access,
                  first_ok["segments"] if first_ok else None,
                  first_ok["longest"] if first_ok else None,
                  reason if failures else None)


def run_study(*, sizes: list[int] | None = None, levels: list[Level] | None = None,
              trials: int = 1000, seed: int = 1, dynamic_size: int = 1 << 30,
              progress: Callable[[str], None] | None = None) -> Report:
    """Run the study; ``progress(label)`` is called once per finished cell."""
    sizes = sizes or SIZES
    levels = levels or LEVELS
    report = Report(machine_description(),
                    {"sizes": sizes, "levels": [asdict(lv) for lv in levels], "trials": trials,
                     "seed": seed, "dynamic_size": dynamic_size, "strategies": STRATEGIES})
    max_size = max(sizes)
    hold_bytes = dynamic_size // 4
    client = shared_memory.SharedMemory(create=True, size=max(max_size, hold_bytes))
    try:
        for li, level in enumerate(levels):
            for strategy in STRATEGIES:
                cfg = Config(dynamic_size=dynamic_size, dynamic_shm=strategy != "static",
                             arena_step=64 * MiB)
                rng = np.random.default_rng([seed, li])
                with System(cfg) as system:
                    ager = Ager(system.dynamic, rng, level)
                    ager.run()
                    if strategy == "contiguous":
                        blocks = system.dynamic.free_blocks_per_order()
                        report.levels.append(LevelMetrics(
                            level.name, system.dynamic.free_frames, system.dynamic.largest_free_run,
                            unusable_indices(blocks), [int(b) for b in blocks]))
                    ctx = system.open_context(f"{strategy}-{level.name}")
                    _warm_up(ctx, strategy, client.buf, hold_bytes)
                    session = ctx.open_session(Sha256App.UUID)
                    digest = ctx.alloc_kernel_buf(32)
                    for size in sizes:
                        res = _measure(system, ctx, strategy, size, trials, client.buf,
                                       (session, digest), level.name, hold_bytes)
                        report.results.append(res)
                        if progress:
                            progress(f"{level.name} {strategy} {size // KiB} KiB")
                    ctx.close()
    finally:
        client.close()
        client.unlink()
    return report


def human_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def format_table(report: Report) -> str:
    """The results as a fixed-width text table."""
    lines = []
    lines.append("fragmentation (dynamic RAM after ageing):")
    lines.append(f"  {'level':<9} {'free MiB':>9} {'largest run':>12} {'unusable@4':>11} {'unusable@10':>12}")
    for lv in report.levels:
        lines.append(f"  {lv.level:<9} {lv.free_frames * PAGE_SIZE / MiB:>9.1f} "
                     f"{lv.largest_free_run * PAGE_SIZE // KiB:>9} KiB "
                     f"{lv.unusable_index[4]:>11.3f} {lv.unusable_index[-1]:>12.3f}")
    lines.append("")
    head = (f"{'level':<9} {'size':>7} {'strategy':<11} {'p50 us':>9} {'p99 us':>9} {'fail':>6} "
            f"{'setup us':>9} {'overhead':>9} {'sha MB/s':>9} {'segs':>6} {'run pg':>7}")
    lines.append(head)
    lines.append("-" * len(head))

    def f(x: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if x is None else fmt.format(x)

    for r in report.results:
        lines.append(f"{r.level:<9} {human_size(r.size):>7} {r.strategy:<11} {f(r.p50_us):>9} "
                     f"{f(r.p99_us):>9} {r.failure_rate:>6.1%} {f(r.setup_us):>9} "
                     f"{f(r.overhead_bytes, '{:d}'):>9} {f(r.access_mb_s, '{:.0f}'):>9} "
                     f"{f(r.segments, '{:d}'):>6} {f(r.longest_run_pages, '{:d}'):>7}")
    return "\n".join(lines)


def format_markdown(report: Report) -> str:
    """The fragmentation levels and the results as Markdown tables."""
    out = ["| level | free MiB | largest free run | unusable index, order 4 | order 10 |",
           "|---|---:|---:|---:|---:|"]
    for lv in report.levels:
        out.append(f"| {lv.level} | {lv.free_frames * PAGE_SIZE / MiB:.1f} | "
                   f"{human_size(lv.largest_free_run * PAGE_SIZE)} | {lv.unusable_index[4]:.3f} | "
                   f"{lv.unusable_index[-1]:.3f} |")
    out += ["", "| level | size | strategy | p50 µs | p99 µs | failed | set-up µs | overhead B | "
                "SHA-256 MB/s | segments | longest run (pages) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x: float | None, fmt: str = "{:.1f}") -> str:
        return "–" if x is None else fmt.format(x)

    for r in report.results:
        out.append(f"| {r.level} | {human_size(r.size)} | {r.strategy} | {f(r.p50_us)} | {f(r.p99_us)} | "
                   f"{r.failure_rate:.1%} | {f(r.setup_us)} | {f(r.overhead_bytes, '{:d}')} | "
                   f"{f(r.access_mb_s, '{:.0f}')} | {f(r.segments, '{:d}')} | "
                   f"{f(r.longest_run_pages, '{:d}')} |")
    return "\n".join(out) + "\n"


def plot(report: Report, directory: str) -> list[str]:
    """Latency and failure rate against fragmentation, one panel per size; returns files.

    The x axis is the fragmentation level, labelled with the level's unusable
    free-space index at orders 4 and 10 (Linux's definition).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(directory, exist_ok=True)
    levels = [lv.level for lv in report.levels]
    xpos = {name: i for i, name in enumerate(levels)}
    ticks = [f"{lv.level}\nu4={lv.unusable_index[4]:.2f}\nu10={lv.unusable_index[-1]:.2f}"
             for lv in report.levels]
    sizes = sorted({r.size for r in report.results})
    styles = {"static": dict(marker="s", linestyle=":", markersize=9, alpha=0.8),
              "contiguous": dict(marker="o", linestyle="-", markersize=7),
              "scattered": dict(marker="d", linestyle="--", markersize=6)}
    files = []
    for metric, ylabel, fname in (("p50_us", "allocation latency p50 (µs, log scale)", "latency.png"),
                                  ("failure_rate", "failure rate (fraction of attempts)", "failure.png")):
        cols = min(4, len(sizes))
        rows = -(-len(sizes) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        for ax, size in zip(axes.flat, sizes):
            for strategy in ("static", "contiguous", "scattered"):
                pts = sorted((xpos[r.level], getattr(r, metric)) for r in report.results
                             if r.size == size and r.strategy == strategy)
                ys = [p[1] if p[1] is not None else float("nan") for p in pts]
                ax.plot([p[0] for p in pts], ys, label=strategy, **styles[strategy])
            ax.set_title(f"buffer {human_size(size)}")
            ax.set_xticks(range(len(levels)), ticks, fontsize=7)
            ax.set_ylabel(ylabel, fontsize=8)
            if metric == "p50_us":
                ax.set_yscale("log")
                plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
                ax.yaxis.set_minor_formatter(plain)
                ax.tick_params(axis="y", which="both", labelsize=7)
            else:
                ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(sizes):]:
            ax.axis("off")
        axes.flat[0].legend(loc="best", fontsize=8)
        title = ylabel.split(" (")[0]
        fig.suptitle(f"{title} by fragmentation level: contiguous (dynamic pool), static "
                     f"(reserved pool), scattered (registered pages)", fontsize=10)
        fig.tight_layout()
        path = os.path.join(directory, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
