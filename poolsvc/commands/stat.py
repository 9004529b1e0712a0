"""``poolsvc stat``: the figures of a running daemon (text, JSON or Prometheus)."""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stat", help="show a running daemon's pools, clients and request latencies",
                       description="Connects to `poolsvc serve` as a monitor (no context) and "
                                   "reports each pool (free, used, largest free run, "
                                   "fragmentation), usage per client, request counts and "
                                   "latency percentiles.")
    p.add_argument("--socket", metavar="PATH", help="socket path (default: $POOLSVC_SOCKET, "
                                                     "$XDG_RUNTIME_DIR/poolsvc.sock, /tmp/poolsvc-UID/)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the whole document as JSON")
    fmt.add_argument("--prometheus", action="store_true", help="print Prometheus text format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..service.client import connect
    from ..service.render import prometheus, text

    with connect(args.socket, name="poolsvc-stat", spin_us=0, timeout=10) as client:
        doc: dict[str, Any] = client.service_stats()
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    elif args.prometheus:
        print(prometheus(doc), end="")
    else:
        print(text(doc), end="")
    return 0
