"""``poolsvc load``: multi-process load test of the pool service (parse arguments, run, report).

The work is in :mod:`poolsvc.load`; this module only maps the command line
onto :class:`~poolsvc.load.mix.LoadSpec` and :class:`~poolsvc.load.runner.LoadRunner`
(one run, or one per client count with ``--sweep``: :mod:`poolsvc.load.sweep`)
and prints.  Exit status: 0 when the run kept every invariant and leaked
nothing, 1 when it did not (the report says what), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..load.mix import DEFAULT_MIX, DEFAULT_SIZES, OPS

EPILOG = """\
operations (--mix NAME=WEIGHT,...): %s.
  alloc_*: Context.alloc_{user,kernel,priv}_buf; register_*: the client's own POSIX
  shm buffer (unlinked at creation) through register_{user,kernel}_buf; free: close;
  lookup: shm_from_id of an own buffer's id; invoke: SHA-256 of an own buffer by
  the secure world's sha256 app, compared with what the client wrote.
sizes (--sizes): fixed:N | uniform:LO:HI | log:LO:HI (log-uniform) | choice:A,B,...
  e.g. log:64:64KiB. Register sizes are capped at 60 KiB.

every run checks, and fails (exit 1) on any violation:
  - each buffer carries its owner's tag; read back before free and hashed by the
    secure world on invoke (a foreign tag means one frame had two owners);
  - on every STATS snapshot: free+used == size per pool, used frames == daemon's
    own + sum over clients, ids == sum over clients, contexts == connections;
  - after the clients exit: frames, ids, registered cookies, mapped frames,
    contexts, storage objects and fds, registered mappings, the daemon's fds and
    /dev/shm objects all back to where they were before the run.

examples:
  poolsvc load --clients 8 --duration 60 --kill-rate 0.5 --malformed-rate 5
  poolsvc load --clients 4 --duration 20 --batch 256 --json batched.json
  poolsvc load --duration 10 --record run.trace --json dyn.json
  poolsvc load --replay run.trace --no-dynamic --json static.json
  poolsvc load --compare dyn.json static.json
  poolsvc load --sweep 1,8,64,256 --duration 15 --json sweep.json --markdown sweep.md
  poolsvc load --sweep 8,64,256 --rounds 3 --mix alloc_user=1,free=1 --sizes fixed:4096

