"""The study's text: legend, tables, summary and the Markdown report of ``poolsvc bench``.

Renders a :class:`poolsvc.study.Report` (the figures, measured by
:mod:`poolsvc.study` and :mod:`poolsvc.studypool`); plots are in
:mod:`poolsvc.plots`.  The summary answers in the mechanism's terms: where
contiguous allocation fails, what scattered pages cost, what the kernel page
size changes, where the static pool runs out, embedded and through the daemon.

Concurrency: pure functions of the report.
"""
from __future__ import annotations

from . import kernelpages, pagelist
from .constants import PAGE_SIZE
from .fragmentation import INDEX_ORDER
from .study import KiB, MiB, LevelMetrics, Report, Result, human_size


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
    "frames": "4 KiB frames the buffer takes (median); with larger kernel pages, whole kernel pages of "
              "4 or 16 frames each",
    "kpages": "kernel pages the buffer takes (= frames with 4 KiB pages)",
    "waste": "bytes taken beyond the size asked: rounding to whole kernel pages (internal waste)",
    "segs": "contiguous runs of those frames = scatterlist entries a device would need (median)",
    "list pg": "OP-TEE page-list pages built for REGISTER_SHM (511 4 KiB entries each, one entry per "
               "frame whatever the kernel page size; bytes = pages x 4096)",
    "msgs": "messages to the secure world per buffer: REGISTER_SHM at alloc + UNREGISTER_SHM at close",
    "pinned": "user kernel pages pinned while registered (pin_user_pages)",
    "setup us": "page-list build + REGISTER_SHM round trip through the simulated secure world (median)",
    "sha MB/s": "the secure world's SHA-256 app reading the first buffer through the frame table "
                "(none for dynamic buffers of kernel pages above 4 KiB, modelled without storage)",
    "copied": "bytes copied: none in any cell (embedded, every buffer is shared zero-copy; shadow "
              "copies happen only through the daemon, for memory it cannot share)",
}


def _f(x: float | int | None, fmt: str = "{:.1f}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def _waste(n: int | None, none: str = "-") -> str:
    return none if n is None else "0" if n == 0 else human_size(n) if n % KiB == 0 else f"{n} B"


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
    lines = [f"kernel page size {human_size(report.page_size)}", "columns:", format_legend(), "",
             f"fragmentation of dynamic RAM after ageing (index = unusable free space index at "
             f"order {INDEX_ORDER}):", format_levels(report), ""]
    head = (f"{'level':<9} {'index':>5} {'size':>7} {'strategy':<10} {'p50 us':>8} {'p99 us':>8} "
            f"{'fail':>6} {'live':>6} {'frames':>6} {'segs':>6} {'kpages':>6} {'waste':>7} {'list pg':>7} "
            f"{'msgs':>4} {'pinned':>6} {'setup us':>8} {'sha MB/s':>8}")
    lines += [head, "-" * len(head)]
    index = {lv.level: lv.index for lv in report.levels}
    for r in report.results:
        lines.append(
            f"{r.level:<9} {index.get(r.level, 0.0):>5.2f} {human_size(r.size):>7} {r.strategy:<10} "
            f"{_f(r.p50_us):>8} {_f(r.p99_us):>8} {r.failure_rate:>6.1%} {r.max_live:>6} "
            f"{_f(r.frames, '{:d}'):>6} {_f(r.segments, '{:d}'):>6} {_f(r.kernel_pages, '{:d}'):>6} "
            f"{_waste(r.waste_bytes):>7} {_f(r.list_pages, '{:d}'):>7} "
            f"{_f(r.messages, '{:d}'):>4} {_f(r.pinned_pages, '{:d}'):>6} {_f(r.setup_us):>8} "
            f"{_f(r.access_mb_s, '{:.0f}'):>8}")
    if report.static_pool:
        lines += ["", "static pool, embedded and through the daemon:", format_static_pool(report)]
    return "\n".join(lines)


STATIC_HEAD = ("where", "size", "alloc+close p50 us", "p99 us", "one client holds", "pool holds",
               "client refused by")


def _static_rows(report: Report) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for f in report.static_pool:
        where = f.where if f.transport is None else f"{f.where} ({f.transport})"
        rows.append((where, human_size(f.size), _f(f.p50_us), _f(f.p99_us),
                     f"{f.client_buffers} = {_bytes(f.client_bytes)}", f"{f.pool_buffers} = {_bytes(f.pool_bytes)}",
                     _refusal(f.client_refusal)))
    return rows


def _bytes(n: int) -> str:
    """A byte count in whole MiB where exact, else KiB (``4092 KiB``, not ``4.0 MiB``)."""
    if n == 0:
        return "0"
    return human_size(n) if n % MiB == 0 or n % KiB else f"{n // KiB} KiB"


def _refusal(reason: str | None) -> str:
    """What refused a buffer: the pool, or the daemon's per-client bound."""
    if reason is None:
        return "-"
    return "per-client bound" if "max_bytes_per_client" in reason else "pool full"


def format_static_pool(report: Report) -> str:
    """The static pool's figures as fixed-width text."""
    rows = [STATIC_HEAD] + _static_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(STATIC_HEAD))]
    return "\n".join("  " + "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w)
                                        for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def _pinned_per(page: int) -> str:
    per = page // PAGE_SIZE
    return "one pinned page per frame" if per == 1 else f"one pinned kernel page per {per} frames"


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
                text = f"{human_size(size)} is refused ({sc.failure_reason})"
                if sc.failure_reason and "free frames" in sc.failure_reason:  # (the list's run)
                    text += (f": its page list needs {pagelist.list_pages_needed(size // PAGE_SIZE)} "
                             f"contiguous list pages, allocated as Linux does")
                refused.append(text)
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
                    f"{_pinned_per(report.page_size)}, 0 bytes copied.")
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
    out += static_pool_lines(report)
    out += page_size_lines(report)
    return out


