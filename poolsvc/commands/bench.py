"""``poolsvc bench``: contiguous vs reserved-pool vs scattered memory, under fragmentation.

Parses the options (ranges checked by :mod:`poolsvc.commands.argtypes`), runs
:func:`poolsvc.study.run_study` with a tqdm progress bar on stderr (shown on a
terminal only), prints the legend, the table and the summary, and saves the
results (JSON, Markdown report, plots) in a folder it names at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from typing import Any

from . import argtypes

#: What --help says of a default run's length: measured with
#: ``time python -m poolsvc bench --no-save`` on the project's 2-vCPU VM (compiled core).
DEFAULT_RUN = ("about a minute on a 2-vCPU machine (bench/results/study.md records the time of its "
               "last run)")


def page_size(text: str) -> int:
    """A kernel page size the study models (``--page-size``): 4, 16 or 64 KiB."""
    from ..errors import BadParameters
    from ..kernelpages import check_page_size

    value = argtypes.size(text)
    try:
        return check_page_size(value)
    except BadParameters as exc:
        raise argparse.ArgumentTypeError(f"{exc} ({text!r})") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..study import DEFAULT_TRIALS, QUICK_LEVELS, QUICK_TRIALS

    p = sub.add_parser(
        "bench", help="the main study: contiguous, static-pool and scattered shared memory under fragmentation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(textwrap.fill(paragraph, 88, break_on_hyphens=False) for paragraph in (
            "Runs the study on an embedded System (no daemon). For buffer sizes from 4 KiB to "
            "64 MiB and fragmentation levels from a fresh system to a severely fragmented one (a "
            "seeded ageing workload run until the unusable free space index reaches each level), it "
            "compares contiguous allocation from the dynamic pool, the reserved static pool, and "
            "scattered pages registered with a page list.",
            "It prints a legend, one row per (level, size, strategy) -- latency p50/p99, failure "
            "rate, and the mechanism's costs: frames, contiguous runs, kernel pages and the bytes "
            "wasted rounding to them, page-list pages, messages to the secure world, pages pinned "
            "-- the static pool measured embedded and through a poolsvc serve subprocess, and a "
            "summary: where contiguous allocation fails, what scattered pages cost, what the "
            "kernel page size changes, where the static pool runs out.",
            f"Run time: {DEFAULT_RUN}; --quick takes a few seconds.",
            "Results (results.json, report.md, latency.png, failure.png) are saved in "
            "./poolsvc-results/<UTC time>/ unless --out or --no-save says otherwise; the plots "
            "need matplotlib (pip install 'poolsvc[plot]').")),
        epilog="examples:\n"
               "  poolsvc bench                                   # the full study, saved\n"
               "  poolsvc bench --quick --no-save                 # a few seconds, printed only\n"
               "  poolsvc bench --seed 7 --sizes 4KiB,1MiB --trials 200 --out my-run/\n"
               "  poolsvc bench --quick --page-size 16KiB          # arm64 16 KiB kernel pages")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer sizes, levels ({', '.join(QUICK_LEVELS)}) and {QUICK_TRIALS} trials")
    p.add_argument("--seed", type=argtypes.nonnegative_int, default=1,
                   help="seed of the ageing workload (default 1)")
    p.add_argument("--trials", type=argtypes.positive_int, default=None,
                   help=f"attempts per cell (default {DEFAULT_TRIALS}, --quick {QUICK_TRIALS})")
    p.add_argument("--sizes", type=argtypes.size_list, default=None,
                   help="comma-separated buffer sizes, e.g. 4KiB,1MiB,64MiB")
    p.add_argument("--dynamic-size", type=argtypes.size, default=1 << 30,
                   help="dynamic RAM of the simulated machine (default 1GiB)")
    p.add_argument("--page-size", type=page_size, default=4096, metavar="SIZE",
                   help="kernel page size: 4KiB (default), 16KiB or 64KiB; a buffer is rounded to whole "
                        "kernel pages, each one naturally aligned run of 4 KiB frames and as many 4 KiB "
                        "page-list entries")
    p.add_argument("--no-daemon", action="store_true",
                   help="skip the static pool's measurement through a poolsvc serve subprocess")
    p.add_argument("--transport", choices=("shm", "socket"), default="shm",
                   help="the transport of that measurement's client (default shm)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="folder for results.json, report.md and the plots "
                          "(default ./poolsvc-results/<UTC time>/)")
    out.add_argument("--no-save", action="store_true", help="print only; write no files")
    out.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    out.add_argument("--plot", metavar="DIR", help="also write the PNG plots into DIR")
    out.add_argument("--markdown", metavar="FILE", help="also write the Markdown report to FILE")
    p.set_defaults(func=run)


class Progress:
    """One tick per finished cell: a tqdm bar on stderr when it is a terminal, else silent."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            self.bar: Any = None
            return
        self.bar = tqdm(total=total, unit="cell", file=sys.stderr, disable=None, leave=False,
                        dynamic_ncols=True)

    def __call__(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    from .. import plots, study, studyreport

    levels = study.LEVELS
    sizes = study.QUICK_SIZES if args.quick else study.SIZES
    if args.quick:
        levels = [lv for lv in study.LEVELS if lv.name in study.QUICK_LEVELS]
    if args.sizes:
        sizes = args.sizes
    if args.plot and not _have_matplotlib():
        print("poolsvc bench: --plot needs matplotlib: pip install 'poolsvc[plot]' "
              "(or pip install matplotlib)", file=sys.stderr)
        return 2
    trials = args.trials or (study.QUICK_TRIALS if args.quick else study.DEFAULT_TRIALS)
    folder = None if args.no_save else (
        args.out or os.path.join("poolsvc-results", time.strftime("%Y%m%d-%H%M%S", time.gmtime())))
    progress = Progress(len(levels) * len(sizes) * len(study.STRATEGIES) + (not args.no_daemon))
    t0 = time.monotonic()
    try:
        report = study.run_study(sizes=sizes, levels=levels, trials=trials, seed=args.seed,
                                 dynamic_size=args.dynamic_size, page_size=args.page_size,
                                 static_daemon=not args.no_daemon, transport=args.transport,
                                 progress=progress)
    finally:
        progress.close()
    report.params["seconds"] = round(time.monotonic() - t0, 1)
    print(studyreport.format_table(report))
    print()
    print(studyreport.format_summary(report))
    written: list[str] = []
    if folder:
        os.makedirs(folder, exist_ok=True)
        written += _write_json(report, os.path.join(folder, "results.json"))
        written += _write_text(studyreport.format_markdown(report), os.path.join(folder, "report.md"))
        if _have_matplotlib():
            written += plots.plot(report, folder)
    if args.json:
        written += _write_json(report, args.json)
    if args.markdown:
        written += _write_text(studyreport.format_markdown(report), args.markdown)
    if args.plot:
        written += plots.plot(report, args.plot)
    print(f"\n{report.params['seconds']:.0f} s, {len(report.results)} cells.")
    if folder:
        note = "" if _have_matplotlib() else " (no plots: pip install 'poolsvc[plot]')"
        print(f"results saved in {folder}/{note}: " + ", ".join(
            os.path.basename(w) for w in written if os.path.dirname(w) == folder))
    extra = [w for w in written if not folder or os.path.dirname(w) != folder]
    for path in extra:
        print(f"wrote {path}")
    return 0


def _write_json(report: Any, path: str) -> list[str]:
    with open(path, "w") as fh:
        json.dump(report.to_json(), fh, indent=1)
    return [path]


def _write_text(text: str, path: str) -> list[str]:
    with open(path, "w") as fh:
        fh.write(text)
    return [path]
