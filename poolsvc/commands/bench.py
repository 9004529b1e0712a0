"""``poolsvc bench``: contiguous vs reserved-pool vs scattered memory, under fragmentation."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..config import parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure contiguous, static-pool and scattered shared memory under fragmentation",
        description="Runs the study on an embedded System (no daemon): for buffer sizes from "
                    "4 KiB to 64 MiB and fragmentation levels from a fresh system to a heavily "
                    "fragmented one (a seeded ageing workload), it compares contiguous "
                    "allocation from the dynamic pool, the reserved static pool, and scattered "
                    "pages registered with a page list. It reports allocation latency (p50, "
                    "p99), failure rate, set-up cost, memory overhead, secure-side access cost "
                    "(SHA-256 over the buffer), segments and the longest contiguous run. "
                    "About two minutes by default; --quick takes seconds.")
    p.add_argument("--quick", action="store_true", help="fewer sizes, levels and trials (seconds)")
    p.add_argument("--seed", type=int, default=1, help="seed of the ageing workload (default 1)")
    p.add_argument("--trials", type=int, default=None, help="attempts per cell (default 1000, quick 20)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated buffer sizes, e.g. 4KiB,1MiB,64MiB")
    p.add_argument("--dynamic-size", default="1GiB", help="dynamic RAM of the simulated machine")
    p.add_argument("--json", metavar="FILE", help="write every figure and the machine's description")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots of latency and failure rate")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    p.set_defaults(func=run)


class Progress:
    """A one-line progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        elapsed = time.monotonic() - self.t0
        line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.1f}s {label:<32}")
        if self.tty:
            sys.stderr.write(line)
            sys.stderr.flush()
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            sys.stderr.write(f"{self.done}/{self.total} cells, {elapsed:.1f}s\n")

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run(args: argparse.Namespace) -> int:
    from .. import study

    levels = study.LEVELS
    sizes = study.QUICK_SIZES if args.quick else study.SIZES
    if args.quick:
        levels = [lv for lv in study.LEVELS if lv.name in ("fresh", "moderate", "severe")]
    if args.sizes:
        sizes = [parse_size(s, "--sizes") for s in args.sizes.split(",") if s.strip()]
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("poolsvc bench: --plot needs matplotlib: pip install 'poolsvc[plot]' "
                  "(or pip install matplotlib)", file=sys.stderr)
            return 2
    trials = args.trials or (20 if args.quick else 1000)
    dynamic_size = parse_size(args.dynamic_size, "--dynamic-size")
    progress = Progress(len(levels) * len(sizes) * len(study.STRATEGIES))
    try:
        report = study.run_study(sizes=sizes, levels=levels, trials=trials, seed=args.seed,
                                 dynamic_size=dynamic_size, progress=progress)
    finally:
        progress.close()
    print(study.format_table(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.to_json(), fh, indent=1)
        print(f"\nwrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(study.format_markdown(report))
        print(f"wrote {args.markdown}")
    if args.plot:
        for path in study.plot(report, args.plot):
            print(f"wrote {path}")
    return 0