def static_pool_lines(report: Report) -> list[str]:
    """The static pool embedded against through the daemon: cost and where it runs out."""
    embedded = {f.size: f for f in report.static_pool if f.where == "embedded"}
    daemon = [f for f in report.static_pool if f.where == "daemon"]
    if not daemon:
        return []
    costs, client, pool = [], [], []
    for f in daemon:
        e = embedded.get(f.size)
        if f.p50_us is None:
            pool.append(f"{human_size(f.size)}: none")
            continue
        costs.append(f"{human_size(f.size)} {_f(f.p50_us)} µs" +
                     (f" (embedded {_f(e.p50_us)} µs)" if e is not None and e.p50_us is not None else ""))
        client.append(f"{f.client_buffers} of {human_size(f.size)}")
        pool.append(f"{f.pool_buffers} of {human_size(f.size)} ({_bytes(f.pool_bytes)})")
    bound = next((f for f in daemon if f.client_buffers and f.client_refusal
                  and _refusal(f.client_refusal) == "per-client bound"), None)
    text = (f"static pool through the daemon ({daemon[0].transport} transport): alloc_user_buf + close "
            f"p50 " + ", ".join(costs) + ". ")
    if bound is not None:
        text += (f"One client process is refused at its per-client bound, {_bytes(bound.client_bytes)} "
                 f"of the {human_size(report.params.get('static_size', 0))} pool (" + ", ".join(client) +
                 "); ")
    text += ("the pool itself runs out at " + ", ".join(pool) +
             ", as embedded: the driver's message buffer takes one page of the carve-out.")
    return [text]


