"""``poolsvc tee``: run the simulated secure world as a daemon on a Unix socket.

Parses arguments, loads the config, installs any extra trusted apps, runs
:class:`poolsvc.tee.daemon.TeeDaemon` until SIGTERM or SIGINT.  The protocol
is documented in ``poolsvc/tee/daemon.py`` and ``docs/tee.md``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys

from ..config import Config
from ..errors import BadParameters
from ..system import System
from ..tee.daemon import TeeDaemon


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tee", help="run the simulated secure world as a daemon",
                       description="Runs an embedded System whose secure world (built-in trusted "
                                   "apps: sha256, fill, copy, storage) is served on a Unix socket "
                                   "as newline-delimited JSON. Stops on SIGTERM or SIGINT.")
    p.add_argument("--socket", default=os.environ.get("POOLSVC_TEE_SOCKET", "/tmp/poolsvc-tee.sock"),
                   help="socket path (default: $POOLSVC_TEE_SOCKET or /tmp/poolsvc-tee.sock)")
    p.add_argument("--config", help="TOML configuration file (layout, capabilities, sizes)")
    p.add_argument("--no-dynamic", action="store_true",
                   help="simulate a TEE without DYNAMIC_SHM (reserved static pool only)")
    p.add_argument("--app", action="append", default=[], metavar="MODULE:CLASS",
                   help="install a TrustedApp subclass from an importable module (repeatable)")
    p.add_argument("--json", action="store_true", help="print the ready line as JSON")
    p.set_defaults(func=run)


def load_app(spec: str) -> type:
    """The class named by ``module:Class`` (BadParameters if it cannot be loaded)."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise BadParameters(f"--app {spec!r} is not MODULE:CLASS")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise BadParameters(f"--app {spec!r}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    config = Config.from_toml(args.config) if args.config else Config()
    if args.no_dynamic:
        config = config.replace(dynamic_shm=False)
    apps = [load_app(spec) for spec in args.app]
    with System(config) as system:
        for app in apps:
            system.tee.install(app)
        daemon = TeeDaemon(system, args.socket)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: daemon.stop())

        def ready() -> None:
            info = {"socket": args.socket, "pid": os.getpid(), "pool": system.pool,
                    "apps": sorted(str(u) for u in system.tee.apps)}
            print(json.dumps(info) if args.json else f"poolsvc tee: listening on {args.socket} "
                  f"(pid {os.getpid()}, pool {system.pool}, {len(info['apps'])} apps)", flush=True)

        daemon.serve_forever(ready)
    print("poolsvc tee: stopped", file=sys.stderr, flush=True)
    return 0
