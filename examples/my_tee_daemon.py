#!/usr/bin/env python3
"""A user's own TEE daemon: poolsvc's secure world embedded with a trusted app of its own.

The app, ``XorVault``, keeps a per-session key and XORs a client's buffer with
it in place (command 1), or returns a running count of the bytes it has
processed (command 2).  It works on the buffer's pages directly, span by
span, through the frame table: no copy on the Python side.

Run it, then talk to it with :class:`poolsvc.tee.daemon.TeeClient`::

    python examples/my_tee_daemon.py --socket /tmp/vault.sock
    python - <<'PY'
    from poolsvc.tee.daemon import TeeClient, memref_in, value
    c = TeeClient("/tmp/vault.sock")
    s = c.open_session("0d9b2c1e-4a55-4c1a-9a3e-5f0c1b7e9a01", [value(0x5A)])
    print(c.invoke(s, 1, [{"data": "aGVsbG8=", "dir": "inout"}]))
    PY

It stops cleanly on SIGTERM or SIGINT (every session closed, all memory freed).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import uuid

import numpy as np

from poolsvc import Config, System
from poolsvc.errors import BadParameters
from poolsvc.tee.daemon import TeeDaemon
from poolsvc.tee.ta import ParamType, TrustedApp, check_types


class XorVault(TrustedApp):
    """XOR a buffer in place with the session's one-byte key; count the bytes processed."""

    UUID = uuid.UUID("0d9b2c1e-4a55-4c1a-9a3e-5f0c1b7e9a01")
    NAME = "xor-vault"
    XOR, COUNT = 1, 2

    def open_session(self, params):
        check_types(params, ParamType.VALUE_INPUT)
        if params[0].a > 0xFF:
            raise BadParameters(f"key {params[0].a:#x} is not one byte")
        self.key = params[0].a
        self.count = 0

    def invoke(self, func, params):
        if func == self.XOR:
            check_types(params, ParamType.MEMREF_INOUT)
            for span in params[0].spans():           # memoryviews straight into storage
                arr = np.frombuffer(span, np.uint8)
                np.bitwise_xor(arr, self.key, out=arr)
                del arr
                self.count += len(span)
        elif func == self.COUNT:
            check_types(params, ParamType.VALUE_OUTPUT)
            params[0].a = self.count
        else:
            raise BadParameters(f"xor-vault: unknown command {func}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    config = Config(dynamic_size=64 << 20, arena_step=1 << 20)
    with System(config) as system:
        system.tee.install(XorVault)
        daemon = TeeDaemon(system, args.socket)
        signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
        signal.signal(signal.SIGINT, lambda *_: daemon.stop())
        daemon.serve_forever(ready=lambda: print(f"ready {os.getpid()}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
