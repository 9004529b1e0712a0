"""``poolsvc serve``: run the pool service daemon (parse arguments, load config, run)."""
from __future__ import annotations

import argparse
import logging

from ..config import Config
from ..service.settings import LOG_LEVELS, ServiceSettings, load


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the pool service daemon",
                       description="Serve one System to client processes over a Unix socket "
                                   "(poolsvc.connect(path)). SIGTERM or SIGINT shuts it down "
                                   "cleanly, releasing every client and removing the socket.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file: System keys (flat or [poolsvc]) and a [service] table")
    p.add_argument("--socket", metavar="PATH", help="socket path (overrides the config file)")
    p.add_argument("--log-level", type=str.lower, choices=[level.lower() for level in LOG_LEVELS],
                   help="logging level (default info, or the config file's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..service.server import serve

    if args.config:
        config, settings = load(args.config)
    else:
        config, settings = Config(), ServiceSettings()
    if args.socket:
        settings = settings.replace(socket_path=args.socket)
    if args.log_level:
        settings = settings.replace(log_level=args.log_level.upper())
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(config, settings)
    return 0