def page_size_lines(report: Report) -> list[str]:
    """What the kernel page size changes: rounding, entries per kernel page, runs, refusals."""
    page = report.page_size
    per = page // PAGE_SIZE
    if page == PAGE_SIZE:
        return ["kernel pages of 4 KiB: one page-list entry per kernel page, no buffer is rounded beyond "
                "its last 4 KiB frame (--page-size 16KiB or 64KiB models arm64's larger pages)."]
    sizes = sorted({r.size for r in report.results})
    small = next((r for r in report.results if r.size == sizes[0] and r.waste_bytes is not None), None)
    text = (f"kernel pages of {human_size(page)}: each is {per} frames, naturally aligned, and {per} page-list "
            f"entries of 4 KiB (as optee_fill_pages_list writes them), so a list page describes "
            f"{pagelist.ENTRIES_PER_LIST_PAGE * PAGE_SIZE // KiB} KiB whatever the page size; every buffer "
            f"is rounded to whole kernel pages")
    if small is not None:
        text += (f" (a {human_size(small.size)} buffer takes {human_size(small.size + (small.waste_bytes or 0))}, "
                 f"{_waste(small.waste_bytes)} wasted)")
    text += (f"; contiguous runs reach 2^{kernelpages.MAX_ORDER[page]} kernel pages "
             f"({human_size((1 << kernelpages.MAX_ORDER[page]) * page)}, arm64 MAX_ORDER).")
    out = [text]
    if report.levels:
        worst = report.levels[-1]
        order = per.bit_length() - 1
        runs, refused = [], None
        for size in sizes:
            sc = report.cell(worst.level, size, "scattered")
            if sc is None:
                continue
            if sc.segments is None:
                refused = refused or sc
                continue
            runs.append(f"{human_size(size)} = {sc.segments} run{'s' if sc.segments != 1 else ''} of "
                        f"{sc.frames} frames")
        text = (f"scattered with {human_size(page)} pages at {level_label(worst)}, where the unusable index "
                f"for one kernel page (order {order}) is {worst.unusable_index[order]:.2f}: "
                + ("; ".join(runs) or "nothing served"))
        if refused is not None:
            text += f"; refused from {human_size(refused.size)} ({refused.failure_reason})"
        out.append(text + ".")
    return out


def format_summary(report: Report) -> str:
    return "summary:\n" + "\n".join(f"  - {line}" for line in summary_lines(report))


def format_markdown(report: Report) -> str:
    """A self-contained report: machine, legend, levels, summary, results, plots."""
    m, p = report.machine, report.params
    out = ["# poolsvc bench: contiguous, static pool or scattered pages", "",
           f"Measured {m.get('date_utc', '')} UTC on {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
           f"numpy {m['numpy']}, {m['backend']} core; seed {p['seed']}, {p['trials']} attempts per cell, "
           f"{human_size(p['dynamic_size'])} of dynamic RAM, kernel pages of {human_size(report.page_size)}. "
           f"Times are this model's; counts transfer to "
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
            "| level | size | strategy | p50 µs | p99 µs | failed | live | frames | segments | kernel pages | "
            "waste | list pages | messages | pinned | set-up µs | SHA-256 MB/s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.results:
        out.append(f"| {r.level} | {human_size(r.size)} | {r.strategy} | {_f(r.p50_us, none='–')} | "
                   f"{_f(r.p99_us, none='–')} | {r.failure_rate:.1%} | {r.max_live} | "
                   f"{_f(r.frames, '{:d}', '–')} | {_f(r.segments, '{:d}', '–')} | "
                   f"{_f(r.kernel_pages, '{:d}', '–')} | {_waste(r.waste_bytes, '–')} | "
                   f"{_f(r.list_pages, '{:d}', '–')} | {_f(r.messages, '{:d}', '–')} | "
                   f"{_f(r.pinned_pages, '{:d}', '–')} | {_f(r.setup_us, none='–')} | "
                   f"{_f(r.access_mb_s, '{:.0f}', '–')} |")
    if report.static_pool:
        out += ["", "## The static pool, embedded and through the daemon", "",
                "Each size: alloc_user_buf + close timed, then one client holds buffers until refused "
                "(through the daemon, at its per-client bound by default), then a daemon without that "
                "bound gives where the pool itself runs out (poolsvc/studypool.py).", "",
                "| " + " | ".join(STATIC_HEAD) + " |", "|---|---:|---:|---:|---:|---:|---|"]
        out += ["| " + " | ".join(row) + " |" for row in _static_rows(report)]
    out += ["", "## Plots", "", "![latency p50 with p99 band](latency.png)", "",
            "![failure rate by size and fragmentation](failure.png)", ""]
    return "\n".join(out)
