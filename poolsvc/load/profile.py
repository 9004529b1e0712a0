"""Where a load client's CPU goes: one worker loop in this process, against a daemon, by phase.

Usage (from the repository root)::

    python -m poolsvc.load.profile                                 # ALLOC+CLOSE of 4 KiB, batches of 256
    python -m poolsvc.load.profile --mix alloc_user=1,free=1 --batch 1
    python -m poolsvc.load.profile --cprofile 25                   # and the functions with the most own time

Owns the harness client's profile (docs/load.md, "What limits the rate"):
it starts a daemon as a load run does (:class:`~poolsvc.load.daemon.LoadDaemon`),
makes one :class:`~poolsvc.load.worker.Worker` in this process and runs its
loop for ``--seconds``, then prints this thread's CPU per operation and
its phases, each measured around the worker's own methods (the CPU clock of
this thread, so the daemon's CPU is not in them), with the garbage collector
set as a worker's loop has it:

- *generation*: drawing the operations (``Generator.generate``);
- *queueing*: each token on the batch, the frees' pattern checks and ledger
  (``Operations._batch_plan``; single operations: not split);
- *library*: ``Batch.run`` less its round trip (the closes' local effects,
  the request's encoding, the replies' decoding, the Shm objects);
- *round trip*: ``Channel.call_frame`` and ``Channel.drain``, the client's
  CPU while it sends and waits (polling its slot included);
- *taking in*: the results into the ledger, the pages' claims, the new
  buffers' patterns (``Operations._batch_take``);
- *single operations*: ``Operations.run_op`` of an operation outside a batch,
  less its round trip;
- *other*: the loop, the clock, the report lines.

With ``--cprofile N`` a second loop runs under cProfile (which slows every
Python call, so only its shares are worth reading) and the ``N`` functions
with the most own time are printed.

Concurrency: one thread; the daemon is a subprocess, stopped (and waited
for) before the command returns.  Single figures on a shared machine
deserve scepticism: compare runs made in the same minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import pstats
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Callable, Iterator

from .daemon import LoadDaemon
from .mix import LoadSpec

#: The phases, in report order ("other" is what they leave of the loop).
PHASES = ("generation", "queueing", "library", "round trip", "taking in", "single operations")
_clock = time.thread_time_ns


def _timed(fn: Callable[..., Any], spent: Counter, phase: str) -> Callable[..., Any]:
    """``fn`` with the CPU time of each call added to ``spent[phase]``."""
    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = _clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += _clock() - t0
    return call


@contextlib.contextmanager
def _worker_gc() -> Iterator[None]:
    """The collector as a worker's loop has it (``worker.quiet_gc``), put back after."""
    from .worker import quiet_gc

    threshold = gc.get_threshold()
    quiet_gc()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _worker(path: str, spec: LoadSpec, seconds: float) -> Any:
    from .worker import Worker

    worker = Worker({"socket": path, "slot": 0, "gen": 0, "seed": spec.seed, "mix": spec.mix,
                     "sizes": spec.sizes, "batch": spec.batch, "max_live": spec.max_live,
                     "exhaust": False, "deadline": time.time() + seconds, "ops": 0, "tick": 0.25,
                     "start": "now", "transport": None})
    worker.out = io.StringIO()  # (its report lines are not read here)
    return worker


def profile(path: str, spec: LoadSpec, seconds: float) -> dict[str, Any]:
    """Run one worker loop against the daemon at ``path``: operations, CPU per
    operation of this thread, and each phase's share of it (µs per operation)."""
    from ..service import batch as batch_mod

    spent: Counter = Counter()
    worker = _worker(path, spec, seconds)
    worker.generate = _timed(worker.generate, spent, "generation")
    worker._batch_plan = _timed(worker._batch_plan, spent, "queueing")
    worker._batch_take = _timed(worker._batch_take, spent, "taking in")
    run_op = worker.run_op
    batch_run = batch_mod.Batch.run

    def run_one(op: Any) -> int:  # a single operation, less its round trip
        if op[0] == "b":
            return run_op(op)
        t0, trips = _clock(), spent["round trip"]
        try:
            return run_op(op)
        finally:
            spent["single operations"] += _clock() - t0 - (spent["round trip"] - trips)

    def run_batch(batch: Any) -> Any:  # Batch.run, less its round trip
        t0, trips = _clock(), spent["round trip"]
        try:
            return batch_run(batch)
        finally:
            spent["library"] += _clock() - t0 - (spent["round trip"] - trips)
    worker.run_op = run_one
    channel = worker.ctx._channel
    channel.call_frame = _timed(channel.call_frame, spent, "round trip")
    channel.drain = _timed(channel.drain, spent, "round trip")
    batch_mod.Batch.run = run_batch  # type: ignore[method-assign,assignment]
    try:
        t0 = _clock()
        with _worker_gc():
            worker._loop()
        total = _clock() - t0
    finally:
        batch_mod.Batch.run = batch_run  # type: ignore[method-assign]
        del channel.call_frame, channel.drain
    ops = worker.done
    worker.finish()
    per = 1e-3 / max(1, ops)
    phases = {name: spent[name] * per for name in PHASES}
    phases["other"] = max(0.0, total * per - sum(phases.values()))
    return {"ops": ops, "seconds": seconds, "us_per_op": total * per, "phases": phases,
            "violations": worker.violations}


def cprofile_top(path: str, spec: LoadSpec, seconds: float, top: int) -> str:
    """One worker loop under cProfile: the ``top`` functions by own time, as text."""
    worker = _worker(path, spec, seconds)
    prof = cProfile.Profile()
    with _worker_gc():
        prof.enable()
        worker._loop()
        prof.disable()
    worker.finish()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def render(doc: dict[str, Any], spec: LoadSpec) -> str:
    lines = [f"one load client in process, {doc['seconds']:g} s: mix {spec.mix}, sizes {spec.sizes}, "
             f"batch {spec.batch}",
             f"  {doc['ops']:,} operations, {doc['us_per_op']:.3f} us of this thread's CPU per operation "
             "(waits for the daemon included)"]
    for name, us in doc["phases"].items():
        lines.append(f"  {name:<18} {us:7.3f} us/op")
    if doc["violations"]:
        lines.append(f"  violations: {len(doc['violations'])}: {doc['violations'][0]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poolsvc.load.profile",
                                     description="Profile one load client's loop by phase.")
    parser.add_argument("--mix", default="alloc_user=1,free=1")
    parser.add_argument("--sizes", default="fixed:4096")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-live", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--no-dynamic", action="store_true", help="the static pool (dynamic_shm off)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also run a loop under cProfile and print its N top functions")
    args = parser.parse_args(argv)
    spec = LoadSpec(clients=1, mix=args.mix, sizes=args.sizes, batch=args.batch, max_live=args.max_live)
    with tempfile.TemporaryDirectory(prefix="poolsvc-profile-") as workdir:
        daemon = LoadDaemon(workdir, config_path=None, dynamic_size="256MiB", no_dynamic=args.no_dynamic,
                            clients=1)
        path = daemon.start()
        try:
            doc = profile(path, spec, args.seconds)
            print(render(doc, spec))
            if args.cprofile:
                print(cprofile_top(path, spec, args.seconds, args.cprofile))
        finally:
            _, problems = daemon.stop()
    for problem in problems:
        print(f"daemon: {problem}", file=sys.stderr)
    return 1 if doc["violations"] or problems else 0


if __name__ == "__main__":
    sys.exit(main())