numbers are checked before anything runs (exit 2 with the reason): --clients
1..1024, --duration 0.1..86400 s, --batch 1..4096, --max-live >= 1, --ops >= 0,
--kill-rate 0..100, --malformed-rate 0..1000.
""" % ", ".join(OPS)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "load", help="load-test the pool service with many client processes, kills and bad requests",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Starts `poolsvc serve` on a temporary socket (or uses --socket), runs N client "
                    "processes that allocate, register, look up, hash and free buffers in a "
                    "configurable mix, and reports operations per second, latency percentiles "
                    "per operation and errors by type. Clients may be SIGKILLed and restarted "
                    "(--kill-rate), malformed requests sent on raw sockets (--malformed-rate), "
                    "and pools driven to exhaustion (--exhaust); the daemon's accounting is "
                    "checked throughout and nothing may leak. A one-line status goes to stderr.")
    g = p.add_argument_group("what to run")
    g.add_argument("--clients", type=int, default=None, help="client processes (default 4, at most 1024)")
    g.add_argument("--sweep", metavar="N,N,...",
                   help="a scaling study: one run of --duration per client count (e.g. 1,8,64,256), "
                        "each on a daemon of its own, then a table of throughput and p50/p99 per "
                        "count (--json, --markdown and --plot write it)")
    g.add_argument("--rounds", type=int, default=None,
                   help="with --sweep: run the whole sweep this many times, the counts in turn, "
                        "and give each count the medians over the rounds, its ratio to the "
                        "reference taken within each round (default 1)")
    g.add_argument("--duration", type=float, default=None,
                   help="seconds of load (default 10; with --replay, only a bound: 600)")
    g.add_argument("--ops", type=int, default=0,
                   help="stop after this many operations over all clients (default: no bound)")
    g.add_argument("--mix", default=DEFAULT_MIX, help=f"operation weights (default {DEFAULT_MIX})")
    g.add_argument("--sizes", default=DEFAULT_SIZES, help=f"buffer sizes (default {DEFAULT_SIZES})")
    g.add_argument("--batch", type=int, default=1,
                   help="operations per BATCH request for alloc/free/lookup (default 1: one "
                        "request each); register and invoke always go alone")
    g.add_argument("--max-live", type=int, default=64, help="buffers a client holds at most (default 64)")
    g.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    f = p.add_argument_group("faults")
    f.add_argument("--kill-rate", type=float, default=0.0, metavar="PER_S",
                   help="SIGKILL a random client this many times per second, at random moments, "
                        "and restart it (default 0)")
    f.add_argument("--malformed-rate", type=float, default=0.0, metavar="PER_S",
                   help="malformed requests per second, each on its own raw connection, each "
                        "checked for the reply the protocol promises (default 0)")
    f.add_argument("--exhaust", action="store_true",
                   help="allocate without a live bound until the pool refuses, free half, "
                        "repeat (OutOfMemory then counts as expected); the started daemon "
                        "gets a 32 MiB dynamic pool unless --dynamic-size says otherwise")
    s = p.add_argument_group("service")
    s.add_argument("--socket", metavar="PATH", help="use this running daemon instead of starting one")
    s.add_argument("--config", metavar="FILE", help="TOML config for the daemon this run starts")
    s.add_argument("--no-dynamic", action="store_true",
                   help="start the daemon without dynamic shm: every buffer from the reserved "
                        "static pool, no registration (a private buffer stays in the daemon, so "
                        "its content is not checked)")
    s.add_argument("--transport", choices=("socket", "shm"),
                   help="the clients' transport (default: the client library's, "
                        "$POOLSVC_TRANSPORT or shm)")
    s.add_argument("--dynamic-size", metavar="SIZE", help="dynamic pool of the started daemon "
                                                            "(default 256MiB, 32MiB with --exhaust)")
    t = p.add_argument_group("traces and output")
    t.add_argument("--record", metavar="FILE", help="write the run's operation stream (a trace)")
    t.add_argument("--replay", metavar="FILE",
                   help="run a recorded trace's operations (same clients, same kill points) "
                        "instead of drawing them; combine with --config/--no-dynamic to compare "
                        "configurations like for like")
    t.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
    t.add_argument("--markdown", metavar="FILE", help="with --sweep: write its table as markdown")
    t.add_argument("--plot", metavar="DIR", help="write throughput.png and latency.png over time "
                                                 "(with --sweep: sweep.png against clients)")
    t.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two saved reports side by side and exit (runs nothing)")
    t.add_argument("--label", default="", help="a name for this run in the report")
    t.add_argument("--quiet", action="store_true", help="no status line on stderr")
    p.set_defaults(func=run)


def _check_combinations(args: argparse.Namespace) -> None:
    """BadParameters for options that do not go together."""
    from ..errors import BadParameters

    if args.socket and (args.config or args.no_dynamic or args.dynamic_size):
        raise BadParameters("--socket uses a running daemon: --config, --no-dynamic and "
                            "--dynamic-size only apply to a daemon this run starts")
    if args.record and args.replay:
        raise BadParameters("--record and --replay together: record the original run instead")
    if args.sweep is not None:
        clash = [name for name, given in (("--clients", args.clients is not None),
                                          ("--replay", args.replay), ("--record", args.record))
                 if given]
        if clash:
            raise BadParameters(f"--sweep runs one load per client count: {', '.join(clash)} "
                                "applies to a single run")
    elif args.markdown:
        raise BadParameters("--markdown writes the table of a --sweep")
    elif args.rounds is not None:
        raise BadParameters("--rounds repeats a --sweep")


def run(args: argparse.Namespace) -> int:
    from ..load import report as rep
    from ..load.mix import LoadSpec

    if args.compare:
        a, b = (rep.load(path) for path in args.compare)
        print(rep.compare(a, b, names=(a.get("label") or args.compare[0], b.get("label") or args.compare[1])),
              end="")
        return 0
    _check_combinations(args)
    duration = args.duration if args.duration is not None else (600.0 if args.replay else 10.0)
    spec = LoadSpec(clients=args.clients if args.clients is not None else 4, duration=duration,
                    ops=args.ops, mix=args.mix, sizes=args.sizes, batch=args.batch,
                    max_live=args.max_live, kill_rate=args.kill_rate,
                    malformed_rate=args.malformed_rate, exhaust=args.exhaust, seed=args.seed)
    if args.sweep is not None:
        return _run_sweep(args, spec)
    if args.replay:  # the trace's own parameters shape the workers
        from ..load import trace

        recorded = trace.read(args.replay).header.get("spec", {})
        keep = {k: recorded[k] for k in ("mix", "sizes", "batch", "max_live", "exhaust", "seed")
                if k in recorded}
        spec = spec.replace(kill_rate=0.0, **keep)
    report = _runner(args, spec).run()
    _emit(args, report, rep.text)
    if args.plot:
        for path in rep.plot(report, args.plot):
            print(f"wrote {path}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0 if report.get("ok") else 1


def _runner(args: argparse.Namespace, spec: Any) -> Any:
    """The LoadRunner of one run of ``spec`` as the command line says."""
    from ..load.runner import LoadRunner

    label = args.label
    if args.sweep is not None:
        label = f"{label}{' ' if label else ''}{spec.clients} clients: "
    return LoadRunner(spec, socket=args.socket, config_path=args.config, no_dynamic=args.no_dynamic,
                      dynamic_size=args.dynamic_size, record=args.record, replay=args.replay,
                      progress=None if args.quiet else sys.stderr, label=label,
                      transport=args.transport)


def _run_sweep(args: argparse.Namespace, spec: Any) -> int:
    from ..load import sweep

    counts = sweep.parse_counts(args.sweep)
    result = sweep.run(spec, counts, lambda one: _runner(args, one).run(),
                       rounds=1 if args.rounds is None else args.rounds)
    _emit(args, result, sweep.text)
    if args.markdown:
        _write(args.markdown, sweep.markdown(result), stdout=args.json != "-")
    if args.plot:
        for path in sweep.plot(result, args.plot):
            print(f"wrote {path}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0 if result["ok"] else 1


def _emit(args: argparse.Namespace, doc: dict[str, Any], render: Any) -> None:
    """Print ``doc`` as JSON (``--json -``) or as ``render(doc)``, and write it to
    ``--json FILE`` when asked."""
    if args.json == "-":
        print(json.dumps(doc, indent=1, sort_keys=True))
        return
    print(render(doc), end="")
    if args.json:
        _write(args.json, json.dumps(doc, indent=1, sort_keys=True))


def _write(path: str, text: str, stdout: bool = True) -> None:
    """Write ``text`` to ``path`` and say so (on stderr when stdout carries JSON)."""
    with open(path, "w") as fh:
        fh.write(text)
        if not text.endswith("\n"):
            fh.write("\n")
    print(f"wrote {path}", file=sys.stdout if stdout else sys.stderr)
